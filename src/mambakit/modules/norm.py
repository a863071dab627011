"""Normalisation layers: RMSNorm (the residual stream) and gated RMSNorm (Mamba-2's output norm).

Parameter names match mamba_ssm (`weight`, and `bias` for LayerNorm) so checkpoints load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import GatedNormSpec, rms_norm


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim.   x: (..., hidden)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, eps=self.eps)


class RMSNormGated(nn.Module):
    """Mamba-2's gated norm: norm(x * silu(z)) (or norm(x) * silu(z)), statistics per group of channels."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 group_size: int | None = None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def spec(self) -> GatedNormSpec:
        """This norm as the one object the ops take (`ops.GatedNormSpec`): its weight parameter and settings."""
        return GatedNormSpec(self.weight, eps=self.eps, group_size=self.group_size,
                             norm_before_gate=self.norm_before_gate)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        # the op directly, not through spec(): building and checking the spec costs microseconds per call, which a
        # decode step outside a CUDA graph pays once per layer per token
        return rms_norm(x, self.weight, eps=self.eps, z=z, group_size=self.group_size,
                        norm_before_gate=self.norm_before_gate)
