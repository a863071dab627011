"""Triton kernel of one selective-scan step (Mamba-1 decoding): read the state once, write it once.

Shapes (legend): B batch, D dim (channels), G ngroups, N dstate. Tile: BD channels x BN states
(N padded to a power of two), N contiguous, so the (B, D, N) state streams through coalesced.

    dt' = softplus(dt + dt_bias);   h <- exp(dt' A) h + dt' x B;   y = (<C, h> + D x) * silu(z)

Decoding is memory-bound: 8 bytes of state traffic per (channel, state) against ~5 flops, so the
kernel is a plain streaming pass; one launch per token, no autotuning.

With `dt_proj_weight` (Mamba-1's dt_proj, (D, R), R = dt_rank ~ d_model / 16) the kernel also takes dt's
low-rank input (B, R) and computes dt = W dt_low per channel in float32: a (BD, R) tile of W per program,
which saves the separate matmul launch (at batch 1 a decode step is bound by launches, not bytes).

With `xdbl_partials` ((P, B, R + 2N) float32: x_proj's output as P partial sums over channel blocks, written by
`mamba1_step`'s first kernel, `ops/mamba_inner/triton_mamba1_step.py`) the kernel sums them itself (+ x_proj's
bias, rounded to x's dtype as F.linear would round x_proj's output) and takes dt_low, B and C from the sum: the
x_proj reduction needs no launch of its own. Partials mode implies dt_proj_weight and one group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import pdl_launch
from ..dispatch import triton_interpret
from ..ssd.triton_common import to_dtype
from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import LOG2E, dt_softplus_sigmoid, pdl_enter, tl_compute_dtype, tl_dtype

__all__ = ["selective_state_update_triton"]


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _xdbl_sum(row_ptr, xb_ptr, q, q_ok, n_part, s_dtp, BP: tl.constexpr, XB: tl.constexpr, XDT: tl.constexpr,
              EMULATE: tl.constexpr):
    """x_proj's outputs q of one row from its partial sums: sum over the P partials (+ bias), rounded to XDT."""
    p = tl.arange(0, BP)
    v = tl.sum(tl.load(row_ptr + p[:, None] * s_dtp + q[None, :], mask=(p < n_part)[:, None] & q_ok[None, :],
                       other=0.0), axis=0)
    if XB:
        v += tl.load(xb_ptr + q, mask=q_ok, other=0.0).to(tl.float32)
    return to_dtype(v, XDT, EMULATE)


@fast_launch
@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, y_ptr, w_ptr, xb_ptr,
    dim, dstate, group_size, rank, n_part,
    s_hb, s_hd, s_xb, s_dtb, s_zb, s_Bb, s_Bg, s_Cb, s_Cg, s_Ad, s_An, s_yb, s_wd, s_dtp,
    BD: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, ACC: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT_PROJ: tl.constexpr,
    LIBDEVICE: tl.constexpr, PARTIALS: tl.constexpr = False, BP: tl.constexpr = 1, XB: tl.constexpr = False,
    XDT: tl.constexpr = tl.float32, EMULATE: tl.constexpr = False, SUB: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    """Program (pid_d, pid_b): row pid_b, channels [pid_d SUB BD, (pid_d + 1) SUB BD) in SUB blocks of BD.
    PDL: launched with programmatic dependent launch; waits for the previous kernel first."""
    pdl_enter(PDL)
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BN)  # (BN,)
    n_ok = n < dstate
    r = tl.arange(0, BR)
    r_ok = r < rank
    if PARTIALS:  # x_proj's outputs of this row, summed once for all the program's channels; one group
        row = dt_ptr + pid_b * s_dtb
        low = _xdbl_sum(row, xb_ptr, r, r_ok, n_part, s_dtp, BP, XB, XDT, EMULATE).to(ACC)
        Bv = _xdbl_sum(row, xb_ptr, rank + n, n_ok, n_part, s_dtp, BP, XB, XDT, EMULATE).to(ACC)[None, :]
        Cv = _xdbl_sum(row, xb_ptr, rank + dstate + n, n_ok, n_part, s_dtp, BP, XB, XDT, EMULATE).to(ACC)[None, :]
    elif DT_PROJ:
        low = tl.load(dt_ptr + pid_b * s_dtb + r, mask=r_ok, other=0.0).to(ACC)
    for sub in tl.static_range(SUB):
        d = (pid_d * SUB + sub) * BD + tl.arange(0, BD)  # (BD,)
        d_ok = d < dim
        ok = d_ok[:, None] & n_ok[None, :]
        h_ptrs = state_ptr + pid_b * s_hb + d[:, None] * s_hd + n[None, :]
        h = tl.load(h_ptrs, mask=ok, other=0.0).to(ACC)
        x = tl.load(x_ptr + pid_b * s_xb + d, mask=d_ok, other=0.0).to(ACC)
        if DT_PROJ:  # dt = W dt_low: (BD, R) @ (R,), summed in ACC precision
            w = tl.load(w_ptr + d[:, None] * s_wd + r[None, :], mask=d_ok[:, None] & r_ok[None, :],
                        other=0.0).to(ACC)
            dtv = tl.sum(w * low[None, :], axis=1)
        else:
            dtv = tl.load(dt_ptr + pid_b * s_dtb + d, mask=d_ok, other=0.0).to(ACC)
        bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(ACC) if HAS_BIAS else 0.0
        delta, _ = dt_softplus_sigmoid(dtv, bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
        A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=ok, other=0.0).to(ACC)
        if not PARTIALS:
            grp = (d // group_size)[:, None]  # a tile may straddle groups: gather B, C rows per channel
            Bv = tl.load(B_ptr + pid_b * s_Bb + grp * s_Bg + n[None, :], mask=ok, other=0.0).to(ACC)
            Cv = tl.load(C_ptr + pid_b * s_Cb + grp * s_Cg + n[None, :], mask=ok, other=0.0).to(ACC)
        h = tl.exp2(delta[:, None] * (A * LOG2E)) * h + (delta * x)[:, None] * Bv
        tl.store(h_ptrs, h.to(state_ptr.dtype.element_ty), mask=ok)
        y = tl.sum(h * Cv, axis=1)
        if HAS_D:
            y += tl.load(D_ptr + d, mask=d_ok, other=0.0).to(ACC) * x
        if HAS_Z:
            zf = tl.load(z_ptr + pid_b * s_zb + d, mask=d_ok, other=0.0).to(ACC)
            y = y * zf * tl.sigmoid(zf)
        tl.store(y_ptr + pid_b * s_yb + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------
# launcher / public entry
# ----------------------------------------------------------------------------------------------


def selective_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor | None,
    C: torch.Tensor | None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_proj_weight: torch.Tensor | None = None,
    *,
    xdbl_partials: torch.Tensor | None = None,
    x_proj_bias: torch.Tensor | None = None,
    block_d: int | None = None,
    sub_blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the selective scan on the Triton kernel; `state` is updated in place and returned.

    Args:
        state: (batch, dim, dstate) float32 (float64 runs the step in float64; bf16 / fp16 are read into float32
            and rounded back when stored).
        x, dt, z: (batch, dim).   A: (dim, dstate) real.   B, C: (batch, ngroups, dstate).
        D, dt_bias: (dim,).
        dt_proj_weight: (dim, rank): dt is then (batch, rank) and the kernel uses dt @ dt_proj_weight^T.
        xdbl_partials: (P, batch, rank + 2 dstate) float32 partial sums of x_proj's output (then dt, B and C
            are None, dt_proj_weight is required, one group); x_proj_bias: (rank + 2 dstate,) added to their sum.
        block_d: channels per block (default: ~4K states per block, fewer at small batches); sub_blocks: blocks
            per program, one after the other (with partials: their sum is read once for all of them).
    Returns:
        y (batch, dim) in x's dtype, and `state` itself (now holding the new state).

    Example:
        >>> y, state = selective_state_update_triton(state, x_t, dt_t, A, B_t, C_t, dt_softplus=True)
    """
    if A.is_complex():
        raise ValueError("selective_state_update_triton: complex A is not supported; use 'reference' or 'torch'")
    batch, dim, dstate = state.shape
    partials = xdbl_partials is not None
    if partials and dt_proj_weight is None:
        raise ValueError("selective_state_update_triton: xdbl_partials needs dt_proj_weight (dt_low is in them)")
    ngroups = 1 if partials else B.shape[1]
    if state.stride(-1) != 1:
        raise ValueError(f"selective_state_update_triton: state must have a contiguous last dim, got strides "
                         f"{tuple(state.stride())}")
    acc = tl_compute_dtype(state.dtype)
    if partials:
        dt = xdbl_partials if xdbl_partials.stride(-1) == 1 else xdbl_partials.contiguous()
        B = C = dt[0]  # unread: dt, B and C come from the partials
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    D = D if D is None else D.contiguous()  # read as dense (dim,) vectors
    dt_bias = dt_bias if dt_bias is None else dt_bias.contiguous()
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    bn = next_power_of_2(dstate)
    bd = max(1, min(next_power_of_2(dim), 4096 // bn))  # ~4K states per program
    rank = 0 if dt_proj_weight is None else dt_proj_weight.shape[1]
    br = next_power_of_2(max(rank, 1))
    if dt_proj_weight is not None:
        if dt_proj_weight.stride(-1) != 1:
            dt_proj_weight = dt_proj_weight.contiguous()
        bd = max(1, min(bd, 4096 // br))  # the (BD, R) tile of W stays in registers (~32 per thread)
        # small batches: more, smaller programs, so that the step is spread over the SMs (latency, not bytes)
        while bd > 16 and cdiv(dim, bd) * batch < 64:
            bd //= 2
    bd = block_d or bd
    dummy = y
    grid = (cdiv(dim, bd * sub_blocks), batch)
    pdl = pdl_launch(x.device)
    _state_update_kernel[grid](
        state, x, dt, z if z is not None else dummy, B, C, A, D if D is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y, dt_proj_weight if dt_proj_weight is not None else dummy,
        x_proj_bias if x_proj_bias is not None else dummy,
        dim, dstate, dim // ngroups, rank, dt.shape[0] if partials else 1,
        state.stride(0), state.stride(1), x.stride(0), dt.stride(-2), z.stride(0) if z is not None else 0,
        B.stride(0), B.stride(-2), C.stride(0), C.stride(-2), A.stride(0), A.stride(1), y.stride(0),
        dt_proj_weight.stride(0) if dt_proj_weight is not None else 0, dt.stride(0) if partials else 0,
        BD=bd, BN=bn, BR=br, ACC=acc, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, DT_PROJ=dt_proj_weight is not None, LIBDEVICE=not triton_interpret(),
        PARTIALS=partials, BP=next_power_of_2(dt.shape[0]) if partials else 1, XB=x_proj_bias is not None,
        XDT=tl_dtype(x.dtype), EMULATE=triton_interpret(), SUB=sub_blocks, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return y, state
