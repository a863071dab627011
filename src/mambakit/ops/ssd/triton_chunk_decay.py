"""SSD chunk primitive 1: the effective step dt' and its within-chunk cumulative log-decay.

Shapes (legend): b batch, L seqlen, H nheads, c = ceil(L / T) chunks, T chunk_size.

    dt'_t = clamp(softplus(dt_t + dt_bias), *dt_limit)          a_t = dt'_t A_h   (<= 0 for A <= 0)
    cs_t  = a_{c T} + ... + a_t                                  cumsum restarting at every chunk

Both are written once, chunk-major and padded to c * T: dt' is 0 past the end of the sequence, so the
padding neither decays the state (cs stays at the last real token's value) nor feeds it. Every later
kernel reads these two small (b, H, c, T) fp32 tensors instead of recomputing softplus per tile. The
backward of this stage (softplus/limit derivative, the reverse cumsum of dcs into da, dA, ddt, dt_bias)
is fused into the dx kernel of `triton_chunk_scan_bwd.py`, which holds dcs for a whole chunk anyway.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import dt_transform

__all__ = ["chunk_decay_fwd"]


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_decay_fwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dtp_ptr, cs_ptr,
    seqlen, nheads, nchunks, lo, hi,
    s_dt_b, s_dt_l, s_dt_h,
    T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.cast(tl.program_id(2), tl.int64)
    offs_t = tl.arange(0, T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = pid_c * T + offs_t
    hmask = offs_h < nheads
    mask = (pos < seqlen)[:, None] & hmask[None, :]
    # (T, BLOCK_H) tile: heads are the contiguous dim of dt
    v = tl.load(dt_ptr + pid_b * s_dt_b + pos[:, None] * s_dt_l + offs_h[None, :] * s_dt_h,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    dtp = dt_transform(v, lo, hi, SOFTPLUS, HAS_LIMIT)
    dtp = tl.where(mask, dtp, 0.0)
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    cs = tl.cumsum(dtp * A[None, :], axis=0)
    out = ((pid_b * nheads + offs_h[None, :]) * nchunks + pid_c) * T + offs_t[:, None]  # (b, H, c, T) layout
    tl.store(dtp_ptr + out, dtp, mask=hmask[None, :])
    tl.store(cs_ptr + out, cs, mask=hmask[None, :])


def chunk_decay_fwd(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                    dt_limit: tuple[float, float], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dt' and the within-chunk cumsum of dt' * A.

    Args:
        dt: (b, L, H) any float dtype, last dim contiguous.   A, dt_bias: (H,) float32.
    Returns:
        dtp, cs: (b, H, c, T) float32, c = ceil(L / T), padded with dt' = 0.

    Example:
        >>> dtp, cs = chunk_decay_fwd(dt, A, dt_bias, True, (0.0, math.inf), 256)
    """
    b, L, H = dt.shape
    T = chunk_size
    nc = cdiv(L, T)
    dtp = torch.empty(b, H, nc, T, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dtp)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_limit = lo > 0.0 or hi < math.inf
    block_h = min(next_power_of_2(H), max(1, 4096 // T))
    grid = (nc, cdiv(H, block_h), b)
    _chunk_decay_fwd_kernel[grid](
        dt, A, dt_bias if dt_bias is not None else A, dtp, cs,
        L, H, nc, lo, hi if has_limit else 0.0,
        dt.stride(0), dt.stride(1), dt.stride(2),
        T=T, BLOCK_H=block_h, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        num_warps=4,
    )
    return dtp, cs
