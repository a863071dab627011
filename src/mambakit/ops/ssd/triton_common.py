"""Pieces shared by the SSD Triton kernels: the dot helper, the dt transform and its derivative, launch facts.

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

__all__ = ["mm", "to_dtype", "softplus", "dt_transform", "dt_transform_grad", "silu", "silu_grad", "op_dtype",
           "store_dtype", "kernel_flags", "dtype_of"]


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


@triton.jit
def softplus(v):
    """log(1 + exp(v)) in fp32, matching torch's threshold of 20.

    log1p(u) is evaluated as u * log(w) / (w - 1), w = 1 + u (Goldberg): log(1 + u) alone would lose all
    digits of a tiny u (dt biased far below zero) and libdevice's log1p is absent from the interpreter.
    """
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    l1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + l1p)


@triton.jit
def dt_transform(v, lo, hi, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """dt' = clamp(softplus(v), lo, hi) where v = dt + dt_bias (fp32)."""
    if SOFTPLUS:
        v = softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v


@triton.jit
def dt_transform_grad(v, lo, hi, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """d dt' / d v, as torch's autograd of softplus (threshold 20) and clamp (passes on lo <= dt' <= hi)."""
    g = tl.full(v.shape, 1.0, tl.float32)
    sp = v
    if SOFTPLUS:
        g = tl.where(v > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-v)))
        sp = softplus(v)
    if HAS_LIMIT:
        g = tl.where((sp >= lo) & (sp <= hi), g, 0.0)
    return g


@triton.jit
def silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def silu_grad(z):
    s = 1.0 / (1.0 + tl.exp(-z))
    return s * (1.0 + z * (1.0 - s))


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

