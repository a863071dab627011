"""Triton backend of `mamba1_step` (Mamba-1's decode step after the norm, before out_proj): two kernels.

Shapes (legend): M rows (the batch), K d_model, D d_inner, W d_conv, R dt_rank, N d_state, Q = R + 2N (x_proj's
outputs), P = D / BLOCK_N partial sums of x_proj (one per block of x channels).

    kernel 1, grid (2D / BLOCK_N, M / BLOCK_M), all rows of a block against a slice of in_proj's outputs:
        xz = h @ in_proj_weight^T + in_proj_bias                                   (M, 2D)
        a block of x channels also: xc = silu(causal_conv1d_update(conv_state, x))  (its windows shift in place)
                                    partial[p] = xc[:, block p] @ x_proj_weight[:, block p]^T    (P, M, Q) fp32
    kernel 2, the state-update kernel in its partials mode (`selective_scan/triton_step.py`):
        x_dbl = round(sum_p partial[p] + x_proj_bias) = [dt_low | B | C]
        dt = dt_low @ dt_proj_weight^T (float32);  ssm_state, y as `selective_state_update`      y (M, D)

Why: past the fused step's 8 rows a layer's decode step was seven launches (norm, in_proj, conv update, x_proj,
dt_proj, state update, out_proj), each 2-7 us for a few MB (session 17's profile, BENCHMARKS.md). Here the conv rides in in_proj's epilogue (depthwise: a channel needs only its own
window, which only the program computing that channel touches), x_proj's reduction over channels is split over
the same programs (each holds its channels' conv output already) and finished inside the state update, which
also computes dt_proj: three launches fewer per layer. Partial sums, not atomics: the result does not depend on
the order programs run in. Measured on an H100 (session 38): 11.5 against 15.0 us at 16 rows, 16.1 against 16.7 at
32, but 22.9 against 18.2 at 64, where the x_proj epilogue (~4 us) and the partials' reading (~1.5 us) cost more
than the launches saved; `Mamba1.step` takes it up to 32 rows. Roundings are the composed ops': in_proj's output and the conv's in the weights'
dtype, x_proj's output rounded once after its float32 sum, dt in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import pdl_launch
from ..dispatch import triton_interpret
from ..norm_linear.triton_parts import _conv_epilogue
from ..norm_linear.triton_rows_matmul import prefetch_lines, rows_tile_matmul
from ..selective_scan.triton_step import selective_state_update_triton
from ..ssd.triton_common import mm, op_dtype, to_dtype
from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import pdl_enter, tl_dtype

__all__ = ["mamba1_step_tiles", "mamba1_step_triton"]

def mamba1_step_tiles(M: int, N: int, K: int, block_n: int | None = None, block_k: int | None = None,
                      block_m: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of kernel 1: 16 rows (tl.dot's minimum) and 32 outputs per program, BLOCK_K 128
    (K rounded up to a power of two below 128); `block_n` / `block_k` / `block_m` override (the GPU benchmark's
    sweep). Session 38's sweep on an H100 (130M layer, BENCHMARKS.md): at 64 rows 16 x 32 tiles took 18.7 us
    (kernel 2 at 128 channels a program) where all 64 rows x 64 outputs took 42.8 (a program's conv and x_proj
    epilogue over 64 x 64 values runs out of registers); at 16 rows 11.3 us against 13.3 with 64 outputs."""
    block_m = block_m or 16
    block_n = block_n or 32
    block_k = block_k or (128 if K >= 128 else max(16, next_power_of_2(K)))
    return block_m, block_n, block_k


@fast_launch
@triton.jit
def _in_proj_conv_kernel(
    h_ptr, w_ptr, b_ptr, xz_ptr, cs_ptr, cw_ptr, cb_ptr, xw_ptr, part_ptr,
    M, N, K, D, Q,
    s_hm, s_wn, s_xzm, s_csb, s_csd, s_csw, s_cwd, s_cww, s_xwq, s_pp, s_pm,
    HAS_BIAS: tl.constexpr, CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr, OP: tl.constexpr, OUT_DT: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr, GEMM: tl.constexpr = True, PDL: tl.constexpr = False, LINES: tl.constexpr = 1,
    LINE: tl.constexpr = 64,
):
    """Program (pid_n, pid_m): in_proj's outputs of block pid_n for the rows of block pid_m; a block that holds x
    channels (pid_n * BLOCK_N < D) also updates their conv windows and writes x_proj's partial sum number pid_n.
    GEMM False: in_proj's output is in xz already (cuBLAS), the grid covers the x channels only. PDL: launched with
    programmatic dependent launch (the weights' L2 prefetch before the wait, `rows_tile_matmul`)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if GEMM:
        acc = rows_tile_matmul(h_ptr, w_ptr, rm, rn, m_ok, n_ok, K, s_hm, s_wn, OP, EMULATE, BLOCK_M, BLOCK_N,
                               BLOCK_K, PDL, LINES, LINE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = to_dtype(acc, OUT_DT, EMULATE).to(tl.float32)  # in_proj's output dtype, as the conv reads it
    else:
        pdl_enter(PDL)
        out = tl.load(xz_ptr + rm[:, None] * s_xzm + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                      other=0.0).to(tl.float32)
    if pid_n * BLOCK_N < D:
        out = _conv_epilogue(out, rm, m_ok, rn, n_ok, cs_ptr, cw_ptr, cb_ptr, 0, D, s_csb, s_csd, s_csw, s_cwd,
                             s_cww, CONV_BIAS, WIDTH, tl.float32)
        out = to_dtype(out, OUT_DT, EMULATE).to(tl.float32)  # the conv's output dtype, as x_proj reads it
        is_x = rn < D
        q = tl.arange(0, BLOCK_Q)
        q_ok = q < Q
        xwt = tl.load(xw_ptr + q[None, :] * s_xwq + rn[:, None], mask=is_x[:, None] & q_ok[None, :], other=0.0)
        part = mm(tl.where(is_x[None, :], out, 0.0), xwt, tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32), OP,
                  EMULATE)
        tl.store(part_ptr + pid_n * s_pp + rm[:, None] * s_pm + q[None, :], part, mask=m_ok[:, None] & q_ok[None, :])
    tl.store(xz_ptr + rm[:, None] * s_xzm + rn[None, :], to_dtype(out, OUT_DT, EMULATE),
             mask=m_ok[:, None] & n_ok[None, :])


def mamba1_step_triton(h, in_proj_weight, in_proj_bias, conv_state, conv_weight, conv_bias, x_proj_weight,
                       x_proj_bias, dt_proj_weight, dt_proj_bias, A, D, ssm_state, *,
                       tiles: tuple[int, int, int] | None = None, num_warps: int = 4, num_stages: int = 2,
                       block_d: int | None = None, sub_blocks: int = 1, in_proj_cublas: bool = False) -> torch.Tensor:
    """`mamba1_step` on its two kernels (arguments validated by the public op). Returns y (M, D) in h's dtype.

    Float64 weights take the composed ops (the kernels' tensor-core products are 16- or 32-bit). `tiles`
    (BLOCK_M, BLOCK_N, BLOCK_K) and `num_warps` / `num_stages` of kernel 1 and `block_d` (channels per program)
    of kernel 2 default to `mamba1_step_tiles` and the state update's own choice.

    Example:
        >>> y = mamba1_step_triton(h, in_w, None, conv_state, conv_w, conv_b, x_w, None, dt_w, dt_b, A, D, ssm_state)
    """
    if in_proj_weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) or h.shape[0] == 0:
        from .mamba1_step import mamba1_step_composed
        return mamba1_step_composed(h, in_proj_weight, in_proj_bias, conv_state, conv_weight, conv_bias,
                                    x_proj_weight, x_proj_bias, dt_proj_weight, dt_proj_bias, A, D, ssm_state,
                                    backend="triton")
    M, K = h.shape
    N = in_proj_weight.shape[0]
    dim = N // 2
    Q = x_proj_weight.shape[0]
    h, in_proj_weight, x_proj_weight = (t if t.stride(-1) == 1 else t.contiguous()
                                        for t in (h, in_proj_weight, x_proj_weight))
    dtype = in_proj_weight.dtype
    bm, bn, bk = tiles or mamba1_step_tiles(M, N, K)
    if in_proj_cublas:
        xz = torch.nn.functional.linear(h, in_proj_weight, in_proj_bias)
    else:
        xz = torch.empty(M, N, device=h.device, dtype=dtype)
    partials = torch.empty(cdiv(dim, bn), M, Q, device=h.device, dtype=torch.float32)
    x_proj_weight = x_proj_weight.to(dtype)
    pdl = pdl_launch(h.device)
    lines, line = prefetch_lines(K, dtype)
    _in_proj_conv_kernel[(cdiv(dim if in_proj_cublas else N, bn), cdiv(M, bm))](
        h, in_proj_weight, in_proj_bias if in_proj_bias is not None else xz, xz, conv_state, conv_weight,
        conv_bias if conv_bias is not None else xz, x_proj_weight, partials,
        M, N, K, dim, Q,
        h.stride(0), in_proj_weight.stride(0), xz.stride(0), *conv_state.stride(), *conv_weight.stride(),
        x_proj_weight.stride(0), partials.stride(0), partials.stride(1),
        HAS_BIAS=in_proj_bias is not None, CONV_BIAS=conv_bias is not None, WIDTH=conv_weight.shape[1],
        OP=op_dtype(dtype), OUT_DT=tl_dtype(dtype), EMULATE=triton_interpret(), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, BLOCK_Q=max(16, next_power_of_2(Q)), GEMM=not in_proj_cublas, PDL=pdl, LINES=lines, LINE=line,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    y, _ = selective_state_update_triton(ssm_state, xz[:, :dim], None, A, None, None, D=D, z=xz[:, dim:],
                                         dt_bias=dt_proj_bias, dt_softplus=True, dt_proj_weight=dt_proj_weight,
                                         xdbl_partials=partials, x_proj_bias=x_proj_bias, block_d=block_d,
                                         sub_blocks=sub_blocks)
    return y
