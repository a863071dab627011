"""Numeric helpers shared by the Triton kernels of every family (the torch side is `ops/common.py`).

Everything here is `@triton.jit` and inlined where it is called, so a kernel that calls `silu(z)` compiles to
the code it had with the expression written out. Two dt transforms live here on purpose, with different
numerics that the kernels' tests and figures rely on:

    dt_softplus_sigmoid  (selective scan)  softplus through exp2 and log1p, no threshold; libdevice's log1p and
                                           fast divide on the GPU; returns dt' and sigmoid(v) (d dt' / d v)
    dt_transform         (SSD)             softplus with torch's threshold of 20, then clamp to dt_limit;
                                           `dt_transform_grad` is its derivative

`pdl_enter`, `prefetch_l2` and `lane_xor` are inline PTX (programmatic dependent launch, L2 prefetch, a warp
shuffle): kernels call them under a constexpr that their launchers set False under the interpreter, which cannot run
PTX.

`LIBDEVICE` is False under Triton's interpreter (`TRITON_INTERPRET=1`), which has no libdevice: the helpers
that take it fall back to portable formulas with the same accuracy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["LOG2E", "log1p", "fast_sigmoid", "dt_softplus_sigmoid", "softplus", "dt_transform", "dt_transform_grad",
           "sigmoid", "silu", "silu_grad", "tl_dtype", "tl_compute_dtype", "pdl_enter", "prefetch_l2",
           "prefetch_rows_l2", "lane_xor"]

# exp(v) = exp2(v * LOG2E): one MUFU instruction per exponential; kernels pre-scale A by it once
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def log1p(w, LIBDEVICE: tl.constexpr):
    # log(1 + w) loses the low bits of a small w (dt' ~ 1e-3 is typical): keep relative accuracy
    if LIBDEVICE:
        r = libdevice.log1p(w)
    else:  # Triton's interpreter has no libdevice: Goldberg's exact-rounding trick
        u = 1.0 + w
        r = tl.where(u == 1.0, w, tl.log(u) * (w / tl.where(u == 1.0, 1.0, u - 1.0)))
    return r


@triton.jit
def fast_sigmoid(v, LIBDEVICE: tl.constexpr):
    # 1 / (1 + exp(-v)) with exp2 and the approximate divide (MUFU rcp, <= 2 ulp): tl.sigmoid's IEEE
    # division carries range-check instructions on every use, paid per channel and step
    e = tl.exp2(-v * LOG2E)
    if LIBDEVICE:
        r = libdevice.fast_dividef(1.0, 1.0 + e) if v.dtype == tl.float32 else 1.0 / (1.0 + e)
    else:
        r = 1.0 / (1.0 + e)
    return r


@triton.jit
def dt_softplus_sigmoid(dt, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIBDEVICE: tl.constexpr):
    """The selective scan's dt' = softplus(dt + bias) and d dt'/d dt = sigmoid(dt + bias) (1 without softplus)."""
    v = dt
    if HAS_BIAS:
        v = v + bias
    if SOFTPLUS:
        w = tl.exp2(-tl.abs(v) * LOG2E)  # exp(-|v|) in (0, 1]: never overflows
        delta = tl.maximum(v, 0.0) + log1p(w, LIBDEVICE)
        sig = fast_sigmoid(v, LIBDEVICE)
    else:
        delta = v
        sig = tl.full(v.shape, 1.0, v.dtype)
    return delta, sig


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
    """The SSD's dt' = clamp(softplus(v), lo, hi) where v = dt + dt_bias (fp32)."""
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
def sigmoid(z):
    """1 / (1 + exp(-z)) with IEEE division, spelled out so that float64 tiles stay float64."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def silu(z):
    """z * sigmoid(z) as z / (1 + exp(-z)): one division, float64 tiles stay float64."""
    return z / (1.0 + tl.exp(-z))


@triton.jit
def silu_grad(z):
    """d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    s = 1.0 / (1.0 + tl.exp(-z))
    return s * (1.0 + z * (1.0 - s))


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL (the kernel launched with programmatic dependent launch, `ops.common.pdl_launch`): wait until the
    kernel before this one in the stream has finished and its writes are visible, then let the next kernel
    launch. Everything a program does before this call may read only data no recent kernel writes (weights,
    biases); every store and every read of activations or states comes after it. The next kernel is released
    only after the wait, so at most two kernels are in flight and each still sees every earlier one finished.
    Without PDL: nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask the L2 to fetch the lines holding `ptrs` (PTX `prefetch.global.L2`, SASS `CCTL.E.PF2`): no register
    waits for it, so a row needed many steps later costs one instruction now and an L2 hit then. Inline PTX, which
    Triton's interpreter cannot run: launchers pass a zero prefetch distance there (a prefetch changes no value)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def lane_xor(v, lanes, M: tl.constexpr, PTX: tl.constexpr):
    """The value of lane i ^ M on lane i, for a (32,) `v` held one element per lane (one warp, element i on lane i;
    `lanes` = tl.arange(0, 32)). PTX and float32: one `shfl.sync.bfly` with M folded into it; else tl.gather, which
    the interpreter runs (compiled, a SHFL.IDX per 32 bits that keeps lanes ^ M in a register)."""
    if PTX and v.dtype == tl.float32:
        r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 31, -1;", "=r,r,r",
                                      [v, tl.full(v.shape, M, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.gather(v, lanes ^ M, 0)
    return r


@triton.jit
def prefetch_rows_l2(ptr, rows, row_ok, s_row, K, LINES: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of `K` contiguous elements from each of `rows` (row r starts at ptr + r * s_row): one request per
    LINE elements (128 bytes), LINES of them per row (LINES * LINE >= K). A program's weight slice, asked for
    before `pdl_enter` so that it is on its way while the previous kernel finishes. Requests outside the rows
    (row_ok False) or past K ask for `ptr` itself instead: a prefetch cannot be masked."""
    off = tl.arange(0, LINES) * LINE
    ok = row_ok[:, None] & (off < K)[None, :]
    prefetch_l2(tl.where(ok, ptr + rows[:, None] * s_row + off[None, :], ptr))


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype (float32, float64, bfloat16, float16)."""
    return _TL_DTYPES[dtype]


def tl_compute_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of `dtype`: tl.float64 for float64, tl.float32 otherwise
    (`ops.common.compute_dtype` on the Triton side)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
