"""A sequence classification head for any sequence model: pool the hidden states over the sequence, then a linear layer.

Shapes (legend): B batch, L seqlen, M d_model, K classes.

    hidden = backbone(inputs)                   (B, L, M)    any module: MambaLM's Backbone, a U-Net's trunk, ...
    pooled = pool(hidden, mask)                 (B, M)       "mean" over real positions, "max", or "last" real one
    logits = head(dropout(pooled))              (B, K)

`mask` (B, L) marks the real positions of a padded batch (True = real). A causal model's last position has
read the whole sequence, so "last" pooling suits it; "mean" lets every position vote (the usual choice for
long DNA windows, where the last state alone forgets the start).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MambaConfig

__all__ = ["SequenceClassifier", "pool_sequence", "POOLINGS"]

POOLINGS = ("mean", "max", "last")


def pool_sequence(hidden: torch.Tensor, pooling: str = "mean", mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, M) hidden states -> (B, M), pooled over the positions where mask (B, L) is True (all when None).

    Example:
        >>> pool_sequence(torch.ones(2, 5, 8), "mean").shape
        torch.Size([2, 8])
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pool_sequence: pooling must be one of {POOLINGS}, got {pooling!r}")
    if hidden.dim() != 3:
        raise ValueError(f"pool_sequence: hidden must be (batch, seqlen, d_model), got {tuple(hidden.shape)}")
    if mask is None:
        if pooling == "mean":
            return hidden.float().mean(1).to(hidden.dtype)
        if pooling == "max":
            return hidden.amax(1)
        return hidden[:, -1]
    if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"pool_sequence: mask must be bool (batch, seqlen) = {tuple(hidden.shape[:2])}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not mask.any(1).all():
        raise ValueError("pool_sequence: every row of mask needs at least one True position")
    if pooling == "mean":
        m = mask[..., None].to(torch.float32)
        # accumulate in fp32: a mean over 10^5+ positions of bf16 values loses its low bits otherwise
        return ((hidden.float() * m).sum(1) / m.sum(1)).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(~mask[..., None], torch.finfo(hidden.dtype).min).amax(1)
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)  # (B,) index of the last True
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SequenceClassifier(nn.Module):
    """backbone -> pooling over the sequence -> dropout -> linear.   forward(inputs, mask=None) -> logits (B, K).

    Args:
        backbone: a module mapping `inputs` to hidden states (B, L, d_model).
        d_model: the width of those hidden states.
        num_classes: K.
        pooling: "mean", "max" or "last" (see the module docstring).

    Example:
        >>> clf = SequenceClassifier.from_config(MambaConfig(d_model=64, n_layer=2, vocab_size=9), num_classes=4)
        >>> clf(torch.randint(4, 9, (8, 1024))).shape
        torch.Size([8, 4])
    """

    def __init__(self, backbone: nn.Module, d_model: int, num_classes: int, pooling: str = "mean",
                 dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"SequenceClassifier: pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_classes < 2:
            raise ValueError(f"SequenceClassifier: num_classes must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.pooling = pooling
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)

    @classmethod
    def from_config(cls, config: MambaConfig, num_classes: int, pooling: str = "mean", dropout: float = 0.0,
                    device=None) -> "SequenceClassifier":
        """A MambaLM's backbone (embedding, blocks, final norm) under the head; mamba_ssm's initialisation."""
        from functools import partial

        from .mamba_lm import Backbone, _init_weights

        backbone = Backbone(config, device=device)
        backbone.apply(partial(_init_weights, n_layer=config.n_layer))
        return cls(backbone, config.d_model, num_classes, pooling, dropout).to(device)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(inputs)  # (B, L, M)
        return self.head(self.dropout(pool_sequence(hidden, self.pooling, mask)))
