"""Per-token log-probabilities of token sequences under a language model: what zero-shot evaluation sums.

Shapes (legend): B rows, L the longest row, T scored targets per row, V the tokenizer's vocabulary (the model's
logits may be padded past it: those columns are dropped before the softmax, they are not tokens).

    logprobs[b, t] = log p(ids[b, t + 1] | ids[b, :t + 1])         (B, L - 1) float32

Ragged rows (lists of different lengths) go through one model call: they are right-aligned after left padding
and `seq_idx` marks padding 0 and tokens 1, so every mixer starts each row from an empty state at its first real
token (the SSM state and conv window restart, attention sees only its own row's tokens, positions count from
the row's first token): a row scores the same alone or in any batch. `last=k` keeps only each row's last k
targets, and only those positions' logits are computed (`logits_to_keep`): a continuation of k tokens after a
long context costs B x (k + 1) x V logits, not B x L x V.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["score"]


def _pack(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Left-pad rows into (B, L) int64 (right-aligned); returns the ids and each row's padding length."""
    longest = max(len(r) for r in rows)
    pads = [longest - len(r) for r in rows]
    ids = torch.tensor([[0] * p + r for p, r in zip(pads, rows)], dtype=torch.long, device=device)
    return ids, pads


def _check_rows(ids) -> tuple[list[list[int]] | None, torch.Tensor | None]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"score: ids must be an integer tensor (batch, seqlen) or a list of token-id lists, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"score: ids must be non-empty, got shape {tuple(ids.shape)}")
        return None, ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
        raise ValueError(f"score: ids must be a (batch, seqlen) integer tensor or a non-empty list of token-id lists, "
                         f"got {type(ids).__name__}")
    rows = [r.reshape(-1).tolist() if isinstance(r, torch.Tensor) else list(r) for r in ids]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"score: ids[{i}] is empty; every row needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in r):
            raise ValueError(f"score: ids[{i}] must hold ints (token ids)")
    return rows, None


@torch.no_grad()
def score(model: nn.Module, ids, *, last: int | None = None, return_argmax: bool = False):
    """Log-probability of every token given the tokens before it (the first token of a row is not scored).

    Args:
        model: a MambaLM or TransformerLM (anything mapping (B, L) ids to (B, L, >= vocab) logits that takes
            `seq_idx` and `logits_to_keep`, with `config.vocab_size`).
        ids: a (B, L) integer tensor, or a list of B token-id lists of any lengths (each at least 1 token).
        last: score only the last `last` targets of each row (None: all of them).
        return_argmax: also return the model's most likely token at each scored position (for "is greedy").
    Returns:
        A (B, T) float32 tensor for a tensor `ids` (T = L - 1, or `last`), or a list of B (T_b,) float32 tensors
        for a list (T_b = len(row) - 1, at most `last`); with return_argmax, (logprobs, argmax ids) of the same
        structure.

    Example:
        >>> lp = score(model, torch.tensor([[0, 5, 9, 2]]))        # (1, 3): log p(5 | 0), log p(9 | 0 5), ...
        >>> cont = score(model, [ctx + cont_ids], last=len(cont_ids))[0].sum()   # a continuation's log-likelihood
    """
    if last is not None and (not isinstance(last, int) or isinstance(last, bool) or last < 1):
        raise ValueError(f"score: last must be a positive int or None, got {last!r}")
    rows, tensor = _check_rows(ids)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    if tensor is not None:
        ids_BL, pads = tensor.to(device=device, dtype=torch.long), [0] * tensor.shape[0]
    else:
        ids_BL, pads = _pack(rows, device)
    lo, hi = int(ids_BL.min()), int(ids_BL.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"score: token ids must lie in [0, {vocab}) (the model's vocab_size), got {lo} to {hi}")
    seqlen = ids_BL.shape[1]
    n_targets = seqlen - 1 if last is None else min(last, seqlen - 1)
    seq_idx = None
    if max(pads) > 0:
        pads_B = torch.tensor(pads, device=device)
        seq_idx = (torch.arange(seqlen, device=device)[None, :] >= pads_B[:, None]).to(torch.int32)  # (B, L)
    was_training = model.training
    model.eval()
    try:
        # the logits at positions L-1-T .. L-2 predict the last T tokens; none are kept when nothing is scored
        logits = model(ids_BL, seq_idx=seq_idx, logits_to_keep=n_targets + 1)[:, :-1] if n_targets > 0 else \
            ids_BL.new_zeros(ids_BL.shape[0], 0, vocab, dtype=torch.float32)
    finally:
        model.train(was_training)
    logp_BTV = logits[..., :vocab].float().log_softmax(dim=-1)  # fp32 softmax whatever the model's dtype
    targets_BT = ids_BL[:, seqlen - n_targets:]
    logp_BT = logp_BTV.gather(-1, targets_BT[..., None])[..., 0]  # (B, T)
    argmax_BT = logp_BTV.argmax(dim=-1)
    if tensor is not None:
        return (logp_BT, argmax_BT) if return_argmax else logp_BT
    # row b has len(row) - 1 targets; of the last T positions, its own are the last min(T, len - 1)
    keep = [min(n_targets, len(r) - 1) for r in rows]
    logps = [logp_BT[b, n_targets - k:] for b, k in enumerate(keep)]
    if not return_argmax:
        return logps
    return logps, [argmax_BT[b, n_targets - k:] for b, k in enumerate(keep)]
