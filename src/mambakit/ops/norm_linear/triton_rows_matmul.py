"""Triton kernel of a decode projection for tens of rows (a batch of 9-128 sequences): out = x @ weight^T + bias.

Shapes (legend): M rows (the batch), K input features, N output features.

Why: at batch 64 Mamba-1's decode step is its cuBLAS GEMMs (session 17's profile, BENCHMARKS.md: 415 of 713 us
per step, 2.8-4.8 us a launch, where reading a projection's weights takes 0.5-1.6 us at the copy ceiling). cuBLAS
picks few, large tiles for so few rows, so few SMs pull the weights. Here each program takes all the rows of a
block (BLOCK_M up to 64) against a narrow slice of outputs (BLOCK_N), so the weights are read once and spread over
~N / BLOCK_N programs; the K loop is a tl.dot accumulation in float32 (IEEE products for float32 inputs, as
F.linear's default). Not yet timed on a GPU: `linear_rows_triton` takes it only where `rows_policy.py` says (off
until `benchmarks/gpu_decode_proj.py --rows-matmul` has measured it against cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import pdl_launch
from ..dispatch import triton_interpret
from ..ssd.triton_common import mm, op_dtype, to_dtype
from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import pdl_enter, prefetch_rows_l2, tl_dtype

__all__ = ["rows_matmul_tiles", "rows_matmul", "prefetch_lines"]

_MAX_BLOCK_M = 64
_MIN_PROGRAMS = 128  # about one per SM on an H100 / H200 (132 SMs): the weight loads spread over the SMs


def rows_matmul_tiles(M: int, N: int, K: int, block_n: int | None = None,
                      block_k: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): all rows in one block up to 64 (tl.dot needs >= 16), BLOCK_N halved from 64
    while the grid has fewer than _MIN_PROGRAMS programs (down to 16), BLOCK_K 128 (64 for K < 128). Untuned: the
    benchmark's sweep passes block_n / block_k."""
    block_m = min(_MAX_BLOCK_M, max(16, next_power_of_2(M)))
    if block_n is None:
        block_n = 64
        while block_n > 16 and cdiv(N, block_n) * cdiv(M, block_m) < _MIN_PROGRAMS:
            block_n //= 2
    if block_k is None:
        block_k = 128 if K >= 128 else max(16, next_power_of_2(K))
    return block_m, block_n, block_k


def prefetch_lines(K: int, dtype: torch.dtype) -> tuple[int, int]:
    """(LINES, LINE) for `prefetch_rows_l2` of a weight row of K elements of `dtype`: LINE elements make 128 bytes,
    LINES (a power of two) of them cover the row."""
    line = max(1, 128 // dtype.itemsize)
    return next_power_of_2(cdiv(K, line)), line


@triton.jit
def rows_tile_matmul(x_ptr, w_ptr, rm, rn, m_ok, n_ok, K, s_xm, s_wn, OP: tl.constexpr, EMULATE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                     LINES: tl.constexpr = 1, LINE: tl.constexpr = 64):
    """(BLOCK_M, BLOCK_N) float32 tile of x @ weight^T for rows rm and outputs rn: the K loop of the many-rows
    kernels (this one and `mamba1_step`'s first), weights loaded as their (BLOCK_K, BLOCK_N) transpose.

    PDL: the program's weight rows (LINES requests of LINE elements each, 128 bytes) are asked of the L2 first,
    then `pdl_enter` waits for the previous kernel, which wrote x."""
    if PDL:
        prefetch_rows_l2(w_ptr, rn, n_ok, s_wn, K, LINES, LINE)
    pdl_enter(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * s_wn + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mm(a, wt, acc, OP, EMULATE)
    return acc


@fast_launch
@triton.jit
def _rows_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, s_xm, s_wn, s_om,
                        HAS_BIAS: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr, OUT_DT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                        LINES: tl.constexpr = 1, LINE: tl.constexpr = 64):
    """Program (pid_n, pid_m): out[rows of block pid_m, outputs of block pid_n] = x @ weight^T (+ bias). The
    weights load as their (BLOCK_K, BLOCK_N) transpose; products through the SSD kernels' `mm` (operands in OP,
    float32 accumulation; EMULATE: the interpreter's stand-in for a bf16 dot, see ssd/triton_common.py)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = rows_tile_matmul(x_ptr, w_ptr, rm, rn, m_ok, n_ok, K, s_xm, s_wn, OP, EMULATE, BLOCK_M, BLOCK_N, BLOCK_K,
                           PDL, LINES, LINE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :], to_dtype(acc, OUT_DT, EMULATE),
             mask=m_ok[:, None] & n_ok[None, :])


def rows_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tiles: tuple[int, int, int] | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N,) -> (M, N) in weight's dtype (x has it too; checked by the caller).

    tiles: (BLOCK_M, BLOCK_N, BLOCK_K), default `rows_matmul_tiles`. Forward only.

    Example:
        >>> y = rows_matmul(h, out_proj.weight, out_proj.bias)   # h (64, 1536) bf16 on CUDA
    """
    M, K = x.shape
    N = weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=weight.dtype)
    bm, bn, bk = tiles or rows_matmul_tiles(M, N, K)
    pdl = pdl_launch(x.device)
    lines, line = prefetch_lines(K, weight.dtype)
    _rows_matmul_kernel[(cdiv(N, bn), cdiv(M, bm))](
        x, weight, bias if bias is not None else out, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, OP=op_dtype(weight.dtype), EMULATE=triton_interpret(), OUT_DT=tl_dtype(weight.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl, LINES=lines, LINE=line, num_warps=num_warps,
        num_stages=num_stages, launch_pdl=pdl,
    )
    return out
