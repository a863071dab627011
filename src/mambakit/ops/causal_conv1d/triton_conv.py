"""Triton kernels of the depthwise causal convolution: forward, backward and the one-token update.

Shapes (legend): B batch, L seqlen, D dim (channels), W width, BL/BD the (seqlen, channel) tile.

    y_t = act(bias + sum_k weight[:, k] * xpad_{t-(W-1)+k} * m_k(t))

xpad is x extended to positions -(W-1)..-1 by the initial state (zeros without one), and
m_k(t) = [seq(t-(W-1)+k) == seq(t)] with seq(p < 0) = seq(0), so the initial state feeds only the
row's first document. Layout (B, L, D): the channel axis is the contiguous one, so every tile is
BL rows of BD consecutive channels and each tap is one coalesced (BL, BD) load; the W taps of a
tile overlap in all but W-1 rows, so they come from L1/L2 and DRAM sees x about once.

Backward, per tile of "extended" positions s in [-(W-1), L) (negative rows are the initial state):
    du_t   = dy_t * act'(u_t)                                    (u recomputed, never stored)
    dx_s   = sum_j weight[:, W-1-j] * du_{s+j} * [seq(s) == seq(s+j)]   (+ d final_state)
    dw_k  += sum_t du_t * xpad_{t-(W-1)+k} * m_k(t),   dbias += sum_t du_t     with t = s + W-1
The 2W-1 shifted input tiles a tile needs are loaded once and kept in registers (a tuple), so u is
recomputed at the W shifted rows without reloading. Weight and bias gradients accumulate in
(BL, BD) register tiles over TILES consecutive tiles, are reduced once per program into partial
sums, then summed by torch (deterministic, no atomics). Everything accumulates in float32 (float64 for float64 inputs).

Small things written inline (each jit helper call costs milliseconds under the interpreter):
seq_idx is read at clamp(p, 0, L-1), which gives the initial state's slots the first document;
silu(u) = u / (1 + exp(-u)), spelled out so float64 tiles stay float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import autograd_op, compute_dtype, fake_grads, pack_grads, pdl_launch, unpack_grads
from ..triton_launch import cdiv, fast_launch, next_power_of_2, sm_count
from ..triton_math import pdl_enter, sigmoid, silu, tl_compute_dtype
from .triton_stream import _causal_conv1d_bwd_stream_kernel, _causal_conv1d_fwd_stream_kernel

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_xpad(x_row0_ptr, init_ptr, row0, shift, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_id, stride_iw,
               ROWS: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """(ROWS, BD) tile of xpad at positions p = row0 + shift + 0..ROWS-1: x for 0 <= p < L, the initial
    state for -(W-1) <= p < 0, zeros elsewhere.

    x_row0_ptr already points at row row0 (one int64 offset per tile), so the in-tile offsets are
    small int32s even when L * stride passes 2**31. The initial state's load is masked, not branched
    on: behind a runtime `if` ptxas kept both paths' registers (figures: docs/design/kernel_figures.md).
    """
    rel = tl.arange(0, ROWS) + shift
    pos = row0 + rel
    tile = tl.load(x_row0_ptr + rel[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                   mask=((pos >= 0) & (pos < seqlen))[:, None] & mask_d[None, :], other=0.0).to(ACC)
    if HAS_INIT:
        in_state = (pos < 0) & (pos >= 1 - W)
        tile += tl.load(init_ptr + (pos + W - 1)[:, None] * stride_iw + offs_d[None, :] * stride_id,
                        mask=in_state[:, None] & mask_d[None, :], other=0.0).to(ACC)
    return tile


@fast_launch
@triton.jit
def _causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, y_ptr, final_ptr,
    seqlen, dim,
    stride_xb, stride_xl, stride_xd,
    stride_wd, stride_ww,
    stride_ib, stride_id, stride_iw,
    stride_sb, stride_sl,
    stride_yb, stride_yl, stride_yd,
    stride_fb, stride_fd, stride_fw,
    W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WRITE_FINAL: tl.constexpr, ACC: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements
    # row and batch strides come divided by ALIGN: the products tell the compiler rows start 16-byte aligned
    stride_xb, stride_xl = stride_xb * ALIGN, stride_xl * ALIGN
    stride_yb, stride_yl = stride_yb * ALIGN, stride_yl * ALIGN
    x_ptr += pid_b * stride_xb
    init_ptr += pid_b * stride_ib
    seq_ptr += pid_b * stride_sb
    y_ptr += pid_b * stride_yb
    final_ptr += pid_b * stride_fb

    row0 = pid_l * BLOCK_L
    x_row0_ptr = x_ptr + row0.to(tl.int64) * stride_xl
    offs_t = row0 + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + tl.minimum(offs_t, seqlen - 1) * stride_sl)

    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    for k in tl.static_range(W):
        w_k = tl.load(w_ptr + offs_d * stride_wd + k * stride_ww, mask=mask_d, other=0.0).to(ACC)
        tap = _load_xpad(x_row0_ptr, init_ptr, row0, k - (W - 1), offs_d, mask_d, seqlen, stride_xl, stride_xd,
                         stride_id, stride_iw, BLOCK_L, W, HAS_INIT, ACC)
        if HAS_SEQ and k < W - 1:
            pos = offs_t + (k - (W - 1))
            same_doc = tl.load(seq_ptr + tl.minimum(tl.maximum(pos, 0), seqlen - 1) * stride_sl) == seq_t
            tap = tl.where(same_doc[:, None], tap, 0.0)
        acc += tap * w_k[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
    if SILU:
        acc = silu(acc)
    y_row0_ptr = y_ptr + row0.to(tl.int64) * stride_yl
    tl.store(y_row0_ptr + tl.arange(0, BLOCK_L)[:, None] * stride_yl + offs_d[None, :] * stride_yd,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])

    if WRITE_FINAL:
        # the last tile also writes the window after the last token: positions L-(W-1) .. L-1
        if pid_l == tl.num_programs(0) - 1:
            offs_j = tl.arange(0, BLOCK_W)
            win0 = seqlen - (W - 1)
            pos_j = win0 + offs_j
            window = _load_xpad(x_ptr + win0.to(tl.int64) * stride_xl, init_ptr, win0, 0, offs_d, mask_d, seqlen,
                                stride_xl, stride_xd, stride_id, stride_iw, BLOCK_W, W, HAS_INIT, ACC)
            if HAS_SEQ:
                last_doc = tl.load(seq_ptr + (seqlen - 1) * stride_sl)
                # BLOCK_W >= W-1 lanes: the extra ones read the last position, not one past it
                seq_j = tl.load(seq_ptr + tl.minimum(tl.maximum(pos_j, 0), seqlen - 1) * stride_sl)
                window = tl.where((seq_j == last_doc)[:, None], window, 0.0)
            tl.store(final_ptr + offs_j[:, None] * stride_fw + offs_d[None, :] * stride_fd,
                     window.to(final_ptr.dtype.element_ty), mask=(offs_j < W - 1)[:, None] & mask_d[None, :])


@fast_launch
@triton.jit
def _causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dy_ptr, dfinal_ptr,
    dx_ptr, dinit_ptr, part_ptr,
    seqlen, dim,
    stride_xb, stride_xl, stride_xd,
    stride_wd, stride_ww,
    stride_ib, stride_id, stride_iw,
    stride_sb, stride_sl,
    stride_dyb, stride_dyl, stride_dyd,
    stride_fb, stride_fd, stride_fw,
    stride_dxb, stride_dxl, stride_dxd,
    stride_dib, stride_did, stride_diw,
    stride_pp, stride_pw, stride_pd,
    W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr, ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, WRITE_DINIT: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    # row and batch strides come divided by ALIGN (see the forward)
    stride_xb, stride_xl = stride_xb * ALIGN, stride_xl * ALIGN
    stride_dyb, stride_dyl = stride_dyb * ALIGN, stride_dyl * ALIGN
    stride_dxb, stride_dxl = stride_dxb * ALIGN, stride_dxl * ALIGN
    x_ptr += b64 * stride_xb
    init_ptr += b64 * stride_ib
    seq_ptr += b64 * stride_sb
    dy_ptr += b64 * stride_dyb
    dfinal_ptr += b64 * stride_fb
    dx_ptr += b64 * stride_dxb
    dinit_ptr += b64 * stride_dib

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    w = ()
    for k in tl.static_range(W):
        w = w + (tl.load(w_ptr + offs_d * stride_wd + k * stride_ww, mask=mask_d, other=0.0).to(ACC)[None, :],)
    if SILU and HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
    if HAS_SEQ:
        last_doc = tl.load(seq_ptr + (seqlen - 1) * stride_sl)

    dw_acc = ()
    for k in tl.static_range(W):
        dw_acc = dw_acc + (tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC),)
    db_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)

    # base pointers at the chunk's first row (int64 once), int32 offsets inside the chunk
    c0 = pid_c * TILES * BLOCK_L - (W - 1)
    x_c0_ptr = x_ptr + c0.to(tl.int64) * stride_xl
    dy_c0_ptr = dy_ptr + c0.to(tl.int64) * stride_dyl
    dx_c0_ptr = dx_ptr + c0.to(tl.int64) * stride_dxl
    for it in range(TILES):
        # extended positions: s < 0 are the initial state's slots
        s0 = c0 + it * BLOCK_L
        offs_s = s0 + tl.arange(0, BLOCK_L)
        rows = it * BLOCK_L + tl.arange(0, BLOCK_L)  # offsets from row c0
        # the 2W-1 shifted tiles: index i holds position s + i - (W-1); i = W-1 is s itself
        xs = ()
        seqs = ()
        for i in tl.static_range(2 * W - 1):
            pos = offs_s + (i - (W - 1))
            if SILU or i >= W - 1:  # without an activation only dw needs taps, all at i >= W-1
                xs = xs + (_load_xpad(x_c0_ptr, init_ptr, c0, it * BLOCK_L + i - (W - 1), offs_d, mask_d, seqlen,
                                      stride_xl, stride_xd, stride_id, stride_iw, BLOCK_L, W, HAS_INIT, ACC),)
            else:
                xs = xs + (0.0,)
            if HAS_SEQ:
                seqs = seqs + (tl.load(seq_ptr + tl.minimum(tl.maximum(pos, 0), seqlen - 1) * stride_sl)[:, None],)
            else:
                seqs = seqs + (0,)

        dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
        dus = ()
        for j in tl.static_range(W):
            offs_t = offs_s + j
            du = tl.load(dy_c0_ptr + (rows + j)[:, None] * stride_dyl + offs_d[None, :] * stride_dyd,
                         mask=((offs_t >= 0) & (offs_t < seqlen))[:, None] & mask_d[None, :], other=0.0).to(ACC)
            if SILU:
                # recompute the pre-activation at t = s + j from the tiles already in registers
                u = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
                if HAS_BIAS:
                    u += bias
                for k in tl.static_range(W):
                    tap = xs[j + k]
                    if HAS_SEQ and k < W - 1:
                        tap = tl.where(seqs[j + k] == seqs[j + W - 1], tap, 0.0)
                    u += tap * w[k]
                sig = sigmoid(u)
                du = du * sig * (1.0 + u * (1.0 - sig))
            dus = dus + (du,)
            contrib = du * w[W - 1 - j]
            if HAS_SEQ and j > 0:
                contrib = tl.where(seqs[W - 1] == seqs[W - 1 + j], contrib, 0.0)
            dx += contrib

        if HAS_DFINAL:
            # the final window read positions L-(W-1) .. L-1 of the last document
            if s0 + BLOCK_L > seqlen - (W - 1):
                slot = offs_s - (seqlen - (W - 1))
                in_window = (slot >= 0) & (slot < W - 1)
                g = tl.load(dfinal_ptr + slot[:, None] * stride_fw + offs_d[None, :] * stride_fd,
                            mask=in_window[:, None] & mask_d[None, :], other=0.0).to(ACC)
                if HAS_SEQ:
                    g = tl.where(seqs[W - 1] == last_doc, g, 0.0)
                dx += g

        tl.store(dx_c0_ptr + rows[:, None] * stride_dxl + offs_d[None, :] * stride_dxd,
                 dx.to(dx_ptr.dtype.element_ty), mask=((offs_s >= 0) & (offs_s < seqlen))[:, None] & mask_d[None, :])
        if WRITE_DINIT:
            if s0 < 0:
                tl.store(dinit_ptr + (offs_s + W - 1)[:, None] * stride_diw + offs_d[None, :] * stride_did,
                         dx.to(dinit_ptr.dtype.element_ty), mask=(offs_s < 0)[:, None] & mask_d[None, :])

        # weight and bias grads at t = s + W-1: every t in [0, L) is seen by exactly one row
        du_t = dus[W - 1]
        new_dw = ()
        for k in tl.static_range(W):
            tap = xs[W - 1 + k]
            if HAS_SEQ and k < W - 1:
                tap = tl.where(seqs[W - 1 + k] == seqs[2 * W - 2], tap, 0.0)
            new_dw = new_dw + (dw_acc[k] + tap * du_t,)
        dw_acc = new_dw
        db_acc += du_t

    # partial sums (programs, W + 1, D): rows 0..W-1 the weight taps, row W the bias
    part_ptrs = part_ptr + (pid_b * tl.num_programs(0) + pid_c) * stride_pp + offs_d * stride_pd
    for k in tl.static_range(W):
        tl.store(part_ptrs + k * stride_pw, tl.sum(dw_acc[k], axis=0), mask=mask_d)
    if HAS_BIAS:
        tl.store(part_ptrs + W * stride_pw, tl.sum(db_acc, axis=0), mask=mask_d)


@fast_launch
@triton.jit
def _causal_conv1d_update_kernel(
    state_ptr, x_ptr, w_ptr, b_ptr, y_ptr,
    dim,
    stride_sb, stride_sd, stride_sw,
    stride_xb, stride_xd,
    stride_wd, stride_ww,
    stride_yb, stride_yd,
    W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # launched with programmatic dependent launch: wait for the previous kernel first
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    state_ptr += pid_b * stride_sb
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim

    x = tl.load(x_ptr + pid_b * stride_xb + offs_d * stride_xd, mask=mask_d, other=0.0)
    acc = x.to(ACC) * tl.load(w_ptr + offs_d * stride_wd + (W - 1) * stride_ww, mask=mask_d, other=0.0).to(ACC)
    # one (BD,) vector per slot: each channel's slots live in the thread that owns the channel
    slots = ()
    for j in tl.static_range(W - 1):
        s_j = tl.load(state_ptr + offs_d * stride_sd + j * stride_sw, mask=mask_d, other=0.0)
        slots = slots + (s_j,)
        acc += s_j.to(ACC) * tl.load(w_ptr + offs_d * stride_wd + j * stride_ww, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if SILU:
        acc = silu(acc)
    tl.store(y_ptr + pid_b * stride_yb + offs_d * stride_yd, acc.to(y_ptr.dtype.element_ty), mask=mask_d)

    # every read of the old state happens before any write of the new one (state is updated in place)
    tl.debug_barrier()
    for j in tl.static_range(W - 2):
        tl.store(state_ptr + offs_d * stride_sd + j * stride_sw, slots[j + 1], mask=mask_d)
    tl.store(state_ptr + offs_d * stride_sd + (W - 2) * stride_sw, x.to(state_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------
# launchers: checks, allocation, grid
# ----------------------------------------------------------------------------------------------

def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def channel_contiguous(state: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, D, W-1) window whose channel axis has stride 1, like x's (a tiny copy when it has not).

    The kernels read and write windows as rows of channels, i.e. with x's layout: coalesced and
    vectorised, where the (B, D, W-1)-contiguous layout would be a gather of 2-byte elements.
    """
    if state is None or state.stride(1) == 1:
        return state
    return state.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_window(batch: int, dim: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B, D, W-1) with channel stride 1."""
    return torch.empty(batch, width - 1, dim, dtype=dtype, device=device).transpose(1, 2)


VARIANTS = ("tile", "stream")
# the launchers' defaults (a `variant=` argument overrides them); the GPU sweep decides
FWD_VARIANT = "stream"  # H200 sweep, 2026-12-02 (BENCHMARKS.md): 40 vs 60 us fwd, 104 vs 221 us bwd at Mamba-2's
BWD_VARIANT = "stream"  # 130M training layout; the tile kernels stay selectable (variant="tile")


def row_align(*tensors: torch.Tensor) -> int:
    """ALIGN for the kernels: the largest power of two <= 16 bytes / element that divides the batch and row
    strides of every (B, L, D) tensor given.

    Triton specialises an int argument only on being divisible by 16, so a row stride such as Mamba-2's
    d_in_proj = 3352 (a multiple of 8) looks unaligned and every bf16 row load becomes 8 scalar loads (ptxas
    for sm_90a: 160 16-bit loads instead of 17 128-bit ones in the tile forward). Passing stride // ALIGN and
    multiplying by the constexpr ALIGN in the kernel restores the 16-byte vector loads.
    """
    align = max(1, min(16 // t.element_size() for t in tensors))
    # any divisor is exact (the kernel multiplies back); a larger one only tells the compiler more
    while align > 1 and any(t.stride(i) % align for t in tensors for i in (0, 1)):
        align //= 2
    return align


def _row_strides(t: torch.Tensor, align: int) -> tuple[int, int, int]:
    """(batch, row, channel) strides of a (B, L, D) tensor, the first two divided by ALIGN."""
    return t.stride(0) // align, t.stride(1) // align, t.stride(2)


def _fwd_config(dim: int, variant: str) -> tuple[int, int, int, int]:
    """(BLOCK_L or CHUNK, BLOCK_D, num_warps, ROWS) of a forward variant.

    tile: 128 channels = 256-byte rows in bf16, 32 elements per thread, no register spills
    (docs/design/kernel_figures.md). stream: 256 channels on 2 warps (4 per thread, 8-byte bf16 loads),
    128 rows per program (~1 wave of programs at batch 8 x 2048 x 1792 on 132 SMs), 4 rows per step.
    `benchmarks/gpu_conv_norm.py --train-shapes --sweep` times the alternatives.
    """
    if variant == "tile":
        return 64, min(128, next_power_of_2(dim)), 8, 1
    # the H200 sweep's best at all three shapes it timed (35.8 / 40.4 / 83.3 us, 79-82% of a copy)
    return 64, min(256, max(64, next_power_of_2(dim))), 2, 4


def _bwd_config(dim: int, variant: str) -> tuple[int, int, int, int]:
    """(BLOCK_L or CHUNK, BLOCK_D, num_warps, ROWS) of a backward variant.

    tile keeps 2W-1 input tiles and W gradient tiles in registers: 8 rows per step, (8, 128, 4) compiles
    without spills at width 4, bf16 (docs/design/kernel_figures.md). stream: as the forward's but 2 rows per
    step (with the next step's 2 prefetched: 121 registers, where 4 + 4 take 161).
    """
    if variant == "tile":
        return 8, min(128, next_power_of_2(dim)), 4, 1
    # 4 rows per step (+ 4 prefetched): 72 / 104 / 159 us at the sweep's three shapes; the configs within ~15%
    # of each other swapped places between shapes (the lent machine's spread is about that)
    return 128, min(256, max(64, next_power_of_2(dim))), 2, 4


def _check_variant(variant: str, width: int, chunk: int, rows: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"causal_conv1d: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "stream" and (chunk % rows or chunk < width - 1):
        raise ValueError(f"causal_conv1d: stream needs block_l (rows per program) a multiple of rows and >= width - 1,"
                         f" got block_l={chunk}, rows={rows}, width={width}")


def causal_conv1d_fwd(*, x, weight, bias, initial_state, seq_idx, silu: bool, return_final_state: bool,
                      variant=None, block_l=None, block_d=None, num_warps=None, rows=None, prefetch=True):
    """y (B, L, D) in x's dtype and, when asked, the final window (B, D, W-1) in x's dtype.

    initial_state must have channel stride 1 (`channel_contiguous`); the final window comes back
    as a (B, D, W-1) view with channel stride 1. variant: "tile" (W overlapping (BL, BD) loads per tile,
    block_l rows) or "stream" (each program walks block_l rows, `rows` per step, the next step's loads
    issued before this step's arithmetic when `prefetch`; triton_stream.py); None takes FWD_VARIANT.
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    variant = variant or FWD_VARIANT
    cfg = _fwd_config(dim, variant)
    block_l, block_d, num_warps, rows = block_l or cfg[0], block_d or cfg[1], num_warps or cfg[2], rows or cfg[3]
    _check_variant(variant, width, block_l, rows)
    y = torch.empty(batch, seqlen, dim, dtype=x.dtype, device=x.device)
    final = _empty_window(batch, dim, width, x.dtype, x.device) if return_final_state else None
    align = row_align(x, y)
    grid = (cdiv(seqlen, block_l), cdiv(dim, block_d), batch)
    common = (x, weight, bias if bias is not None else x, initial_state if initial_state is not None else x,
              seq_idx if seq_idx is not None else x, y, final if final is not None else y,
              seqlen, dim,
              *_row_strides(x, align), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
              *_row_strides(y, align), *_strides(final, 3))
    flags = dict(HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
                 SILU=silu, WRITE_FINAL=return_final_state, ACC=tl_compute_dtype(x.dtype), num_warps=num_warps)
    if variant == "tile":
        _causal_conv1d_fwd_kernel[grid](*common, W=width, BLOCK_L=block_l, BLOCK_D=block_d,
                                        BLOCK_W=next_power_of_2(width - 1), ALIGN=align, **flags)
    else:
        _causal_conv1d_fwd_stream_kernel[grid](*common, W=width, CHUNK=block_l, ROWS=rows, BLOCK_D=block_d,
                                               ALIGN=align, PREFETCH=prefetch, **flags)
    return y, final


def causal_conv1d_bwd(*, x, weight, bias, initial_state, seq_idx, silu: bool, dy, dfinal, need_dinit: bool,
                      variant=None, block_l=None, block_d=None, num_warps=None, tiles=None, rows=None, prefetch=True,
                      dx=None):
    """(dx, dweight, dbias or None, dinitial_state or None), each in its input's dtype.

    initial_state and dfinal must have channel stride 1; dinitial_state comes back with channel stride 1.
    dx: optional (B, L, D) output buffer of any strides (e.g. a slice of a wider gradient, so a fused
    caller needs no concatenation); allocated when None. variant: "tile" (block_l rows per tile, `tiles`
    tiles per program) or "stream" (block_l rows per program, `rows` per step, `prefetch` as the forward's);
    None takes BWD_VARIANT.
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    variant = variant or BWD_VARIANT
    cfg = _bwd_config(dim, variant)
    block_l, block_d, num_warps, rows = block_l or cfg[0], block_d or cfg[1], num_warps or cfg[2], rows or cfg[3]
    _check_variant(variant, width, block_l, rows)
    n_dblocks = cdiv(dim, block_d)
    if variant == "tile":
        n_tiles = cdiv(seqlen + width - 1, block_l)
        # each program loops over `tiles` tiles so the weight-grad partials stay small (~5 MB at
        # L=8192, D=4096); ~16 programs per SM keep the last wave short; a power of two bounds recompiles
        if tiles is None:
            programs = n_tiles * n_dblocks * batch
            # off the GPU (the interpreter) a "machine" of one SM makes even tiny tests loop over tiles
            tiles = min(32, next_power_of_2(max(1, programs // (16 * sm_count(x.device, 1)))))
        n_spans = cdiv(n_tiles, tiles)  # one program per span of `tiles` time tiles (the kernel's pid_c)
    else:
        n_spans = cdiv(seqlen, block_l)  # one program per chunk of block_l rows
    acc_dtype = compute_dtype(x.dtype)
    if dx is None:
        dx = torch.empty(batch, seqlen, dim, dtype=x.dtype, device=x.device)
    dinit = None
    if need_dinit:
        dinit = _empty_window(batch, dim, width, initial_state.dtype, x.device)
    part = torch.empty(batch * n_spans, width + 1, dim, dtype=acc_dtype, device=x.device)
    align = row_align(x, dy, dx)
    grid = (n_spans, n_dblocks, batch)
    common = (x, weight, bias if bias is not None else x, initial_state if initial_state is not None else x,
              seq_idx if seq_idx is not None else x, dy, dfinal if dfinal is not None else dy,
              dx, dinit if dinit is not None else dx, part,
              seqlen, dim,
              *_row_strides(x, align), *weight.stride(), *_strides(initial_state, 3), *_strides(seq_idx, 2),
              *_row_strides(dy, align), *_strides(dfinal, 3), *_row_strides(dx, align), *_strides(dinit, 3),
              *part.stride())
    flags = dict(HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
                 SILU=silu, HAS_DFINAL=dfinal is not None, WRITE_DINIT=need_dinit, ACC=tl_compute_dtype(x.dtype),
                 num_warps=num_warps)
    if variant == "tile":
        _causal_conv1d_bwd_kernel[grid](*common, W=width, BLOCK_L=block_l, BLOCK_D=block_d, TILES=tiles,
                                        ALIGN=align, **flags)
    else:
        _causal_conv1d_bwd_stream_kernel[grid](*common, W=width, CHUNK=block_l, ROWS=rows, BLOCK_D=block_d,
                                               ALIGN=align, PREFETCH=prefetch, **flags)
    sums = part.sum(0)  # (W + 1, D)
    # own storage each (not views of `sums`): custom ops may not return outputs that alias each other
    dweight = sums[:width].t().contiguous().to(weight.dtype)
    dbias = sums[width].to(bias.dtype, copy=True) if bias is not None else None
    return dx, dweight, dbias, dinit


def _causal_conv1d_update(conv_state, x, weight, bias, silu):
    """y (B, D) in x's dtype; conv_state (B, D, W-1) shifted in place."""
    batch, dim = x.shape
    width = weight.shape[1]
    y = torch.empty_like(x)
    block_d = min(256, max(128, next_power_of_2(dim)))
    grid = (cdiv(dim, block_d), batch)
    pdl = pdl_launch(x.device)
    _causal_conv1d_update_kernel[grid](
        conv_state, x, weight, bias if bias is not None else x, y,
        dim, *conv_state.stride(), *x.stride(), *weight.stride(), *y.stride(),
        W=width, BLOCK_D=block_d, HAS_BIAS=bias is not None, SILU=silu, ACC=tl_compute_dtype(x.dtype),
        PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return y, conv_state


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


# One custom op pair (torch.library, autograd registered): compile, autocast and FSDP see one op with fake tensors.
# Only the inputs are kept for the backward, which recomputes the pre-activation in registers.


def _conv_fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                   seq_idx: torch.Tensor | None, silu: bool, return_final_state: bool) -> tuple[torch.Tensor,
                   torch.Tensor]:
    y, final = causal_conv1d_fwd(x=x, weight=weight, bias=bias, initial_state=channel_contiguous(initial_state),
                                 seq_idx=seq_idx, silu=silu, return_final_state=return_final_state)
    return y, x.new_empty(0) if final is None else final


_conv_fwd_op = torch.library.custom_op("mambakit::causal_conv1d_fwd", mutates_args=())(_conv_fwd_impl)


@_conv_fwd_op.register_fake
def _(x, weight, bias, initial_state, seq_idx, silu, return_final_state):
    batch, seqlen, dim = x.shape
    final = _empty_window(batch, dim, weight.shape[1], x.dtype, x.device) if return_final_state else x.new_empty(0)
    return x.new_empty(batch, seqlen, dim), final


def _conv_bwd_impl(dy: torch.Tensor, dfinal: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None,
                   silu: bool, need_dinit: bool) -> list[torch.Tensor]:
    dx, dweight, dbias, dinit = causal_conv1d_bwd(x=x, weight=weight, bias=bias,
                                                  initial_state=channel_contiguous(initial_state), seq_idx=seq_idx,
                                                  silu=silu, dy=dy, dfinal=channel_contiguous(dfinal),
                                                  need_dinit=need_dinit)
    # dinitial_state keeps the kernels' channel-stride-1 window layout (its fake says so)
    return pack_grads((dx, dweight, dbias), (x, weight, bias)) + [x.new_empty(0) if dinit is None else dinit]


_conv_bwd_op = torch.library.custom_op("mambakit::causal_conv1d_bwd", mutates_args=())(_conv_bwd_impl)


@_conv_bwd_op.register_fake
def _(dy, dfinal, x, weight, bias, initial_state, seq_idx, silu, need_dinit):
    batch, _, dim = x.shape
    dinit = (_empty_window(batch, dim, weight.shape[1], initial_state.dtype, x.device) if need_dinit
             else x.new_empty(0))
    return fake_grads((x, weight, bias), (True, True, True)) + [dinit]


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, seq_idx, silu, return_final_state = inputs
    if initial_state is not None:
        # a private copy (W - 1 slots, with the kernels' channel-stride-1 layout): the caller's state is often a
        # decoding cache that it overwrites with the final window right after this call
        batch, dim, slots = initial_state.shape
        initial_state = _empty_window(batch, dim, slots + 1, initial_state.dtype, x.device).copy_(initial_state)
    ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
    ctx.silu, ctx.return_final_state = silu, return_final_state


def _conv_backward(ctx, dy, dfinal, bwd):
    x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
    if dy is None:  # only the final window was used
        dy = torch.zeros_like(x)
    need_dinit = initial_state is not None and ctx.needs_input_grad[3]
    grads = bwd(dy, dfinal if ctx.return_final_state else None, x, weight, bias, initial_state, seq_idx,
                         ctx.silu, need_dinit)
    return *unpack_grads(grads, (True, True, bias is not None, need_dinit)), None, None, None


_causal_conv1d_op = autograd_op("CausalConv1d", _conv_fwd_impl, _conv_fwd_op, _conv_setup_context, _conv_backward,
                                _conv_bwd_impl, _conv_bwd_op)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton causal conv; arguments as in `mambakit.ops.causal_conv1d` (already validated).

    Shapes: x (B, L, D) with any strides (e.g. a channel slice of in_proj's output), weight (D, W),
    bias (D,), initial_state (B, D, W-1), seq_idx (B, L). Returns y (B, L, D) in x's dtype, and the
    final window (B, D, W-1) in x's dtype when asked.

    Example:
        >>> y = causal_conv1d_triton(torch.randn(2, 1024, 512, device="cuda"), torch.randn(512, 4, device="cuda"))
    """
    if x.numel() == 0:
        from .torch_conv import causal_conv1d_torch  # nothing to launch: the torch path handles empty tensors

        return causal_conv1d_torch(x, weight, bias, activation, initial_state, return_final_state, seq_idx)
    y, final = _causal_conv1d_op(x, weight, bias, initial_state, seq_idx, activation in ("silu", "swish"),
                            return_final_state)
    return (y, final) if return_final_state else y


def causal_conv1d_update_triton(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: y (B, D) and conv_state (B, D, W-1), shifted in place by the kernel.

    conv_state may be a strided view (a slice of a layer cache); it keeps its own dtype.

    Example:
        >>> state = torch.zeros(2, 512, 3, device="cuda")
        >>> x, w = torch.randn(2, 512, device="cuda"), torch.randn(512, 4, device="cuda")
        >>> y, state = causal_conv1d_update_triton(state, x, w)
    """
    if x.numel() == 0:
        return torch.empty_like(x), conv_state
    return _causal_conv1d_update(conv_state, x, weight, bias, activation in ("silu", "swish"))
