"""The "triton" backend of `mambakit.ops.ssd_state_update`: one recurrent SSD step for decoding.

Shapes (legend): b batch, H nheads, P headdim, G ngroups, N dstate.

    dt' = clamp(softplus(dt + dt_bias), *dt_limit)
    h   = exp(dt' A) h + dt' x B^T          (P, N) per head, updated in place
    y   = h C + D x ;  y *= silu(z)

One program per (P block, head, batch row): it reads and writes its (BLOCK_P, N) slice of the state
once, so the step moves the state twice (read + write) and little else. It is bound by that traffic;
small P blocks keep enough programs in flight when batch * heads is small (decode at batch 1).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common import pdl_launch
from ..dispatch import triton_interpret
from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import dt_transform, pdl_enter, silu
from .triton_common import to_dtype

__all__ = ["ssd_state_update_triton"]


@fast_launch
@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    nheads, headdim, dstate, hpg, lo, hi,
    s_st_b, s_st_h, s_st_p, s_x_b, s_x_h, s_dt_b, s_dt_h, s_B_b, s_B_g, s_C_b, s_C_g, s_z_b, s_z_h,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # launched with programmatic dependent launch: wait for the previous kernel first
    pid_p = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.cast(tl.program_id(2), tl.int64)
    g = h // hpg
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    v = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h).to(tl.float32)
    dtp = dt_transform(v, lo, hi, SOFTPLUS, HAS_LIMIT)
    decay = tl.exp(dtp * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * s_x_b + h * s_x_h + offs_p, mask=pmask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_B_b + g * s_B_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C_b + g * s_C_g + offs_n, mask=nmask, other=0.0).to(tl.float32)
    st_ptrs = state_ptr + b * s_st_b + h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :]
    st_mask = pmask[:, None] & nmask[None, :]
    # math in float32 (float64 when the caller holds a float64 state); bf16 / fp16 states are widened here
    st = tl.load(st_ptrs, mask=st_mask, other=0.0)
    if st.dtype != tl.float64:
        st = st.to(tl.float32)
    st = st * decay + (dtp * x)[:, None] * Bv[None, :]
    tl.store(st_ptrs, st.to(state_ptr.dtype.element_ty), mask=st_mask)  # bf16 / fp16 caches round here
    y = tl.sum(st * Cv[None, :], axis=1).to(tl.float32)
    if HAS_D:
        if D_PER_CHANNEL:
            y += tl.load(D_ptr + h * headdim + offs_p, mask=pmask, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    if HAS_Z:
        y *= silu(tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_p, mask=pmask, other=0.0).to(tl.float32))
    tl.store(y_ptr + (b * nheads + h) * headdim + offs_p, to_dtype(y, y_ptr.dtype.element_ty, EMULATE),
             mask=pmask)


def ssd_state_update_triton(
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
    """One SSD decode step in Triton; arguments as in `mambakit.ops.ssd_state_update` (validated there).

    Args:
        state: (b, H, P, N) float32 (or float64; bf16 / fp16 are updated in float32 and rounded back),
            updated in place when its last dim is contiguous.
        x, z: (b, H, P).  dt: (b, H).  A: (H,).  B, C: (b, G, N).  D: (H,) or (H, P).  dt_bias: (H,).
    Returns:
        y: (b, H, P) in x's dtype, and the new state (the same tensor as `state` when updated in place).

    Example:
        >>> state = torch.zeros(2, 8, 64, 128, device="cuda")
        >>> y, state = ssd_state_update_triton(state, x_t, dt_t, A, B_t, C_t, D=D, dt_bias=dt_bias, dt_softplus=True)
    """
    b, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    work = state if state.stride(-1) == 1 else state.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    C = C if C.stride(-1) == 1 else C.contiguous()
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    D = D.contiguous() if D is not None else None
    y = torch.empty(b, H, P, device=x.device, dtype=x.dtype)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_limit = lo > 0.0 or hi < math.inf
    block_n = max(16, next_power_of_2(N))
    block_p = min(next_power_of_2(P), max(4, 2048 // block_n))
    zz = z if z is not None else x
    grid = (cdiv(P, block_p), H, b)
    pdl = pdl_launch(x.device)
    _ssd_step_kernel[grid](
        work, x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A, y,
        H, P, N, H // G, lo, hi if has_limit else 0.0,
        work.stride(0), work.stride(1), work.stride(2), x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), zz.stride(0), zz.stride(1),
        BLOCK_P=block_p, BLOCK_N=block_n, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
        HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        EMULATE=triton_interpret(), PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return y, work
