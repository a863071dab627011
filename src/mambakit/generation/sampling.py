"""Sampling as small pure functions on logits (batch, vocab); none of them synchronises with the host.

    logits -> apply_repetition_penalty -> logits_to_probs (temperature, top-k, top-p, min-p) -> sample
"""

from __future__ import annotations

import torch


def seen_tokens(ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which ids each row holds at its valid positions. ids, valid: (B, L) int64 and bool.

    Builds the repetition penalty's mask from a padded prompt batch: padded positions (valid False)
    count for nothing, even though they hold a real id.

    Example:
        >>> seen_tokens(torch.tensor([[0, 0, 5]]), torch.tensor([[False, False, True]]), 8)[0].nonzero()   # [[5]]
    """
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.int32, device=ids.device)
    return counts.scatter_add_(1, ids, valid.to(torch.int32)) > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive / multiply negative logits of tokens already seen.

    logits: (B, V) float; seen: (B, V) bool mask of tokens in the prompt or generated so far.
    """
    if not penalty > 0:
        raise ValueError(f"apply_repetition_penalty: penalty must be > 0, got {penalty!r}")
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

    Example:
        >>> logits_to_probs(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), top_k=2)   # [[0.625, 0.375, 0.]]
    """
    if not temperature > 0:
        raise ValueError(f"logits_to_probs: temperature must be > 0 (use greedy() for 0), got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"logits_to_probs: top_k must be an int >= 0, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"logits_to_probs: top_p must be in (0, 1], got {top_p!r}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"logits_to_probs: min_p must be in [0, 1), got {min_p!r}")
    logits = logits.float() / temperature
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
    """The most likely token of each row: logits (B, V) -> (B,) int64."""
    return torch.argmax(logits, dim=-1)
