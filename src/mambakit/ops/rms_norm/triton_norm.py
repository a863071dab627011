"""Triton kernels of RMSNorm, plain and gated by silu(z), with per-group statistics.

Shapes (legend): N rows (all leading dims flattened), H hidden, G group_size, H // G groups,
BR/BG the (rows, channels) tile of one program; a program owns one group of BR rows.

    h = x * silu(z) (gate first) or x;   rstd = 1 / sqrt(mean_G(h^2) + eps);   xhat = h * rstd
    y = xhat * weight, times silu(z) when the gate comes after the norm

Forward: one pass over x (and z), writes y and rstd (N, H/G) in float32 (tiny: saved for the
backward instead of recomputing the mean square).
Backward, per row and group, with g = silu(z) and dg = silu'(z) = sig(z) (1 + z (1 - sig(z))):
    dxhat = dy * weight (* g when the gate comes after);  c = mean_G(dxhat * xhat)
    dh = rstd * (dxhat - xhat * c)
    gate first:  dx = dh * g,  dz = dh * x * dg;    gate after: dx = dh,  dz = dy * xhat * weight * dg
    dweight = sum over rows of dy * xhat (* g): each program sums its rows in registers and writes
    one partial row; torch sums the partials (deterministic, no atomics).
All arithmetic in float32 (float64 for float64 inputs); outputs in their inputs' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import autograd_op, compute_dtype, fake_grads, pack_grads, pdl_launch, unpack_grads
from ..triton_launch import cdiv, fast_launch, next_power_of_2, sm_count
from ..triton_math import pdl_enter, sigmoid, silu, tl_compute_dtype, tl_dtype

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, group, eps,
    stride_xr, stride_zr, stride_yr, stride_rr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, ACC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # N * H can pass 2**31
    offs_c = tl.arange(0, BLOCK_G)
    cols = pid_g * group + offs_c
    mask_r = rows < n_rows
    mask = mask_r[:, None] & (offs_c < group)[None, :]

    h = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * stride_zr + cols[None, :], mask=mask, other=0.0).to(ACC)
        gate = silu(z)
        if not NORM_BEFORE_GATE:
            h = h * gate
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / group + eps)  # (BR,)
    w = tl.load(w_ptr + cols, mask=offs_c < group, other=0.0).to(ACC)
    y = h * rstd[:, None] * w[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        y = y * gate
    tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * stride_rr + pid_g, rstd.to(rstd_ptr.dtype.element_ty), mask=mask_r)


@fast_launch
@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, z_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_part_ptr,
    n_rows, group,
    stride_xr, stride_zr, stride_dyr, stride_rr, stride_dxr, stride_dzr, stride_pr,
    ROW_TILES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, ACC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_G)
    cols = pid_g * group + offs_c
    mask_c = offs_c < group
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(ACC)[None, :]
    # per-column weight-grad sums stay 2-D across the row loop: one cross-row reduction at the end
    dw_acc = tl.zeros((BLOCK_R, BLOCK_G), dtype=ACC)

    for it in range(ROW_TILES):
        rows = ((pid_r * ROW_TILES + it) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = rows < n_rows
        mask = mask_r[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + rows * stride_rr + pid_g, mask=mask_r, other=0.0).to(ACC)[:, None]
        h = x
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * stride_zr + cols[None, :], mask=mask, other=0.0).to(ACC)
            sig = sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                h = x * gate
        xhat = h * rstd
        if HAS_Z and NORM_BEFORE_GATE:
            dy_gated = dy * gate
            dw_acc += dy_gated * xhat
            dxhat = dy_gated * w
            dz = dy * xhat * w * dgate
        else:
            dw_acc += dy * xhat
            dxhat = dy * w
        c = tl.sum(dxhat * xhat, axis=1) / group
        dh = rstd * (dxhat - xhat * c[:, None])
        if HAS_Z and not NORM_BEFORE_GATE:
            dx = dh * gate
            dz = dh * x * dgate
        else:
            dx = dh
        tl.store(dx_ptr + rows[:, None] * stride_dxr + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(dz_ptr + rows[:, None] * stride_dzr + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)

    tl.store(dw_part_ptr + pid_r * stride_pr + cols, tl.sum(dw_acc, axis=0), mask=mask_c)


@fast_launch
@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
    n_rows, hidden, eps,
    stride_xr, stride_rr, stride_yr, stride_sr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, HAS_R: tl.constexpr, STORE_RSTD: tl.constexpr,
    SUM_DT: tl.constexpr, W_DT: tl.constexpr, ACC: tl.constexpr, PDL: tl.constexpr = False,
):
    """s = x + r rounded to SUM_DT (stored in s's dtype); y = rmsnorm(s rounded to W_DT) * w (stored in y's
    dtype); rstd (N,) in ACC when STORE_RSTD (kept for the backward). PDL: launched with programmatic dependent
    launch (the norm weight loads before the wait for the previous kernel)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(ACC)
    pdl_enter(PDL)
    mask = (rows < n_rows)[:, None] & (cols < hidden)[None, :]
    v = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_R:
        v += tl.load(r_ptr + rows[:, None] * stride_rr + cols[None, :], mask=mask, other=0.0).to(ACC)
    v = v.to(SUM_DT).to(ACC)  # the sum as torch's promoted add rounds it
    tl.store(s_ptr + rows[:, None] * stride_sr + cols[None, :], v.to(s_ptr.dtype.element_ty), mask=mask)
    h = v.to(W_DT).to(ACC)  # the cast to the norm weight's dtype before normalising
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / hidden + eps)
    y = h * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=rows < n_rows)


@fast_launch
@triton.jit
def _add_rms_norm_bwd_kernel(
    s_ptr, w_ptr, rstd_ptr, dy_ptr, ds_ptr, dx_ptr, dr_ptr, dw_part_ptr,
    n_rows, hidden,
    stride_sr, stride_dyr, stride_dsr, stride_dxr, stride_drr, stride_pr,
    ROW_TILES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DS: tl.constexpr,
    HAS_R: tl.constexpr, SUM_DT: tl.constexpr, W_DT: tl.constexpr, ACC: tl.constexpr,
):
    """The backward of `_add_rms_norm_fwd_kernel` over ROW_TILES row tiles: with h = s in W_DT, xhat = h * rstd,
    dxhat = dy * w, c = mean(dxhat * xhat):   dsum = ds + (rstd (dxhat - xhat c) rounded to W_DT), in SUM_DT;
    dx = dsum (x's dtype), dr = dsum (r's dtype); one partial row of dweight = sum of dy * xhat per program."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask_c = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(ACC)
    dw_acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=ACC)
    for i in range(ROW_TILES):
        rows = ((pid * ROW_TILES + i) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = rows < n_rows
        mask = mask_r[:, None] & mask_c[None, :]
        h = tl.load(s_ptr + rows[:, None] * stride_sr + cols[None, :], mask=mask, other=0.0).to(W_DT).to(ACC)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyr + cols[None, :], mask=mask, other=0.0).to(ACC)
        xhat = h * rstd[:, None]
        dw_acc += dy * xhat
        dxhat = dy * w[None, :]
        c = tl.sum(dxhat * xhat, axis=1) / hidden
        dh = (rstd[:, None] * (dxhat - xhat * c[:, None])).to(W_DT).to(SUM_DT)  # back through the cast to W_DT
        if HAS_DS:
            ds = tl.load(ds_ptr + rows[:, None] * stride_dsr + cols[None, :], mask=mask, other=0.0).to(SUM_DT)
            dh = (dh.to(ACC) + ds.to(ACC)).to(SUM_DT)
        tl.store(dx_ptr + rows[:, None] * stride_dxr + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_R:
            tl.store(dr_ptr + rows[:, None] * stride_drr + cols[None, :], dh.to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * stride_pr + cols, tl.sum(dw_acc, axis=0), mask=mask_c)


# ----------------------------------------------------------------------------------------------
# launchers: checks, allocation, grid
# ----------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """(N, H) view (a copy only when the leading dims do not flatten or channels are strided)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _tile(group: int, elems: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, num_warps): whole groups per tile, about `elems` elements, ~16 per thread."""
    block_g = next_power_of_2(group)
    block_r = max(1, elems // block_g)
    num_warps = min(16, max(4, block_r * block_g // 512))
    return block_r, block_g, num_warps


def rms_norm_fwd(*, x2, weight, z2, eps: float, group: int, norm_before_gate: bool, elems=4096, num_warps=None):
    """y (N, H) in x's dtype and rstd (N, H // G) float32 (float64 for float64 x).

    elems / num_warps override the tile (benchmark sweeps, tests of ragged tiles).
    """
    n_rows, hidden = x2.shape
    n_groups = hidden // group
    block_r, block_g, warps = _tile(group, elems)
    num_warps = num_warps or warps
    y2 = torch.empty(n_rows, hidden, dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, n_groups, dtype=compute_dtype(x2.dtype),
                       device=x2.device)
    grid = (cdiv(n_rows, block_r), n_groups)
    _rms_norm_fwd_kernel[grid](
        x2, z2 if z2 is not None else x2, weight, y2, rstd,
        n_rows, group, eps,
        x2.stride(0), z2.stride(0) if z2 is not None else 0, y2.stride(0), rstd.stride(0),
        BLOCK_R=block_r, BLOCK_G=block_g, HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate,
        ACC=tl_compute_dtype(x2.dtype), num_warps=num_warps,
    )
    return y2, rstd


def rms_norm_bwd(*, x2, weight, z2, rstd, dy2, group: int, norm_before_gate: bool, elems=2048, num_warps=None,
                 row_tiles=None, dz_out=None):
    """(dx (N, H), dweight (H,), dz (N, H) or None), each in its input's dtype. dz_out: where dz goes, (N, H) of z's
    dtype with contiguous rows at any row stride (Mamba-2 writes it into its slice of in_proj's gradient)."""
    n_rows, hidden = x2.shape
    n_groups = hidden // group
    block_r, block_g, warps = _tile(group, elems)
    num_warps = num_warps or warps
    n_tiles = cdiv(n_rows, block_r)
    # ~8 programs per SM (a short last wave); each loops over a power-of-two number of row tiles,
    # so the weight-grad partials stay small (~1-2% of the traffic) and few variants get compiled
    if row_tiles is None:
        # off the GPU (the interpreter) a "machine" of one SM makes even tiny tests loop over row tiles
        row_tiles = min(64, next_power_of_2(max(1, n_tiles * n_groups // (8 * sm_count(x2.device, 1)))))
    n_progs = cdiv(n_tiles, row_tiles)
    dx2 = torch.empty_like(x2)
    dz2 = (dz_out if dz_out is not None else torch.empty_like(z2)) if z2 is not None else None
    if dz_out is not None and (dz_out.shape != z2.shape or dz_out.dtype != z2.dtype or dz_out.stride(1) != 1):
        raise ValueError(f"rms_norm_bwd: dz_out must be {tuple(z2.shape)} {z2.dtype} with contiguous rows, got "
                         f"{tuple(dz_out.shape)} {dz_out.dtype} strides {dz_out.stride()}")
    part = torch.empty(n_progs, hidden, dtype=rstd.dtype, device=x2.device)
    _rms_norm_bwd_kernel[(n_progs, n_groups)](
        x2, z2 if z2 is not None else x2, weight, dy2, rstd, dx2, dz2 if dz2 is not None else dx2, part,
        n_rows, group,
        x2.stride(0), z2.stride(0) if z2 is not None else 0, dy2.stride(0), rstd.stride(0), dx2.stride(0),
        dz2.stride(0) if dz2 is not None else 0, part.stride(0),
        ROW_TILES=row_tiles, BLOCK_R=block_r, BLOCK_G=block_g, HAS_Z=z2 is not None,
        NORM_BEFORE_GATE=norm_before_gate, ACC=tl_compute_dtype(x2.dtype), num_warps=num_warps,
    )
    return dx2, part.sum(0).to(weight.dtype), dz2


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


# One custom op pair (torch.library, autograd registered) on (N, H) rows; x, z, weight and the per-row-group rstd
# are kept for the backward.


def _rms_norm_fwd_impl(x2: torch.Tensor, weight: torch.Tensor, z2: torch.Tensor | None, eps: float, group: int,
                       norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x2=x2, weight=weight, z2=z2, eps=eps, group=group, norm_before_gate=norm_before_gate)


_rms_norm_fwd_op = torch.library.custom_op("mambakit::rms_norm_fwd", mutates_args=())(_rms_norm_fwd_impl)


@_rms_norm_fwd_op.register_fake
def _(x2, weight, z2, eps, group, norm_before_gate):
    acc = compute_dtype(x2.dtype)
    return x2.new_empty(x2.shape), x2.new_empty(x2.shape[0], x2.shape[1] // group, dtype=acc)


def _rms_norm_bwd_impl(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, z2: torch.Tensor | None,
                       rstd: torch.Tensor, group: int, norm_before_gate: bool) -> list[torch.Tensor]:
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    grads = rms_norm_bwd(x2=x2, weight=weight, z2=z2, rstd=rstd, dy2=dy2, group=group,
                         norm_before_gate=norm_before_gate)
    return pack_grads(grads, (x2, weight, z2))


_rms_norm_bwd_op = torch.library.custom_op("mambakit::rms_norm_bwd", mutates_args=())(_rms_norm_bwd_impl)


@_rms_norm_bwd_op.register_fake
def _(dy2, x2, weight, z2, rstd, group, norm_before_gate):
    return fake_grads((x2, weight, z2), (True, True, True))


def _rms_norm_setup_context(ctx, inputs, output):
    x2, weight, z2, eps, group, norm_before_gate = inputs
    ctx.save_for_backward(x2, weight, z2, output[1])
    ctx.group, ctx.norm_before_gate = group, norm_before_gate


def _rms_norm_backward(ctx, dy2, _drstd, bwd):
    x2, weight, z2, rstd = ctx.saved_tensors
    grads = bwd(dy2, x2, weight, z2, rstd, ctx.group, ctx.norm_before_gate)
    return *unpack_grads(grads, (True, True, z2 is not None)), None, None, None


_rms_norm_op = autograd_op("RMSNorm", _rms_norm_fwd_impl, _rms_norm_fwd_op, _rms_norm_setup_context, _rms_norm_backward,
                           _rms_norm_bwd_impl, _rms_norm_bwd_op)


# The fused residual add + norm of every block: forward (y, s, rstd), backward from (dy, ds) to (dx, dresidual,
# dweight). s (the new residual stream, saved anyway as the next block's input) and rstd (N,) are kept for the
# backward; y is never kept, so the block's norm costs no activation memory of its own.


def _sum_dtype(x_dtype: torch.dtype, r_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype x + residual is formed in (x's alone without a residual)."""
    return x_dtype if r_dtype is None else torch.promote_types(x_dtype, r_dtype)


def _acc_dtype(sum_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulator (and rstd's) dtype: float32, or float64 where the sum or the weight is float64."""
    return compute_dtype(torch.promote_types(sum_dtype, weight_dtype))


def _add_rms_norm_impl(x2: torch.Tensor, r2: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       s_dtype: torch.dtype, y_dtype: torch.dtype,
                       keep_rstd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (N, H) in y_dtype, s (N, H) in s_dtype and rstd (N,) float32 (float64 for float64 sums); rstd empty unless
    keep_rstd (a backward will follow: the decode step neither writes nor allocates it)."""
    n_rows, hidden = x2.shape
    sum_dtype = _sum_dtype(x2.dtype, None if r2 is None else r2.dtype)
    acc = _acc_dtype(sum_dtype, weight.dtype)
    # Triton's CPU interpreter truncates a float32 -> bf16 store where CUDA rounds: off the GPU y is stored wide
    # and torch rounds it (the values CUDA gives)
    y_store = y_dtype if x2.is_cuda else torch.promote_types(y_dtype, acc)
    y2 = torch.empty(n_rows, hidden, dtype=y_store, device=x2.device)
    s2 = torch.empty(n_rows, hidden, dtype=s_dtype, device=x2.device)
    rstd = torch.empty(n_rows if keep_rstd else 0, dtype=acc, device=x2.device)
    block_r, block_h, num_warps = _tile(hidden, 4096)
    # inference (decode steps): overlap the previous kernel's end; not for a weight copied right before (the kernel
    # reads it before waiting for the previous kernel)
    pdl = not keep_rstd and weight.is_contiguous() and pdl_launch(x2.device)
    _add_rms_norm_fwd_kernel[(cdiv(n_rows, block_r),)](
        x2, r2 if r2 is not None else x2, weight.contiguous(), y2, s2, rstd if keep_rstd else s2,
        n_rows, hidden, float(eps),
        x2.stride(0), r2.stride(0) if r2 is not None else 0, y2.stride(0), s2.stride(0),
        BLOCK_R=block_r, BLOCK_H=block_h, HAS_R=r2 is not None, STORE_RSTD=keep_rstd,
        SUM_DT=tl_dtype(sum_dtype), W_DT=tl_dtype(weight.dtype), ACC=tl_compute_dtype(acc), PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
    )
    return y2.to(y_dtype), s2, rstd


_add_rms_norm_op = torch.library.custom_op("mambakit::add_rms_norm_fwd", mutates_args=())(_add_rms_norm_impl)


@_add_rms_norm_op.register_fake
def _(x2, r2, weight, eps, s_dtype, y_dtype, keep_rstd):
    acc = _acc_dtype(_sum_dtype(x2.dtype, None if r2 is None else r2.dtype), weight.dtype)
    return (x2.new_empty(x2.shape, dtype=y_dtype), x2.new_empty(x2.shape, dtype=s_dtype),
            x2.new_empty(x2.shape[0] if keep_rstd else 0, dtype=acc))


def add_rms_norm_bwd(*, s2, weight, rstd, dy2, ds2, x_dtype, r_dtype, sum_dtype, elems=2048, row_tiles=None):
    """(dx (N, H) in x_dtype, dresidual (N, H) in r_dtype or None, dweight (H,) in weight's dtype) from the
    gradients of y (dy2) and of s (ds2, or None when s got none)."""
    n_rows, hidden = s2.shape
    block_r, block_h, num_warps = _tile(hidden, elems)
    n_tiles = cdiv(n_rows, block_r)
    if row_tiles is None:  # ~8 programs per SM, as `rms_norm_bwd`
        row_tiles = min(64, next_power_of_2(max(1, n_tiles // (8 * sm_count(s2.device, 1)))))
    n_progs = cdiv(n_tiles, row_tiles)
    dx2 = torch.empty(n_rows, hidden, dtype=x_dtype, device=s2.device)
    dr2 = torch.empty(n_rows, hidden, dtype=r_dtype, device=s2.device) if r_dtype is not None else None
    part = torch.empty(n_progs, hidden, dtype=rstd.dtype, device=s2.device)
    _add_rms_norm_bwd_kernel[(n_progs,)](
        s2, weight, rstd, dy2, ds2 if ds2 is not None else dy2, dx2, dr2 if dr2 is not None else dx2, part,
        n_rows, hidden,
        s2.stride(0), dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, dx2.stride(0),
        dr2.stride(0) if dr2 is not None else 0, part.stride(0),
        ROW_TILES=row_tiles, BLOCK_R=block_r, BLOCK_H=block_h, HAS_DS=ds2 is not None, HAS_R=dr2 is not None,
        SUM_DT=tl_dtype(sum_dtype), W_DT=tl_dtype(weight.dtype), ACC=tl_compute_dtype(rstd.dtype),
        num_warps=num_warps,
    )
    return dx2, dr2, part.sum(0).to(weight.dtype)


def _rows_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.numel() == 0 else (t if t.stride(-1) == 1 else t.contiguous())


def _add_rms_norm_bwd_impl(dy2: torch.Tensor, ds2: torch.Tensor | None, s2: torch.Tensor, weight: torch.Tensor,
                           rstd: torch.Tensor, x_like: torch.Tensor, r_like: torch.Tensor | None) -> list[torch.Tensor]:
    """x_like / r_like: empty tensors of x's and the residual's dtypes (their dtypes say what to return)."""
    sum_dtype = _sum_dtype(x_like.dtype, None if r_like is None else r_like.dtype)
    dx2, dr2, dw = add_rms_norm_bwd(s2=s2, weight=weight, rstd=rstd, dy2=_rows_or_none(dy2), ds2=_rows_or_none(ds2),
                                    x_dtype=x_like.dtype, r_dtype=None if r_like is None else r_like.dtype,
                                    sum_dtype=sum_dtype)
    return [dx2, dr2 if dr2 is not None else dx2.new_empty(0), dw]


_add_rms_norm_bwd_op = torch.library.custom_op("mambakit::add_rms_norm_bwd", mutates_args=())(_add_rms_norm_bwd_impl)


@_add_rms_norm_bwd_op.register_fake
def _(dy2, ds2, s2, weight, rstd, x_like, r_like):
    return [s2.new_empty(s2.shape, dtype=x_like.dtype),
            s2.new_empty(s2.shape, dtype=r_like.dtype) if r_like is not None else s2.new_empty(0),
            weight.new_empty(weight.shape)]


def _add_rms_norm_setup_context(ctx, inputs, output):
    x2, r2, weight, _eps, _s_dtype, _y_dtype, _keep_rstd = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.set_materialize_grads(False)  # the final norm's s gets no gradient: no zeros tensor for it
    # empty tensors that carry the input dtypes into the backward custom op (dtype arguments would spare the two
    # allocations: a possible host-time saving)
    ctx.x_like = x2.new_empty(0)
    ctx.r_like = r2.new_empty(0) if r2 is not None else None


def _add_rms_norm_backward(ctx, dy2, ds2, _drstd, bwd):
    s2, weight, rstd = ctx.saved_tensors
    if dy2 is None:
        dy2 = torch.zeros_like(s2, dtype=ctx.x_like.dtype)
    dx2, dr2, dw = bwd(dy2, ds2, s2, weight, rstd, ctx.x_like, ctx.r_like)
    return dx2, (dr2 if ctx.r_like is not None else None), dw, None, None, None, None


_add_rms_norm_grad_op = autograd_op("AddRMSNorm", _add_rms_norm_impl, _add_rms_norm_op, _add_rms_norm_setup_context,
                                    _add_rms_norm_backward, _add_rms_norm_bwd_impl, _add_rms_norm_bwd_op)


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Fused Triton RMSNorm; arguments as in `mambakit.ops.rms_norm` (already validated).

    Shapes: x, z (..., H) with any leading dims (flattened to rows); weight (H,).
    Returns (..., H) in x's dtype.

    Example:
        >>> x = torch.randn(2, 1024, 4096, device="cuda", dtype=torch.bfloat16)
        >>> y = rms_norm_triton(x, torch.ones(4096, device="cuda"), z=torch.randn_like(x), group_size=512)
    """
    hidden = x.shape[-1]
    if x.numel() == 0:
        from .torch_norm import rms_norm_torch  # nothing to launch: the torch path handles empty tensors

        return rms_norm_torch(x, weight, eps=eps, z=z, group_size=group_size, norm_before_gate=norm_before_gate)
    group = hidden if group_size is None else group_size
    z2 = _rows(z, hidden) if z is not None else None
    y2, _ = _rms_norm_op(_rows(x, hidden), weight.contiguous(), z2, float(eps), group, norm_before_gate)
    return y2.reshape(x.shape)


def add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual, y = rms_norm(s in weight's dtype): one Triton kernel forward, one backward.

    Arguments as in `mambakit.ops.add_rms_norm` (already validated). Shapes: x, residual (..., H);
    weight (H,). Returns y (..., H) in out_dtype (default: weight's dtype) and s (..., H) in residual_dtype
    (default: the promoted dtype of x and residual). The backward keeps s and the (N,) rstd, no copy of y.

    Example:
        >>> y, s = add_rms_norm_triton(h, r, w, residual_dtype=torch.float32, out_dtype=torch.bfloat16)
    """
    hidden = x.shape[-1]
    sum_dtype = _sum_dtype(x.dtype, None if residual is None else residual.dtype)
    s_dtype = residual_dtype or sum_dtype
    y_dtype = out_dtype or weight.dtype
    # the backward recomputes the norm from the stored s: it must hold the sum exactly
    lossy_s = torch.promote_types(s_dtype, sum_dtype) != s_dtype
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight))
    if x.numel() == 0 or (needs_grad and lossy_s):
        from .torch_norm import add_rms_norm_torch

        return add_rms_norm_torch(x, residual, weight, eps=eps, residual_dtype=residual_dtype, out_dtype=out_dtype)
    r2 = _rows(residual, hidden) if residual is not None else None
    # the custom op under torch.compile; in eager mode the implementation itself (no dispatcher cost per launch)
    y2, s2, _ = _add_rms_norm_grad_op(_rows(x, hidden), r2, weight, float(eps), s_dtype, y_dtype, needs_grad)
    return y2.reshape(x.shape), s2.reshape(x.shape)
