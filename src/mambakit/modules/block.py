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

from ..ops import add_rms_norm
from .fusion import autocast_input_dtype, reads_as_plain
from .norm import RMSNorm
from .state import MixerState


def add_and_norm(hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                 residual_in_fp32: bool, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = hidden + residual; normed = norm(residual in norm's dtype); residual in fp32 when asked.

    A plain RMSNorm goes through the fused `add_rms_norm` op (on CUDA one Triton kernel forward and one
    backward), other norms (LayerNorm, a hooked or adapted norm) are called as modules after the unfused add.
    Same numbers. out_dtype: the dtype the normed output is written in by the fused op (the autocast dtype the
    next op casts it to, `fusion.autocast_input_dtype`); a norm called as a module keeps its own.
    """
    if reads_as_plain(norm, RMSNorm):
        return add_rms_norm(hidden, residual, norm.weight, eps=norm.eps,
                            residual_dtype=torch.float32 if residual_in_fp32 else None, out_dtype=out_dtype)
    residual = hidden if residual is None else hidden + residual
    normed = norm(residual.to(norm.weight.dtype))
    residual = residual.float() if residual_in_fp32 else residual
    # never the input itself: under FSDP2 that output would be a view (see add_rms_norm_torch)
    return normed, residual.clone() if residual is hidden else residual


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
        fused = None
        if isinstance(cache, MixerState) and hidden_states.shape[1] == 1 and seq_idx is None:
            # a decode step: the mixer may fold this block's norm into its first kernel (None: it does not)
            step = getattr(self.mixer, "fused_block_step", None)
            if step is not None:
                fused = step(hidden_states, residual, self.norm, self.residual_in_fp32, cache)
        if fused is not None:
            hidden_states, residual = fused
        else:
            weight = getattr(self.norm, "weight", None)
            out_dtype = None if weight is None else autocast_input_dtype(self.mixer, hidden_states, weight.dtype)
            hidden_states, residual = add_and_norm(hidden_states, residual, self.norm, self.residual_in_fp32,
                                                   out_dtype)
            hidden_states = self.mixer(hidden_states, cache=cache, seq_idx=seq_idx)
        if self.mlp is not None:
            hidden_states, residual = add_and_norm(hidden_states, residual, self.norm2, self.residual_in_fp32)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual
