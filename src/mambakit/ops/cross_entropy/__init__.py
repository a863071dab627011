"""Cross-entropy of a linear head without the logits matrix: the language-model loss, chunk by chunk. See README.md."""

from __future__ import annotations

import torch

from ..checks import ShapeChecker
from ..common import autocast_dtype
from ..dispatch import implementation

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "sum", vocab_size: int | None = None,
                         rows_per_chunk: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, never holding the whole (N, V) logits.

    Equal to `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=..., reduction=...)`, with the
    matmul in the autocast dtype under autocast (as `nn.Linear` would run it) and the softmax in float32.
    The "torch" backend makes the logits `rows_per_chunk` rows at a time and computes both gradients as it
    goes (the loss is a scalar), so its memory is one chunk's logits instead of the whole matrix and its
    float32 copies: gigabytes at a 50k vocabulary and 16k tokens per step.

    Args:
        hidden: (N, d) or (..., d), the final hidden states.   weight: (V, d), the head's weight.
        targets: (N,) or (...,) integer class ids in [0, vocab_size), or `ignore_index` where nothing is scored.
        reduction: "sum" or "mean" (over the scored rows; 0 when none is).
        vocab_size: the softmax runs over the first vocab_size columns (default V): a padded head's extra rows
            are left out. Pass the whole padded weight rather than a slice: its row count keeps the matmuls
            aligned for the tensor cores.
        rows_per_chunk: rows per block of logits (default: about 128 MB of float32 logits per block).
        backend: None (automatic: "torch"), "reference" (float64, whole matrix), "torch" or "triton" (the torch
            backend's chunks with each chunk's softmax and gradient in one kernel; runs only when named, or under
            `use_backend("triton")`, until it is timed on a GPU).
    Returns:
        a float32 scalar; gradients flow to hidden and weight in their own dtypes.

    Example:
        >>> h = model.backbone(ids[:, :-1])                         # (B, L, d)
        >>> loss = linear_cross_entropy(h, model.lm_head.weight, ids[:, 1:], vocab_size=vocab, reduction="mean")
    """
    chk = ShapeChecker("linear_cross_entropy")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(f"linear_cross_entropy: hidden must be a float tensor (..., d), got "
                         f"{getattr(hidden, 'dtype', type(hidden))} {tuple(getattr(hidden, 'shape', ()))}")
    lead = tuple(f"n{i}" for i in range(hidden.dim() - 1))
    chk.tensor("hidden", hidden, lead + ("d",))
    chk.tensor("weight", weight, ("V", "d"))
    chk.tensor("targets", targets, lead, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if rows_per_chunk is not None and (not isinstance(rows_per_chunk, int) or rows_per_chunk < 1):
        raise ValueError(f"linear_cross_entropy: rows_per_chunk must be a positive int, got {rows_per_chunk!r}")
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    if not isinstance(vocab, int) or not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: vocab_size must be an int in [1, {weight.shape[0]}], "
                         f"got {vocab_size!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        # on CUDA this check would be a host sync per step; there the gather's own device assert fires
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: targets must lie in [0, {vocab}) or equal "
                             f"ignore_index={ignore_index}; got {targets[bad][:5].tolist()}")
    _, fn = implementation("linear_cross_entropy", backend, hidden.device)
    amp = autocast_dtype(hidden.device)
    if amp is not None and hidden.dtype != torch.float64:
        with torch.autocast(hidden.device.type, enabled=False):
            loss = fn(hidden.to(amp), weight.to(amp), targets, ignore_index=ignore_index, vocab_size=vocab,
                      rows_per_chunk=rows_per_chunk)
    else:
        loss = fn(hidden, weight, targets, ignore_index=ignore_index, vocab_size=vocab,
                  rows_per_chunk=rows_per_chunk)
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp_min(1)
    return loss
