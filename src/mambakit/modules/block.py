"""Pre-norm residual block: norm -> mixer (-> norm2 -> MLP), the residual stream optionally kept in float32.

    residual = hidden + residual;  hidden = mixer(norm(residual))
    (when there is an MLP)  residual = hidden + residual;  hidden = mlp(norm2(residual))

The block returns (hidden, residual) and the next block adds them: this is mamba_ssm's `Block`
(prenorm with a separate residual), which is what its checkpoints were trained with. Keeping the
residual in float32 matters under bf16: it is a sum over all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .state import MixerState


class Block(nn.Module):
    """One layer.   forward(hidden (B, L, M), residual (B, L, M) or None, cache, seq_idx) -> (hidden, residual)."""

    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, mlp: nn.Module | None = None,
                 norm2: nn.Module | None = None, residual_in_fp32: bool = True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = norm2
            self.mlp = mlp
        else:
            self.mlp = None

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                cache: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        residual = hidden_states if residual is None else hidden_states + residual
        hidden_states = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        hidden_states = self.mixer(hidden_states, cache=cache, seq_idx=seq_idx)
        if self.mlp is not None:
            residual = hidden_states + residual
            hidden_states = self.norm2(residual.to(self.norm2.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.float()
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual
