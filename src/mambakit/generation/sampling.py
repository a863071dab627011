"""Sampling as small pure functions on logits (batch, vocab); none of them synchronises with the host.

    logits -> apply_repetition_penalty -> logits_to_probs (temperature, top-k, top-p, min-p) -> sample
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive / multiply negative logits of tokens already seen.

    logits: (B, V) float; seen: (B, V) bool mask of tokens in the prompt or generated so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> torch.Tensor:
    """Filtered, renormalised distribution (B, V) float32.

    top_k keeps the k largest logits; top_p keeps the smallest set of tokens whose probability sums to
    at least top_p (the most likely token always stays); min_p drops tokens whose probability is
    below min_p times the most likely one's. Filters apply in that order, then renormalise.
    """
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from probs (B, V) -> (B,) int64, without a host sync.

    argmax(p / E) with E ~ Exp(1) i.i.d. is an exact sample from p (the exponential-race trick).
    """
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / e, dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)
