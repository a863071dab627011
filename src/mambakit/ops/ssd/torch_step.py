"""One recurrent SSD step in PyTorch (the "torch" backend of `mambakit.ops.ssd_state_update`), for decoding.

Shapes (legend): b batch, H nheads, P headdim, G ngroups, R = H / G heads per group, N dstate.

    dt' = clamp(softplus(dt + dt_bias), *dt_limit)
    h  <- exp(dt' A) h + (dt' x) B^T        (in place: h is (b, H, P, N), viewed as (b*G, R*P, N))
    y   = h C + D x,  then y *= silu(z)

A decode step is a handful of small ops on a state that fits in cache, so the op count matters more
than flops: the decay is one in-place scale, the input one batched rank-1 update (baddbmm with K = 1)
and the readout one bmm, each over all R heads of a group at once (B and C are not repeated per head).
Under torch.compile (the compiled CPU decode step, `generation/compiled.py`) the same update is written as one
broadcast expression instead, which inductor fuses into a single pass over the state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import as_dtype
from .torch_ssd import effective_dt_as
from .reference import final_state_dtype

__all__ = ["ssd_state_update_torch"]


def ssd_state_update_torch(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SSD step; updates `state` in place and returns (y, state).

    Args:
        state: (b, H, P, N) float32 or float64.  x, z: (b, H, P).  dt: (b, H).  A, dt_bias: (H,).
        B, C: (b, G, N).  D: (H,) or (H, P).
    Returns:
        y (b, H, P) in x's dtype, and `state` itself, now holding the new state.

    Example:
        >>> state = torch.zeros(2, 8, 64, 128)
        >>> y, state = ssd_state_update_torch(state, x_t, dt_t, A, B_t, C_t, D=D, dt_bias=dt_bias, dt_softplus=True)
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    R = H // G
    # math in the state's precision, or float64 when the inputs are float64
    cd = torch.promote_types(state.dtype, final_state_dtype(x.dtype))
    dt_ = effective_dt_as(dt, dt_bias, dt_softplus, dt_limit, cd)  # (b, H)
    x_ = as_dtype(x, cd)

    if torch.compiler.is_compiling():
        return _compiled_step(state, x_, dt_, A, B, C, D, z, cd, x.dtype)
    h = state if (state.dtype == cd and state.is_contiguous()) else state.to(cd).contiguous()
    # exp(dt' A) <= 1 for A <= 0: the old state only shrinks
    h.view(b, H, P * N).mul_(torch.exp(dt_ * as_dtype(A, cd))[..., None])
    h_g = h.view(b * G, R * P, N)
    h_g.baddbmm_((x_ * dt_[..., None]).reshape(b * G, R * P, 1), as_dtype(B, cd).reshape(b * G, 1, N))
    y = torch.bmm(h_g, as_dtype(C, cd).reshape(b * G, N, 1)).view(b, H, P)
    if D is not None:
        D_ = as_dtype(D, cd)
        y = y.addcmul_(D_[:, None] if D_.dim() == 1 else D_, x_)  # y is bmm's fresh output: updated in place
    if z is not None:
        y = y.mul_(F.silu(as_dtype(z, cd)))
    if h is not state:
        state.copy_(h)
    return as_dtype(y, x.dtype), state


def _compiled_step(state, x_, dt_, A, B, C, D, z, cd, out_dtype):
    """The same step as one broadcast expression, for torch.compile: inductor fuses the decay, the rank-1 update,
    the write back into `state` and the readout's sum over N into one pass over the state (the eager form's
    baddbmm / bmm are library calls that inductor cannot fuse, and its in-place update becomes a copy)."""
    R = x_.shape[1] // B.shape[1]  # heads per group
    B_ = as_dtype(B, cd).repeat_interleave(R, dim=1)[:, :, None, :]  # (b, H, 1, N)
    C_ = as_dtype(C, cd).repeat_interleave(R, dim=1)[:, :, None, :]
    decay = torch.exp(dt_ * as_dtype(A, cd))[..., None, None]  # (b, H, 1, 1)
    h = state.to(cd) * decay + (x_ * dt_[..., None])[..., None] * B_  # (b, H, P, N)
    state.copy_(h)
    y = (h * C_).sum(-1)  # (b, H, P)
    if D is not None:
        D_ = as_dtype(D, cd)
        y = y + (D_[:, None] if D_.dim() == 1 else D_) * x_
    if z is not None:
        y = y * F.silu(as_dtype(z, cd))
    return as_dtype(y, out_dtype), state
