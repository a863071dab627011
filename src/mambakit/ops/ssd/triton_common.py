"""Pieces shared by the SSD Triton kernels: the dot helper, dtype rounding, launch facts (the dt transform,
silu and their derivatives are in ops/triton_math.py, shared with the other families).

Shapes (legend): b batch, L seqlen, H nheads, P headdim, G ngroups, N dstate, c nchunks, T chunk_size.

Every kernel of the SSD op multiplies through `mm`: operands are rounded to the inputs' dtype
(bf16/fp16 run on tensor cores with fp32 accumulators; fp32 inputs use IEEE fp32, because tf32 alone
misses the 1e-4 tolerance of the float32 tests) and accumulate in fp32. Under Triton's interpreter a
bf16 `tl.dot` multiplies the raw bit patterns (numpy has no bf16) and fp32 -> bf16 casts truncate, so
`EMULATE` rounds to nearest even by hand (`to_dtype`, also used for every low-precision store) and
multiplies in fp32: CPU tests see the same roundings as the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpret

__all__ = ["mm", "to_dtype", "op_dtype", "store_dtype", "kernel_flags", "dtype_of"]


@triton.jit
def to_dtype(x, DT: tl.constexpr, EMULATE: tl.constexpr):
    """x.to(DT) rounding to nearest even, as the GPU does.

    The interpreter truncates fp32 -> bf16 (a biased rounding the GPU never does), so under EMULATE
    the value is first rounded to nearest even by hand on its bits; the cast then loses nothing.
    """
    if EMULATE:
        if DT == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def mm(a, b, acc, OP: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b, operands rounded to OP, fp32 accumulation."""
    a = to_dtype(a, OP, EMULATE)
    b = to_dtype(b, OP, EMULATE)
    if EMULATE:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if EMULATE or OP == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dtype_of(t: torch.dtype):
    """The Triton dtype of a torch dtype (float32, bfloat16, float16)."""
    return _TL_DTYPES[t]


def op_dtype(x_dtype: torch.dtype):
    """Dot-operand dtype: the inputs' own low precision, else IEEE fp32."""
    return _TL_DTYPES[x_dtype] if x_dtype in (torch.bfloat16, torch.float16) else tl.float32


def store_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the per-chunk states and state gradients.

    bf16 inputs keep them in bf16: they only ever feed dot operands that are rounded to bf16 anyway,
    and this halves the largest intermediate (b, c, H, P, N). fp16 keeps fp32 (range), fp32 keeps fp32.
    """
    return torch.bfloat16 if x_dtype == torch.bfloat16 else torch.float32


def kernel_flags(x_dtype: torch.dtype) -> dict:
    """The OP / EMULATE constexprs every SSD kernel takes."""
    return {"OP": op_dtype(x_dtype), "EMULATE": triton_interpret()}

