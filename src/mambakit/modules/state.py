"""Per-layer recurrent state of a Mamba mixer, for inference.

Shapes (legend): B batch, C conv channels, W conv width, D Mamba-1 inner dim, N dstate,
H heads, P headdim.

    conv_state: (B, C, W - 1)  the last W-1 conv inputs, oldest first, in the activation dtype
    ssm_state:  (B, D, N) for Mamba-1, (B, H, P, N) for Mamba-2, float32

A mixer reads and advances its state in place; `InferenceCache` (below) holds one per layer plus the
number of tokens consumed, and `MambaLM.allocate_cache` builds it from the model's own layers.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .attention import KVState


@dataclass
class MixerState:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def ssm_state_in(self) -> torch.Tensor:
        """The ssm state as the sequence ops (prefill) take it: float32 / float64 (a bf16 / fp16 cache widened to a
        float32 copy; the mixer copies the final state back, rounding it)."""
        s = self.ssm_state
        return s if s.dtype in (torch.float32, torch.float64) else s.float()

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


class InferenceCache:
    """Per-layer recurrent states of `batch_size` sequences; `seqlen_offset` counts the tokens consumed.

    layers[i]: the MixerState of layer i (a KVState for the attention layers of a hybrid or a Transformer).
    The states are updated in place by the mixers (their tensors keep their addresses, so a captured CUDA
    graph stays valid); the position moves in one place only, `advance(n)`, called by the model once per
    forward over n tokens (and by whoever replays a captured step). `seqlen_offset` is read-only: a cache
    that starts at another position says so in its constructor.

    With a ragged batch (rows of different lengths) `seqlen_offset` counts the longest row; a cache whose
    `seqlen_offset` is 0 holds no tokens (`prefill` zeroes it before use).

    Example:
        >>> cache = model.allocate_cache(batch_size=2)
        >>> _ = model(ids_BL, cache=cache)        # the model advances it by L
        >>> cache.seqlen_offset                   # L
    """

    __slots__ = ("layers", "_seqlen_offset")

    def __init__(self, layers: "list[MixerState | KVState]", seqlen_offset: int = 0):
        if not isinstance(seqlen_offset, int) or isinstance(seqlen_offset, bool) or seqlen_offset < 0:
            raise ValueError(f"InferenceCache: seqlen_offset must be an int >= 0, got {seqlen_offset!r}")
        self.layers = list(layers)
        self._seqlen_offset = seqlen_offset

    @property
    def seqlen_offset(self) -> int:
        return self._seqlen_offset

    def advance(self, n: int) -> "InferenceCache":
        """Move the position by `n` >= 0 tokens (the states themselves were updated by the mixers)."""
        n = operator.index(n)  # a Python int, never a tensor: this runs once per decode step, without a host sync
        if n < 0:
            raise ValueError(f"InferenceCache.advance: n must be >= 0, got {n}")
        self._seqlen_offset += n
        return self

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def reset(self) -> "InferenceCache":
        """Zero every state in place (the tensors keep their addresses: a captured CUDA graph stays valid)."""
        for state in self.layers:
            state.zero_()
        self._seqlen_offset = 0
        return self

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def index_select(self, rows: torch.Tensor) -> "InferenceCache":
        """A new cache holding copies of the states of `rows` (a 1-D index tensor on the cache's device)."""
        return InferenceCache([s.index_select(rows) for s in self.layers], seqlen_offset=self._seqlen_offset)

    def index_copy_(self, rows: torch.Tensor, source: "InferenceCache") -> "InferenceCache":
        """Write `source`'s states (len(rows) sequences) into `rows` of this cache, in place."""
        for dst, src in zip(self.layers, source.layers):
            dst.index_copy_(rows, src)
        return self

    def copy_from_(self, source: "InferenceCache") -> "InferenceCache":
        """Make this cache hold `source`'s states and position, in place (the tensors keep their addresses and
        dtypes: a captured CUDA graph's cache can take a saved state). A source of one row fills every row.

        Raises ValueError when the layer counts or the rows differ (other than a source of one row)."""
        if len(source.layers) != len(self.layers):
            raise ValueError(f"copy_from_: the source has {len(source.layers)} layers, this cache {len(self.layers)}")
        if source.batch_size not in (1, self.batch_size):
            raise ValueError(f"copy_from_: the source holds {source.batch_size} rows, this cache {self.batch_size} "
                             "(a source of one row fills any number)")
        for dst, src in zip(self.layers, source.layers):
            if not (isinstance(dst, MixerState) and isinstance(src, MixerState)):
                raise ValueError(f"copy_from_: Mamba states only, got {type(src).__name__} into {type(dst).__name__}")
            dst.conv_state.copy_(src.conv_state.expand_as(dst.conv_state))
            dst.ssm_state.copy_(src.ssm_state.expand_as(dst.ssm_state))
        self._seqlen_offset = source.seqlen_offset
        return self

    def __repr__(self) -> str:
        return (f"InferenceCache(layers={len(self.layers)}, batch_size={self.batch_size}, "
                f"seqlen_offset={self._seqlen_offset})")
