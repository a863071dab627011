"""Triton backend of `mamba2_inner`: one autograd node over the conv, SSD, gated-norm launchers and out_proj.

Shapes (legend) and what is kept / recomputed: see mamba2.py's docstring. Kept: zxbcdt, y before the norm
(or, without a norm, the SSD's y before its z gate), the parameters. Recomputed in the backward: the conv
output, the SSD's decay / C B^T / chunk-state launches, the norm output (for out_proj's weight gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d.triton_conv import _causal_conv1d_bwd, _causal_conv1d_fwd
from ..rms_norm.triton_norm import _rms_norm_bwd, _rms_norm_fwd
from ..ssd.triton_ssd import kernel_chunk, ssd_triton_backward, ssd_triton_forward, ssd_triton_intermediates
from .mamba2 import _views

__all__ = ["mamba2_inner_triton"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# triton: one autograd node (launchers only)
# ----------------------------------------------------------------------------------------------


class _Mamba2InnerFunction(torch.autograd.Function):
    """zxbcdt and parameters -> out_proj's output; the module docstring says what is kept and recomputed."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias,
                seq_idx, dims, T, dt_limit, norm_eps, norm_group, norm_before_gate):
        H, P, G, N = dims
        S = H * P
        batch, seqlen, _ = zxbcdt.shape
        xBC_in = _views(zxbcdt, None, H, P, G, N)[1]
        xBC, _ = _causal_conv1d_fwd(xBC_in, conv_weight, conv_bias, None, seq_idx, True, False)  # (b, L, K)
        z, _, dt, x, B, C = _views(zxbcdt, xBC, H, P, G, N)
        gate = None if norm_weight is not None else z.unflatten(-1, (H, P))
        y, _, (_, _, _, _, y_pre) = ssd_triton_forward(x, dt, A, B, C, D, gate, dt_bias, None, seq_idx, True,
                                                       dt_limit, T)  # y: (b, L, H, P)
        del xBC, x, B, C
        if norm_weight is not None:
            y_out, _ = _rms_norm_fwd(y.view(-1, S), norm_weight, z.reshape(-1, S), norm_eps, norm_group,
                                     norm_before_gate)  # (b L, S); rstd not kept: the backward reruns this
            keep = y
        else:
            y_out, keep = y.view(-1, S), y_pre  # the SSD backward needs y before the gate, in float32
        out = F.linear(y_out, out_proj_weight, out_proj_bias).view(batch, seqlen, -1)  # (b, L, M)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight,
                              out_proj_bias, seq_idx, keep)
        ctx.dims, ctx.T, ctx.dt_limit = dims, T, dt_limit
        ctx.norm_eps, ctx.norm_group, ctx.norm_before_gate = norm_eps, norm_group, norm_before_gate
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias, seq_idx,
         keep) = ctx.saved_tensors
        H, P, G, N = ctx.dims
        S, T = H * P, ctx.T
        batch, seqlen, _ = zxbcdt.shape
        rows = batch * seqlen
        xBC_in = _views(zxbcdt, None, H, P, G, N)[1]

        # recompute the conv output
        xBC, _ = _causal_conv1d_fwd(xBC_in, conv_weight, conv_bias, None, seq_idx, True, False)
        z, _, dt, x, B, C = _views(zxbcdt, xBC, H, P, G, N)
        z2 = z.reshape(rows, S)  # a view: rows of zxbcdt
        if norm_weight is not None:
            y2 = keep.view(rows, S)
            y_out, rstd = _rms_norm_fwd(y2, norm_weight, z2, ctx.norm_eps, ctx.norm_group, ctx.norm_before_gate)
        else:
            y_out = (keep * F.silu(z.unflatten(-1, (H, P)).float())).to(x.dtype).view(rows, S)

        # out_proj: matmuls in dout's dtype (under autocast the forward ran in it as well)
        dout2 = dout.reshape(rows, -1)
        d_out_w = (dout2.t() @ y_out.to(dout2.dtype)).to(out_proj_weight.dtype)
        d_out_b = dout2.sum(0).to(out_proj_bias.dtype) if out_proj_bias is not None else None
        dy_out = dout2 @ out_proj_weight.to(dout2.dtype)  # (b L, S)
        del y_out

        dzxbcdt = torch.empty_like(zxbcdt)  # every gradient of in_proj's output lands here, slice by slice
        d_norm_w = None
        if norm_weight is not None:
            dy2, d_norm_w, dz2 = _rms_norm_bwd(y2, norm_weight, z2, rstd, dy_out.to(y2.dtype), ctx.norm_group,
                                               ctx.norm_before_gate)
            dzxbcdt[..., :S].copy_(dz2.view(batch, seqlen, S))
            dy, gate, y_pre = dy2.view(batch, seqlen, H, P), None, None
            del dz2
        else:
            dy, gate, y_pre = dy_out.to(x.dtype).view(batch, seqlen, H, P), z.unflatten(-1, (H, P)), keep
        del dy_out

        # SSD backward, from its recomputed intermediates (decay, C B^T, chunk states; y itself is kept)
        dtp, cs, cb, states, _ = ssd_triton_intermediates(x, dt, A, B, C, dt_bias, None, seq_idx, True,
                                                          ctx.dt_limit, T)
        dx, ddt, dA, dB, dC, dD, dz, d_dt_bias, _ = ssd_triton_backward(
            dy, None, x, dt, A, B, C, D, gate, dt_bias, seq_idx, dtp, cs, cb, states, y_pre, True, ctx.dt_limit, T,
            False)
        del dy, xBC, x, B, C, dtp, cs, cb, states
        if dz is not None:
            dzxbcdt[..., :S].copy_(dz.view(batch, seqlen, S))
        dzxbcdt[..., S + xBC_in.shape[-1]:].copy_(ddt)

        # conv backward: its upstream gradient is x‖B‖C's; its input gradient goes straight into dzxbcdt
        dxBC = torch.empty(batch, seqlen, xBC_in.shape[-1], device=zxbcdt.device, dtype=zxbcdt.dtype)
        dxBC[..., :S].copy_(dx.view(batch, seqlen, S))
        dxBC[..., S:S + G * N].copy_(dB.view(batch, seqlen, G * N))
        dxBC[..., S + G * N:].copy_(dC.view(batch, seqlen, G * N))
        del dx, dB, dC
        _, d_conv_w, d_conv_b, _ = _causal_conv1d_bwd(xBC_in, conv_weight, conv_bias, None, seq_idx, True, dxBC,
                                                      None, False, dx=_views(dzxbcdt, None, H, P, G, N)[1])
        return (dzxbcdt, d_conv_w, d_conv_b, d_dt_bias, dA, dD, d_norm_w, d_out_w, d_out_b,
                None, None, None, None, None, None, None)


def mamba2_inner_triton(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias,
                         dims, chunk_size, dt_limit, norm_eps, norm_group, norm_before_gate, seq_idx):
    """Normalise layouts and dtypes (float32 parameters: the kernels' accumulators) and apply the node."""
    if zxbcdt.dtype not in _TRITON_DTYPES:
        raise ValueError(f"mamba2_inner: backend 'triton' needs zxbcdt of dtype float32, bfloat16 or float16, got "
                         f"{zxbcdt.dtype} (use backend='torch' for float64)")
    seqlen = zxbcdt.shape[1]
    if seqlen == 0:
        raise ValueError("mamba2_inner: backend 'triton' needs seqlen >= 1")
    # the SSD launchers' chunk: as `ssd_triton` picks it (a power of two in [16, 256], no longer than needed)
    T = kernel_chunk(chunk_size, seqlen)
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    A = A.float()
    D = D.float().contiguous() if D is not None else None
    dt_bias = dt_bias.float().contiguous() if dt_bias is not None else None
    norm_weight = norm_weight.contiguous() if norm_weight is not None else None
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return _Mamba2InnerFunction.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight,
                                      out_proj_bias, seq_idx, dims, T, (lo, hi), float(norm_eps), norm_group,
                                      norm_before_gate)
