"""The "reference" backend of linear_cross_entropy: the whole logits matrix, float64, autograd by torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   ignore_index: int, rows_per_chunk: int | None = None) -> torch.Tensor:
    """sum over scored rows of -log softmax(hidden @ weight.T)[target], in float64 (returned in float32).

    hidden (N, d), weight (V, d), targets (N,). `rows_per_chunk` is accepted and ignored (one chunk).
    """
    logits = hidden.double() @ weight.double().t()  # (N, V)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss.float()
