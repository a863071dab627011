"""The inference cache, as generation uses it: one recurrent state per layer plus the number of tokens consumed.

Shapes (legend): B batch, C conv channels, W conv width, D Mamba-1 inner dim, N dstate, H heads,
P headdim.

    layers[i].conv_state: (B, C, W - 1)   the last W-1 conv inputs, in the activation dtype
    layers[i].ssm_state:  (B, D, N) for Mamba-1, (B, H, P, N) for Mamba-2, float32 (bfloat16 when
                          allocated with state_dtype=torch.bfloat16)

A Mamba cache has a fixed size whatever the prefix length: that is what makes decoding cost the same
per token at any position, and what lets a CUDA graph capture the decode step once: the model's
step path updates these tensors in place, so their addresses never change.

The class lives beside the mixers' state (`mambakit.modules.state`) and the model allocates its own
(`MambaLM.allocate_cache`): generation only asks for one and reads its position.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.state import InferenceCache, MixerState

__all__ = ["InferenceCache", "allocate_cache", "first_rows", "row_buckets"]


def allocate_cache(model: nn.Module, batch_size: int, dtype: torch.dtype | None = None,
                   device: torch.device | None = None, state_dtype: torch.dtype | None = None) -> InferenceCache:
    """Zero cache for `batch_size` sequences: `model.allocate_cache(...)` (see `MambaLM.allocate_cache`).

    Conv windows in `dtype` (default: the model's), SSM states float32; `state_dtype=torch.bfloat16`
    keeps the Mamba-1 / Mamba-2 SSM states in bfloat16 (updated in float32, rounded back each token).

    Example:
        >>> cache = allocate_cache(model, batch_size=4)
        >>> cache.layers[0].ssm_state.shape        # Mamba-2: (4, nheads, headdim, d_state)
    """
    return model.allocate_cache(batch_size, dtype=dtype, device=device, state_dtype=state_dtype)


def first_rows(cache: InferenceCache, rows: int, seqlen_offset: int | None = None) -> InferenceCache:
    """The first `rows` sequences of a Mamba cache, as views (a step on it updates them in place), at
    `seqlen_offset` (default: the cache's, at least 1). What a CUDA graph captured at a smaller batch reads."""
    return InferenceCache([MixerState(s.conv_state[:rows], s.ssm_state[:rows]) for s in cache.layers],
                          seqlen_offset=max(cache.seqlen_offset, 1) if seqlen_offset is None else seqlen_offset)


def row_buckets(limit: int) -> list[int]:
    """The row counts that graphs (or compiled steps) are made for: 1, 2, 4, ... below `limit`, then `limit`."""
    return [1 << i for i in range(limit.bit_length()) if 1 << i < limit] + [limit]
