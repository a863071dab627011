"""Triton kernel of the decode projections for a few rows (batch <= GEMV_MAX_ROWS): one load of the weights.

Shapes (legend): B batch (<= GEMV_MAX_ROWS), K input features, N output features, G norm groups, C conv channels,
W conv width.

    plain mode:  out = x @ weight^T (+ bias)                       (Mamba-1's x_proj and out_proj)
    add mode:    s = x + r;  out = rmsnorm(s) * norm_weight @ weight^T (+ bias)  (+ conv update on C channels)
    gated mode:  out = rmsnorm_per_group(x * silu(z)) * norm_weight @ weight^T (+ bias)

Why a second kernel: at batch 1 a projection reads a few MB of weights (0.6-1.3 us at the H200's 4 TB/s), yet
the tiled kernel (`triton_norm_linear.py`) took ~7 us a launch (session-16 profile). It walks K in blocks, a
first pass for the norm's sums and a second for the products; its chain of dependent loads is the likely cause
(not measured apart). Here a program holds its whole (BLOCK_N, K) slice of the weights in registers (K
contiguous, vector loads), issued before anything else, and each row is read once, in one block of K: the norm's
sums, the normalised row and the products need no second trip to memory. The rows loop inside the program over
the registers' weights, so the weights are read once whatever the batch. Roundings are the tiled kernel's (the
unfused ops'). On sm_90+ the kernel launches with programmatic dependent launch (`ops.common.pdl_launch`): those
weight loads are issued while the previous kernel is still running, and only the rows wait for it (session 39,
H100: graphed batch-1 decoding 0.395 -> 0.312 ms a token for Mamba-1, 0.370 -> 0.291 for Mamba-2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import pdl_launch
from ..dispatch import triton_interpret
from ..ssd.triton_common import to_dtype
from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import pdl_enter, tl_compute_dtype, tl_dtype
from .triton_parts import _conv_epilogue, _prologue
from .rows_policy import takes_rows_matmul
from .triton_rows_matmul import rows_matmul

__all__ = ["GEMV_MAX_ROWS", "PLAIN_MAX_ROWS", "gemv_tiles", "linear_rows_triton"]

GEMV_MAX_ROWS = 8  # rows per program (every row of the batch); the fused decode step runs up to 8 rows
# without a norm the kernel competes with cuBLAS alone: in a CUDA graph on an H200 (session 16,
# benchmarks/gpu_decode_proj.py) it won at 1 and 4 rows (x_proj 1.85 / 3.02 us against 4.07, out_proj 2.36 / 4.15
# against 5.82 / 5.04) and lost at 8 (4.70 against 4.23, 6.24 against 5.62)
PLAIN_MAX_ROWS = 4
_WEIGHTS_PER_PROGRAM = 8192  # (BLOCK_N x BLOCK_K) weights a program holds: 64 per thread at 4 warps
_MIN_PROGRAMS = 256  # about two per SM on an H100 / H200 (132 SMs): the loads spread over every SM


@fast_launch
@triton.jit
def _norm_gemv_kernel(
    x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, s_ptr, cs_ptr, cw_ptr, cb_ptr,
    batch, K, N, eps, group, c0, n_conv,
    s_xb, s_rb, s_zb, s_wn, s_ob, s_sb, s_csb, s_csd, s_csw, s_cwd, s_cww,
    NORM: tl.constexpr, GATED: tl.constexpr, HAS_R: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, CONV: tl.constexpr, CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr, NG: tl.constexpr,
    SUM_DT: tl.constexpr, NW_DT: tl.constexpr, OUT_DT: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    # the program's weights first, K contiguous: their loads are in flight while the rows are read
    w = tl.load(w_ptr + n[:, None] * s_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(ACC)[None, :]
    if NORM:
        nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(ACC)[None, :]
    # with PDL the weights above load while the previous kernel finishes; the rows, written by it, only after
    pdl_enter(PDL)
    gi = tl.arange(0, NG)
    for i in tl.static_range(ROWS):
        rows = (i + tl.arange(0, 1)).to(tl.int64)  # (1,): one row, kept 2-D for the shared prologue / epilogue
        row_ok = rows < batch
        if NORM:
            h, extra = _prologue(x_ptr, r_ptr, z_ptr, rows, row_ok, k, k_ok, s_xb, s_rb, s_zb,
                                 GATED, HAS_R, NORM_BEFORE_GATE, SUM_DT, NW_DT, ACC, EMULATE)  # (1, BLOCK_K)
            if NG == 1:
                r_k = 1.0 / tl.sqrt(tl.sum(h * h, axis=1)[:, None] / group + eps)  # (1, 1)
            else:
                onehot = ((k // group)[:, None] == gi[None, :]).to(ACC)  # (BLOCK_K, NG)
                ss = tl.sum((h * h)[:, :, None] * onehot[None, :, :], axis=1)  # (1, NG)
                r_k = tl.sum((1.0 / tl.sqrt(ss / group + eps))[:, None, :] * onehot[None, :, :], axis=2)
            if not GATED:
                if pid_n == 0:  # one program writes the residual stream
                    tl.store(s_ptr + rows[:, None] * s_sb + k[None, :], extra.to(s_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & k_ok[None, :])
            a = h * r_k * nw
            if GATED:
                if NORM_BEFORE_GATE:
                    a = a * extra
            a = to_dtype(a, OUT_DT, EMULATE).to(ACC)  # the normalised activation, as the unfused norm returns it
        else:
            a = tl.load(x_ptr + rows[:, None] * s_xb + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(ACC)
        out = tl.sum(a[:, None, :] * w[None, :, :], axis=2)  # (1, BLOCK_N)
        if HAS_BIAS:
            out += bias
        out = to_dtype(out, OUT_DT, EMULATE).to(ACC)  # the projection's output dtype, as the conv reads it
        if CONV:
            out = _conv_epilogue(out, rows, row_ok, n, n_ok, cs_ptr, cw_ptr, cb_ptr, c0, n_conv, s_csb, s_csd,
                                 s_csw, s_cwd, s_cww, CONV_BIAS, WIDTH, ACC)
        tl.store(out_ptr + rows[:, None] * s_ob + n[None, :], to_dtype(out, OUT_DT, EMULATE),
                 mask=row_ok[:, None] & n_ok[None, :])


def gemv_tiles(batch: int, N: int, K: int, groups: int = 1) -> tuple[int, int] | None:
    """(BLOCK_N, BLOCK_K) of the few-rows kernel, or None where it does not apply (more than GEMV_MAX_ROWS
    rows, or a row too wide for one program's registers: K > 8192, or K x groups > 16384 for the group one-hot).

    BLOCK_K is all of K; BLOCK_N the most outputs whose weights fit `_WEIGHTS_PER_PROGRAM`, halved until the
    grid has `_MIN_PROGRAMS` programs (or one output per program). Untuned: chosen by that argument alone.
    """
    block_k = next_power_of_2(K)
    if batch > GEMV_MAX_ROWS or block_k > _WEIGHTS_PER_PROGRAM or block_k * groups > 2 * _WEIGHTS_PER_PROGRAM:
        return None
    block_n = max(1, _WEIGHTS_PER_PROGRAM // block_k)
    while block_n > 1 and cdiv(N, block_n) < _MIN_PROGRAMS:
        block_n //= 2
    return block_n, block_k


def launch_gemv(x, weight, out, tiles, *, norm=False, residual=None, z=None, norm_weight=None, bias=None,
                s=None, eps=1e-5, group=1, ng=1, norm_before_gate=False, sum_dtype=None, conv_state=None,
                conv_weight=None, conv_bias=None, conv_start=0, pdl_ok: bool = True) -> None:
    """Launch the few-rows kernel; tensors as `norm_linear_triton` prepares them (row-contiguous, out allocated).

    pdl_ok False: the caller just copied a weight (a non-contiguous one made contiguous), so the kernel before this
    one writes it; with PDL the kernel reads its weights before waiting for that kernel, so it launches without."""
    batch, K = x.shape
    N = weight.shape[0]
    gated = z is not None
    conv = conv_state is not None
    dummy = out
    pdl = pdl_ok and pdl_launch(x.device)
    _norm_gemv_kernel[(cdiv(N, tiles[0]),)](
        x, residual if residual is not None else dummy, z if gated else dummy,
        norm_weight if norm_weight is not None else dummy, weight, bias if bias is not None else dummy, out,
        s if s is not None else dummy, conv_state if conv else dummy, conv_weight if conv else dummy,
        conv_bias if conv and conv_bias is not None else dummy,
        batch, K, N, float(eps), group, conv_start, conv_weight.shape[0] if conv else 0,
        x.stride(0), residual.stride(0) if residual is not None else 0, z.stride(0) if gated else 0,
        weight.stride(0), out.stride(0), s.stride(0) if s is not None else 0,
        *(conv_state.stride() if conv else (0, 0, 0)), *(conv_weight.stride() if conv else (0, 0)),
        NORM=norm, GATED=gated, HAS_R=residual is not None, NORM_BEFORE_GATE=norm_before_gate,
        HAS_BIAS=bias is not None, CONV=conv, CONV_BIAS=conv and conv_bias is not None,
        WIDTH=conv_weight.shape[1] if conv else 2, NG=ng,
        SUM_DT=tl_dtype(sum_dtype or x.dtype),
        NW_DT=tl_dtype(norm_weight.dtype if norm_weight is not None else x.dtype),
        OUT_DT=tl_dtype(weight.dtype), ACC=tl_compute_dtype(torch.promote_types(x.dtype, weight.dtype)),
        ROWS=batch, BLOCK_N=tiles[0], BLOCK_K=tiles[1], EMULATE=triton_interpret(), PDL=pdl, num_warps=4,
        launch_pdl=pdl,
    )


def linear_rows_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for a few rows: x (B, K) @ weight (N, K)^T + bias (N,) -> (B, N) in weight's dtype (x has it too).

    The few-rows kernel up to PLAIN_MAX_ROWS rows where it applies (`gemv_tiles`); the many-rows kernel
    (`triton_rows_matmul.rows_matmul`) where `rows_policy.takes_rows_matmul` says, for a 16- or 32-bit float type
    (off by default: not yet timed); else `F.linear` (cuBLAS).

    Example:
        >>> y = linear_rows_triton(h, out_proj.weight, out_proj.bias)
    """
    if (takes_rows_matmul(x.shape[0]) and x.shape[1] > 0
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return rows_matmul(x, weight, bias)
    tiles = gemv_tiles(x.shape[0], weight.shape[0], x.shape[1])
    if tiles is None or not 0 < x.shape[0] <= PLAIN_MAX_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    as_given = weight.stride(-1) == 1
    weight = weight if as_given else weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=weight.dtype)
    launch_gemv(x, weight, out, tiles, bias=bias, pdl_ok=as_given)
    return out
