"""The "reference" backend of linear_cross_entropy: the whole logits matrix, float64, autograd by torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   ignore_index: int, vocab_size: int, rows_per_chunk: int | None = None
                                   ) -> torch.Tensor:
    """sum over scored rows of -log softmax((hidden @ weight.T)[:, :vocab_size])[target], in float64 (returned
    in float32).

    hidden (N, d), weight (V, d), targets (N,). `rows_per_chunk` is accepted and ignored (one chunk).
    """
    logits = hidden.double() @ weight[:vocab_size].double().t()  # (N, vocab_size)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss.float()
