"""The inference cache: one recurrent state per layer plus the number of tokens consumed.

Shapes (legend): B batch, C conv channels, W conv width, D Mamba-1 inner dim, N dstate, H heads,
P headdim.

    layers[i].conv_state: (B, C, W - 1)   the last W-1 conv inputs, in the activation dtype
    layers[i].ssm_state:  (B, D, N) for Mamba-1, (B, H, P, N) for Mamba-2, float32 (Mamba-2: bfloat16
                          when allocated with state_dtype=torch.bfloat16)

A Mamba cache has a fixed size whatever the prefix length: that is what makes decoding cost the same
per token at any position, and what lets a CUDA graph capture the decode step once: the model's
step path updates these tensors in place, so their addresses never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules import MixerState


@dataclass
class InferenceCache:
    """Per-layer recurrent states of `batch_size` sequences; `seqlen_offset` counts the tokens consumed.

    With a ragged batch (rows of different lengths) `seqlen_offset` counts the longest row; a cache
    whose `seqlen_offset` is 0 holds no tokens (`prefill` zeroes it before use).
    """

    layers: list[MixerState]  # or KVState (modules/attention.py) for the attention layers of a hybrid
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def reset(self) -> "InferenceCache":
        """Zero every state in place (the tensors keep their addresses: a captured CUDA graph stays valid)."""
        for state in self.layers:
            state.zero_()
        self.seqlen_offset = 0
        return self

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def index_select(self, rows: torch.Tensor) -> "InferenceCache":
        """A new cache holding copies of the states of `rows` (a 1-D index tensor on the cache's device)."""
        return InferenceCache(layers=[s.index_select(rows) for s in self.layers], seqlen_offset=self.seqlen_offset)

    def index_copy_(self, rows: torch.Tensor, source: "InferenceCache") -> "InferenceCache":
        """Write `source`'s states (len(rows) sequences) into `rows` of this cache, in place."""
        for dst, src in zip(self.layers, source.layers):
            dst.index_copy_(rows, src)
        return self


def allocate_cache(model: nn.Module, batch_size: int, dtype: torch.dtype | None = None,
                   device: torch.device | None = None, state_dtype: torch.dtype | None = None) -> InferenceCache:
    """Zero cache for `batch_size` sequences; conv windows in `dtype` (default: the model's), SSM states float32.

    `state_dtype=torch.bfloat16` keeps Mamba-2 SSM states in bfloat16 (updated in float32, rounded back
    each token), as mamba_ssm's inference caches do: half the bytes a large-batch decode step moves.
    Mamba-1 layers refuse it (their d_state 16 state is small next to the weights).

    Example:
        >>> cache = allocate_cache(model, batch_size=4)
        >>> cache.layers[0].ssm_state.shape        # Mamba-2: (4, nheads, headdim, d_state)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"allocate_cache: batch_size must be a positive int, got {batch_size!r}")
    layers = [block.mixer.allocate_state(batch_size, dtype=dtype, device=device, ssm_dtype=state_dtype)
              for block in model.backbone.layers]
    return InferenceCache(layers=layers)
