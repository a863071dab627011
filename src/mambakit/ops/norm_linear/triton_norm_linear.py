"""Triton kernel of the decode step's normalised projections: RMSNorm prologue, matmul, causal-conv epilogue.

Shapes (legend): B batch, K input features (the normalised width), N output features, G norm groups,
C conv channels (a contiguous range of the N outputs), W conv width.

    add mode:    s = x + r  (stored: the residual stream);  a = rmsnorm(s) * norm_weight
    gated mode:  g = x * silu(z) (or after the norm: norm_before_gate);  a = rmsnorm_per_group(g) * norm_weight
    out = a @ weight^T (+ bias);  out[:, c0:c0+C] = silu(causal_conv1d_update(conv_state, out[:, c0:c0+C]))

At batch 1 a decode step is bound by kernel launches, not bytes, so the norm before a projection and the
depthwise conv after it ride in the projection's kernel. The norm needs whole rows: every program makes a
first pass over its rows' K features for the sums of squares (B x K values, a few KB from L2), then a second
that normalises each K block and multiplies it into its (BLOCK_N,) slice of outputs. The conv is depthwise,
so an output channel needs only its own window: the program that computes a channel updates its window, and
no two programs touch one window. Roundings follow the unfused ops: s in the promoted dtype, the normalised
activation in the weight's dtype, the projection's output in its dtype before the conv reads it.

Up to 8 rows (the fused decode step's batches) with K <= 8192, `norm_linear_triton` launches the few-rows kernel
of `triton_gemv.py` instead (one load of the weights, one pass over each row): this tiled kernel serves the
larger batches (tensor cores from 16 rows) and the wider rows. It launches without programmatic dependent launch:
with PDL in it (weights asked of the L2, then the wait) and in every other kernel of that step, Mamba-1's fused step
at 64 rows ran 14% slower than with PDL off (H100, session 40, BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import triton_interpret
from ..ssd.triton_common import to_dtype
from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import tl_compute_dtype, tl_dtype
from .triton_gemv import gemv_tiles, launch_gemv
from .triton_parts import _conv_epilogue, _prologue

__all__ = ["norm_linear_triton"]


@fast_launch
@triton.jit
def _norm_linear_kernel(
    x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, s_ptr, cs_ptr, cw_ptr, cb_ptr,
    batch, K, N, eps, group, c0, n_conv,
    s_xb, s_rb, s_zb, s_wn, s_ob, s_sb, s_csb, s_csd, s_csw, s_cwd, s_cww,
    GATED: tl.constexpr, HAS_R: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CONV: tl.constexpr, CONV_BIAS: tl.constexpr, WIDTH: tl.constexpr, NG: tl.constexpr,
    SUM_DT: tl.constexpr, NW_DT: tl.constexpr, OUT_DT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < batch
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    gi = tl.arange(0, NG)

    # pass 1: sums of squares per row and norm group
    ss = tl.zeros((BLOCK_B, NG), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        h, _ = _prologue(x_ptr, r_ptr, z_ptr, rows, row_ok, k, k_ok, s_xb, s_rb, s_zb,
                         GATED, HAS_R, NORM_BEFORE_GATE, SUM_DT, NW_DT, ACC, EMULATE)
        if NG == 1:
            ss += tl.sum(h * h, axis=1)[:, None]
        else:
            onehot = ((k // group)[:, None] == gi[None, :]).to(ACC)  # (BLOCK_K, NG)
            ss += tl.sum((h * h)[:, :, None] * onehot[None, :, :], axis=1)
    rstd = 1.0 / tl.sqrt(ss / group + eps)  # (BLOCK_B, NG)

    # pass 2: normalise each K block and multiply it into this program's outputs
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32 if USE_DOT else ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        h, extra = _prologue(x_ptr, r_ptr, z_ptr, rows, row_ok, k, k_ok, s_xb, s_rb, s_zb,
                             GATED, HAS_R, NORM_BEFORE_GATE, SUM_DT, NW_DT, ACC, EMULATE)
        if not GATED:
            if pid_n == 0:  # one program per row block writes the residual stream
                tl.store(s_ptr + rows[:, None] * s_sb + k[None, :], extra.to(s_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & k_ok[None, :])
        if NG == 1:
            r_k = tl.sum(rstd, axis=1)[:, None]  # (BLOCK_B, 1)
        else:
            onehot = ((k // group)[:, None] == gi[None, :]).to(ACC)
            r_k = tl.sum(rstd[:, None, :] * onehot[None, :, :], axis=2)  # (BLOCK_B, BLOCK_K)
        a = h * r_k * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(ACC)[None, :]
        if GATED:
            if NORM_BEFORE_GATE:
                a = a * extra
        a = to_dtype(a, OUT_DT, EMULATE).to(ACC)  # the normalised activation, as the unfused norm returns it
        w = tl.load(w_ptr + n[None, :] * s_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if USE_DOT:
            if EMULATE:
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif OUT_DT == tl.float32:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a.to(OUT_DT), w)
        else:
            acc += tl.sum(a[:, :, None] * w.to(ACC)[None, :, :], axis=1)
    out = acc.to(ACC)
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(ACC)[None, :]
    out = to_dtype(out, OUT_DT, EMULATE).to(ACC)  # the projection's output dtype, as the conv reads it

    if CONV:
        out = _conv_epilogue(out, rows, row_ok, n, n_ok, cs_ptr, cw_ptr, cb_ptr, c0, n_conv, s_csb, s_csd, s_csw,
                             s_cwd, s_cww, CONV_BIAS, WIDTH, ACC)
    tl.store(out_ptr + rows[:, None] * s_ob + n[None, :], to_dtype(out, OUT_DT, EMULATE),
             mask=row_ok[:, None] & n_ok[None, :])


def _tiles(batch: int, N: int, K: int) -> tuple[int, int, int, bool]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, use tl.dot). Small batches multiply on CUDA cores, from 16 rows on tensor cores.

    The output slice per program narrows until there are >= 128 programs (an H100 / H200 has 132 SMs): at
    batch 1 the step's latency is one program's pass over K, so the weights are best spread over every SM
    (out_proj of Mamba-2, N = 768: 96 programs of 8 outputs instead of 24 of 32). Untuned on the GPU: chosen
    by that argument alone.
    """
    if batch >= 16:
        # 16-row blocks: every program re-reads its rows for the norm (twice), so rows per program stay few
        block_b, block_n, floor, use_dot = 16, 64, 32, True
    else:
        block_b, block_n, floor, use_dot = next_power_of_2(batch), 32, 8, False
    while block_n > floor and cdiv(N, block_n) * cdiv(batch, block_b) < 128:
        block_n //= 2
    block_k = 64 if use_dot else max(16, min(next_power_of_2(K), 4096 // (block_b * block_n)))
    return block_b, block_n, block_k, use_dot


def norm_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    residual_dtype: torch.dtype | None = None,
    conv_state: torch.Tensor | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    conv_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One kernel: (add + RMSNorm | gated RMSNorm) -> x @ weight^T + bias -> (conv update + silu on a channel range).

    Arguments as in `mambakit.ops.add_rms_norm_linear` / `gated_rms_norm_linear` (validated there); gated mode
    when `z` is given. Shapes: x, residual, z (B, K); weight (N, K); norm_weight (K,); bias (N,);
    conv_state (B, C, W-1) updated in place; conv_weight (C, W); conv_bias (C,).
    Returns (out (B, N) in weight's dtype, the residual stream s (B, K) in add mode, else None).

    Example:
        >>> out, s = norm_linear_triton(h, in_proj.weight, norm.weight, residual=r, residual_dtype=torch.float32)
    """
    batch, K = x.shape
    N = weight.shape[0]
    gated = z is not None
    acc = tl_compute_dtype(torch.promote_types(x.dtype, weight.dtype))
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights_as_given = weight.stride(-1) == 1 and norm_weight.is_contiguous()  # no copy right before the kernel
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty(batch, N, device=x.device, dtype=weight.dtype)
    s = None
    sum_dtype = x.dtype
    if not gated:
        if residual is not None:
            residual = residual if residual.stride(-1) == 1 else residual.contiguous()
            sum_dtype = torch.promote_types(x.dtype, residual.dtype)
        s = torch.empty(batch, K, device=x.device, dtype=residual_dtype or sum_dtype)
    else:
        z = z if z.stride(-1) == 1 else z.contiguous()
    group = K if not gated or group_size is None else group_size
    ng = next_power_of_2(K // group)
    conv = conv_state is not None
    few_rows = gemv_tiles(batch, N, K, ng)
    if few_rows is not None and batch > 0:
        launch_gemv(x, weight, out, few_rows, norm=True, residual=residual, z=z, norm_weight=norm_weight.contiguous(),
                    bias=bias, s=s, eps=eps, group=group, ng=ng, norm_before_gate=norm_before_gate,
                    sum_dtype=sum_dtype, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias,
                    conv_start=conv_start, pdl_ok=weights_as_given)
        return out, s
    block_b, block_n, block_k, use_dot = _tiles(batch, N, K)
    if ng > 1:
        block_k = min(block_k, 32)  # the one-hot group tiles are (BLOCK_B, BLOCK_K, NG)
    dummy = out
    grid = (cdiv(N, block_n), cdiv(batch, block_b))
    _norm_linear_kernel[grid](
        x, residual if residual is not None else dummy, z if gated else dummy, norm_weight.contiguous(), weight,
        bias if bias is not None else dummy, out, s if s is not None else dummy,
        conv_state if conv else dummy, conv_weight if conv else dummy,
        conv_bias if conv and conv_bias is not None else dummy,
        batch, K, N, float(eps), group, conv_start, conv_weight.shape[0] if conv else 0,
        x.stride(0), residual.stride(0) if residual is not None else 0, z.stride(0) if gated else 0,
        weight.stride(0), out.stride(0), s.stride(0) if s is not None else 0,
        *(conv_state.stride() if conv else (0, 0, 0)), *(conv_weight.stride() if conv else (0, 0)),
        GATED=gated, HAS_R=residual is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None,
        CONV=conv, CONV_BIAS=conv and conv_bias is not None, WIDTH=conv_weight.shape[1] if conv else 2, NG=ng,
        SUM_DT=tl_dtype(sum_dtype), NW_DT=tl_dtype(norm_weight.dtype), OUT_DT=tl_dtype(weight.dtype), ACC=acc,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, EMULATE=triton_interpret(),
        num_warps=8 if use_dot else 4,  # the tensor-core tiles with the conv epilogue: ~250 registers at 4 warps
    )
    return out, s
