"""Mamba-1 with each of Δ, B, C selective or not: the ablation of the Mamba paper's Table 7 (Section 4.6.2).

Shapes (legend): B batch, L seqlen, D d_inner, N d_state, R dt_rank.

    selective (Mamba-1):   dt = dt_proj(x_proj(x)[:R]) (B, L, D);  B, C = x_proj(x)[R:] (B, L, N) each
    not selective:         dt = 0, so Δ = softplus(dt_bias): one learned step per channel, (D,)
                           B, C = learned per-channel parameters (D, N), the same at every position (as S4)

x_proj only produces the selective parts (R for Δ, N for B, N for C). When B or C is a parameter, both go to the
scan as (..., D, N) (ngroups = D). With every flag True the layer computes exactly Mamba1 (parameters, init,
cache, decode step); it always runs the ops one by one (the fused `mamba1_inner` op is the selective layer only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mamba1 import Mamba1


class Mamba1Ablation(Mamba1):
    """Mamba-1 mixer with selective_dt / selective_B / selective_C flags.   (B, L, M) -> (B, L, M).

    Arguments: Mamba1's, plus selective_dt, selective_B, selective_C (all True: Mamba1 itself).

    Example:
        >>> layer = Mamba1Ablation(d_model=64, selective_B=False, selective_C=False)   # only Δ selective
        >>> y = layer(torch.randn(2, 100, 64))        # (2, 100, 64)
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, selective_dt: bool = True, selective_B: bool = True,
                 selective_C: bool = True, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                         dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor,
                         conv_bias=conv_bias, bias=bias, use_fast_path=use_fast_path, layer_idx=layer_idx,
                         device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.selective_dt, self.selective_B, self.selective_C = selective_dt, selective_B, selective_C
        self._sizes = [self.dt_rank * selective_dt, d_state * selective_B, d_state * selective_C]
        self.x_proj = nn.Linear(self.d_inner, sum(self._sizes), bias=False, **factory) if sum(self._sizes) else None
        if not selective_B:  # S4D's B = 1 initialisation
            self.B_param = nn.Parameter(torch.ones(self.d_inner, d_state, **factory))
        if not selective_C:  # S4D's C ~ N(0, 1/N), so that <C, h> starts at unit scale
            self.C_param = nn.Parameter(torch.randn(self.d_inner, d_state, **factory) / math.sqrt(d_state))
        self.fused = False

    def _ssm_params(self, x: torch.Tensor):
        """(..., D) -> dt (..., D), B and C ((..., N) both selective, else (..., D, N) both), the scan's dt bias."""
        lead = x.shape[:-1]
        parts = self.x_proj(x).split(self._sizes, dim=-1) if self.x_proj is not None else (None, None, None)
        dt_low, B, C = parts
        dt = F.linear(dt_low, self.dt_proj.weight) if self.selective_dt else x.new_zeros(x.shape)
        if not (self.selective_B and self.selective_C):
            shape = (*lead, self.d_inner, self.d_state)
            B = B[..., None, :].expand(shape) if self.selective_B else self.B_param.to(x.dtype).expand(shape)
            C = C[..., None, :].expand(shape) if self.selective_C else self.C_param.to(x.dtype).expand(shape)
        return dt, B, C, self.dt_proj.bias
