"""Triton parts shared by the decode projections' kernels: the norm prologue and the causal-conv epilogue.

Shapes (legend): R rows of a tile (batch rows), K input features, N output features, C conv channels, W conv width.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..ssd.triton_common import to_dtype
from ..triton_math import silu

__all__ = ["_conv_epilogue", "_prologue"]


@triton.jit
def _prologue(x_ptr, r_ptr, z_ptr, rows, row_ok, k, k_ok, s_xb, s_rb, s_zb,
              GATED: tl.constexpr, HAS_R: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
              SUM_DT: tl.constexpr, NW_DT: tl.constexpr, ACC: tl.constexpr, EMULATE: tl.constexpr):
    """(BLOCK_B, BLOCK_K) values to normalise; add mode also returns s (the residual stream), gated mode the gate."""
    m = row_ok[:, None] & k_ok[None, :]
    v = tl.load(x_ptr + rows[:, None] * s_xb + k[None, :], mask=m, other=0.0).to(ACC)
    if GATED:
        extra = silu(tl.load(z_ptr + rows[:, None] * s_zb + k[None, :], mask=m, other=0.0).to(ACC))
        if NORM_BEFORE_GATE:
            h = v
        else:
            h = v * extra
    else:
        if HAS_R:
            v += tl.load(r_ptr + rows[:, None] * s_rb + k[None, :], mask=m, other=0.0).to(ACC)
        extra = to_dtype(v, SUM_DT, EMULATE).to(ACC)  # the sum as torch's promoted add rounds it
        h = to_dtype(extra, NW_DT, EMULATE).to(ACC)  # normalised after the cast to the norm weight's dtype
    return h, extra


@triton.jit
def _conv_epilogue(out, rows, row_ok, n, n_ok, cs_ptr, cw_ptr, cb_ptr, c0, n_conv, s_csb, s_csd, s_csw, s_cwd, s_cww,
                   CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr, ACC: tl.constexpr):
    """(rows, BLOCK_N) outputs -> the same with silu(causal conv update) on the conv channels c0 .. c0 + n_conv - 1,
    whose windows (conv_state) shift in place. Depthwise: each output channel reads and writes only its own window."""
    c = n - c0
    is_conv = (c >= 0) & (c < n_conv) & n_ok
    cm = row_ok[:, None] & is_conv[None, :]
    st = cs_ptr + rows[:, None] * s_csb + c[None, :] * s_csd
    conv = out * tl.load(cw_ptr + c * s_cwd + (WIDTH - 1) * s_cww, mask=is_conv, other=0.0).to(ACC)[None, :]
    slots = ()
    for j in tl.static_range(WIDTH - 1):
        s_j = tl.load(st + j * s_csw, mask=cm, other=0.0)
        slots = slots + (s_j,)
        conv += s_j.to(ACC) * tl.load(cw_ptr + c * s_cwd + j * s_cww, mask=is_conv, other=0.0).to(ACC)[None, :]
    if CONV_BIAS:
        conv += tl.load(cb_ptr + c, mask=is_conv, other=0.0).to(ACC)[None, :]
    # every read of the old window happens before any write of the new one (the window is updated in place)
    tl.debug_barrier()
    for j in tl.static_range(WIDTH - 2):
        tl.store(st + j * s_csw, slots[j + 1], mask=cm)
    tl.store(st + (WIDTH - 2) * s_csw, out.to(cs_ptr.dtype.element_ty), mask=cm)
    return tl.where(is_conv[None, :], silu(conv), out)
