"""Mamba-1 without the output gate: the ungated block of the Mamba paper's Table 1 ("-" architecture, S6 layer).

Shapes (legend): B batch, L seqlen, M d_model, D d_inner, N d_state.

    x = in_proj(u)                                      (B, L, D)   no z half: in_proj is D wide, not 2 D
    x = silu(causal_conv1d(x));  (dt, B, C) = x_proj(x) as Mamba-1
    y = selective_scan(x, dt, A, B, C, D)               no silu(z) factor
    out = out_proj(y)                                   (B, L, M)

Everything else (parameter names, initialisation, cache layout, decode step) is `Mamba1`'s, which this
subclasses; only the projection width and the missing gate differ. The fused `mamba1_inner` op computes
the gated block, so this layer always runs the ops one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from .mamba1 import Mamba1
from .state import MixerState


class Mamba1Ungated(Mamba1):
    """Mamba-1 mixer with no z gate.   forward(hidden_states (B, L, M), cache=None, seq_idx=None) -> (B, L, M).

    Arguments and defaults are Mamba1's.

    Example:
        >>> layer = Mamba1Ungated(d_model=64)
        >>> y = layer(torch.randn(2, 100, 64))        # (2, 100, 64)
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                         dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor,
                         conv_bias=conv_bias, bias=bias, use_fast_path=use_fast_path, layer_idx=layer_idx,
                         device=device, dtype=dtype)
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=bias, device=device, dtype=dtype)
        self.fused = False

    def _mix(self, x: torch.Tensor, cache: MixerState | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """in_proj's output x (B, L, D) -> the scan output (B, L, D), advancing `cache` when given."""
        keep = cache is not None
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                          initial_state=cache.conv_state if keep else None, return_final_state=keep, seq_idx=seq_idx)
        if keep:
            x, conv_final = x
        dt, B, C, dt_bias = self._ssm_params(x)  # dt_bias None: an adapted dt_proj added its bias already
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, dt, A, B, C, D=self.D.float(), dt_bias=None if dt_bias is None else dt_bias.float(),
                           dt_softplus=True,
                           initial_state=cache.ssm_state if keep else None, return_final_state=keep, seq_idx=seq_idx)
        if keep:
            y, ssm_final = y
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(ssm_final)
        return y

    def step(self, hidden_states: torch.Tensor, cache: MixerState) -> torch.Tensor:
        """One token: (B, 1, M) -> (B, 1, M), advancing `cache` in place."""
        x = self.in_proj(hidden_states[:, 0])  # (B, D)
        x = causal_conv1d_update(cache.conv_state, x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        dt, B, C, dt_bias = self._ssm_params(x)
        y = selective_state_update(cache.ssm_state, x, dt, -torch.exp(self.A_log.float()), B, C, D=self.D.float(),
                                   dt_bias=None if dt_bias is None else dt_bias.float(), dt_softplus=True)
        return self.out_proj(y)[:, None]
