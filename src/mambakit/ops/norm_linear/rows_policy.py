"""Which decode projections take the many-rows kernel (`triton_rows_matmul.py`): plain Python, so that the modules
can ask without importing Triton (which a CPU install may not have).

ROWS_MATMUL_MAX_ROWS is 0, off: timed against cuBLAS on an H100 (session 34, BENCHMARKS.md), the kernel is no faster
at 16-128 rows (every 130M projection takes 3.1-4.9 us either way: the launch and the weights' first bytes, not the
tiles) and batch-64 decoding measured 78.4k vs 78.0k tokens/s (Mamba-1) and 44.7k vs 46.2k (Mamba-2) with it on vs
off. The benchmarks (`gpu_inference.py --rows-matmul-max-rows N`) and the tests set it. It is read at each call, so
setting it switches both `decode_linear`'s Triton path and the mixers' decode step.
"""

from __future__ import annotations

__all__ = ["ROWS_MATMUL_MIN_ROWS", "ROWS_MATMUL_MAX_ROWS", "takes_rows_matmul"]

ROWS_MATMUL_MIN_ROWS = 9  # below: the few-rows kernel (triton_gemv.py) or cuBLAS
ROWS_MATMUL_MAX_ROWS = 0


def takes_rows_matmul(rows: int) -> bool:
    """Whether a projection of `rows` rows takes the many-rows kernel.

        >>> takes_rows_matmul(64)   # off by default
        False
    """
    return ROWS_MATMUL_MIN_ROWS <= rows <= ROWS_MATMUL_MAX_ROWS
