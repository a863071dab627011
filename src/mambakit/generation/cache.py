"""The inference cache: one recurrent state per layer plus the number of tokens consumed.

A Mamba cache has a fixed size whatever the prefix length: per layer a conv window (B, C, W-1) and
an SSM state ((B, D, N) for Mamba-1, (B, H, P, N) for Mamba-2). That is what makes decoding cost
the same per token at any position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import MixerState


@dataclass
class InferenceCache:
    layers: list[MixerState]
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.layers[0].ssm_state.shape[0]

    def reset(self) -> "InferenceCache":
        for state in self.layers:
            state.zero_()
        self.seqlen_offset = 0
        return self

    def nbytes(self) -> int:
        return sum(s.conv_state.nbytes + s.ssm_state.nbytes for s in self.layers)


def allocate_cache(model: nn.Module, batch_size: int, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> InferenceCache:
    """Zero cache for `batch_size` sequences; conv windows in `dtype` (default: the model's), SSM states float32."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"allocate_cache: batch_size must be a positive int, got {batch_size!r}")
    layers = [block.mixer.allocate_state(batch_size, dtype=dtype, device=device) for block in model.backbone.layers]
    return InferenceCache(layers=layers)
