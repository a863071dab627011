"""Per-layer recurrent state of a Mamba mixer, for inference.

Shapes (legend): B batch, C conv channels, W conv width, D Mamba-1 inner dim, N dstate,
H heads, P headdim.

    conv_state: (B, C, W - 1)  the last W-1 conv inputs, oldest first, in the activation dtype
    ssm_state:  (B, D, N) for Mamba-1, (B, H, P, N) for Mamba-2, float32

A mixer reads and advances its state in place; `mambakit.generation.InferenceCache` holds one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixerState:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def zero_(self) -> "MixerState":
        self.conv_state.zero_()
        self.ssm_state.zero_()
        return self

    @property
    def batch_size(self) -> int:
        return self.ssm_state.shape[0]

    def nbytes(self) -> int:
        return self.conv_state.nbytes + self.ssm_state.nbytes

    def zero_rows_(self, rows: torch.Tensor) -> "MixerState":
        """Zero the rows where `rows` (batch,) bool is True, in place (the tensors keep their addresses)."""
        self.conv_state.masked_fill_(rows.view(-1, 1, 1), 0)
        self.ssm_state.masked_fill_(rows.view(-1, *([1] * (self.ssm_state.dim() - 1))), 0)
        return self

    def index_select(self, rows: torch.Tensor) -> "MixerState":
        return MixerState(self.conv_state.index_select(0, rows), self.ssm_state.index_select(0, rows))

    def index_copy_(self, rows: torch.Tensor, source: "MixerState") -> "MixerState":
        self.conv_state.index_copy_(0, rows, source.conv_state)
        self.ssm_state.index_copy_(0, rows, source.ssm_state)
        return self

    def select_(self, keep: torch.Tensor) -> "MixerState":
        """Zero the rows where `keep` (batch,) is False (e.g. a finished or restarted sequence)."""
        k = keep.to(self.conv_state.dtype).view(-1, *([1] * (self.conv_state.dim() - 1)))
        self.conv_state.mul_(k)
        self.ssm_state.mul_(keep.to(self.ssm_state.dtype).view(-1, *([1] * (self.ssm_state.dim() - 1))))
        return self
