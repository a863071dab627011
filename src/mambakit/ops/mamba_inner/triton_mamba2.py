"""Triton backend of `mamba2_inner`: one autograd node over the conv, SSD, gated-norm launchers and out_proj.

Shapes (legend) and what is kept / recomputed: see mamba2.py's docstring. Kept: zxbcdt, y before the norm
(or, without a norm, the SSD's y before its z gate), the parameters. Recomputed in the backward: the conv
output, the SSD's decay / C B^T / chunk-state launches, the norm output (for out_proj's weight gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d.triton_conv import causal_conv1d_bwd, causal_conv1d_fwd
from ..common import autograd_op, fake_grads, pack_grads, unpack_grads
from ..rms_norm import GatedNormSpec
from ..rms_norm.triton_norm import rms_norm_bwd, rms_norm_fwd
from ..ssd.triton_ssd import kernel_chunk, ssd_triton_backward, ssd_triton_forward, ssd_triton_intermediates
from .mamba2 import _views

__all__ = ["mamba2_inner_triton"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# triton: one autograd node (launchers only)
# ----------------------------------------------------------------------------------------------


# One custom op pair (torch.library, autograd registered): compile, autocast and FSDP see one op with fake tensors.


def _mamba2_inner_fwd_impl(zxbcdt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                           dt_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor | None,
                           norm_weight: torch.Tensor | None, out_proj_weight: torch.Tensor,
                           out_proj_bias: torch.Tensor | None, seq_idx: torch.Tensor | None, dims: list[int], T: int,
                           dt_limit: list[float], norm_eps: float, norm_group: int,
                           norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out (b, L, M), and what the backward keeps: y (b, L, H, P) before the norm, or without a norm the SSD's
    float32 y before its gate."""
    H, P, G, N = dims
    S = H * P
    batch, seqlen, _ = zxbcdt.shape
    xBC_in = _views(zxbcdt, None, H, P, G, N)[1]
    xBC, _ = causal_conv1d_fwd(x=xBC_in, weight=conv_weight, bias=conv_bias, initial_state=None, seq_idx=seq_idx,
                               silu=True, return_final_state=False)  # (b, L, K)
    z, _, dt, x, B, C = _views(zxbcdt, xBC, H, P, G, N)
    gate = None if norm_weight is not None else z.unflatten(-1, (H, P))
    y, _, (_, _, _, _, y_pre) = ssd_triton_forward(x=x, dt=dt, A=A, B=B, C=C, D=D, z=gate, dt_bias=dt_bias,
                                                   initial_state=None, seq_idx=seq_idx, dt_softplus=True,
                                                   dt_limit=tuple(dt_limit), T=T)  # y: (b, L, H, P)
    del xBC, x, B, C
    if norm_weight is not None:
        y_out, _ = rms_norm_fwd(x2=y.view(-1, S), weight=norm_weight, z2=z.reshape(-1, S), eps=norm_eps,
                                group=norm_group, norm_before_gate=norm_before_gate)  # (b L, S); rstd not kept: the backward reruns this
        keep = y
    else:
        y_out, keep = y.view(-1, S), y_pre  # the SSD backward needs y before the gate, in float32
    out = F.linear(y_out, out_proj_weight, out_proj_bias).view(batch, seqlen, -1)  # (b, L, M)
    return out, keep


_mamba2_inner_fwd = torch.library.custom_op("mambakit::mamba2_inner_fwd", mutates_args=())(_mamba2_inner_fwd_impl)


@_mamba2_inner_fwd.register_fake
def _(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias, seq_idx, dims, T,
      dt_limit, norm_eps, norm_group, norm_before_gate):
    H, P, _, _ = dims
    batch, seqlen, _ = zxbcdt.shape
    keep_dtype = zxbcdt.dtype if norm_weight is not None else torch.float32
    return (zxbcdt.new_empty(batch, seqlen, out_proj_weight.shape[0]),
            zxbcdt.new_empty(batch, seqlen, H, P, dtype=keep_dtype))


def _mamba2_inner_bwd_impl(dout: torch.Tensor, zxbcdt: torch.Tensor, conv_weight: torch.Tensor,
                           conv_bias: torch.Tensor | None, dt_bias: torch.Tensor | None, A: torch.Tensor,
                           D: torch.Tensor | None, norm_weight: torch.Tensor | None, out_proj_weight: torch.Tensor,
                           out_proj_bias: torch.Tensor | None, seq_idx: torch.Tensor | None, keep: torch.Tensor,
                           dims: list[int], T: int, dt_limit: list[float], norm_eps: float, norm_group: int,
                           norm_before_gate: bool) -> list[torch.Tensor]:
    """Gradients of zxbcdt and the parameters (empty where a parameter is absent)."""
    dt_limit = tuple(dt_limit)
    H, P, G, N = dims
    S = H * P
    batch, seqlen, _ = zxbcdt.shape
    rows = batch * seqlen
    xBC_in = _views(zxbcdt, None, H, P, G, N)[1]

    # recompute the conv output
    xBC, _ = causal_conv1d_fwd(x=xBC_in, weight=conv_weight, bias=conv_bias, initial_state=None, seq_idx=seq_idx,
                               silu=True, return_final_state=False)
    z, _, dt, x, B, C = _views(zxbcdt, xBC, H, P, G, N)
    z2 = z.reshape(rows, S)  # a view: rows of zxbcdt
    if norm_weight is not None:
        y2 = keep.view(rows, S)
        y_out, rstd = rms_norm_fwd(x2=y2, weight=norm_weight, z2=z2, eps=norm_eps, group=norm_group,
                                   norm_before_gate=norm_before_gate)
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
        # dz straight into its slice of dzxbcdt (rows d_in_proj apart)
        dy2, d_norm_w, _ = rms_norm_bwd(x2=y2, weight=norm_weight, z2=z2, rstd=rstd, dy2=dy_out.to(y2.dtype),
                                        group=norm_group, norm_before_gate=norm_before_gate,
                                        dz_out=dzxbcdt.view(rows, -1)[:, :S])
        dy, gate, y_pre = dy2.view(batch, seqlen, H, P), None, None
    else:
        dy, gate, y_pre = dy_out.to(x.dtype).view(batch, seqlen, H, P), z.unflatten(-1, (H, P)), keep
    del dy_out

    # the conv's upstream gradient (x || B || C's): the SSD backward writes dx into its first S channels
    dxBC = torch.empty(batch, seqlen, xBC_in.shape[-1], device=zxbcdt.device, dtype=zxbcdt.dtype)
    dx_out = dxBC[..., :S].unflatten(-1, (H, P))
    # SSD backward, from its recomputed intermediates (decay, C B^T, chunk states; y itself is kept)
    dtp, cs, cb, states, _ = ssd_triton_intermediates(x=x, dt=dt, A=A, B=B, C=C, dt_bias=dt_bias, initial_state=None,
                                                      seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit, T=T)
    dx, ddt, dA, dB, dC, dD, dz, d_dt_bias, _ = ssd_triton_backward(
        dy=dy, dfinal=None, x=x, dt=dt, A=A, B=B, C=C, D=D, z=gate, dt_bias=dt_bias, seq_idx=seq_idx, dtp=dtp,
        cs=cs, cb=cb, states=states, y_pre=y_pre, dt_softplus=True, dt_limit=dt_limit, T=T, need_dh0=False,
        dx_out=dx_out)
    del dy, xBC, x, B, C, dtp, cs, cb, states
    if dz is not None:
        dzxbcdt[..., :S].copy_(dz.view(batch, seqlen, S))
    dzxbcdt[..., S + xBC_in.shape[-1]:].copy_(ddt)

    # conv backward: its input gradient goes straight into dzxbcdt
    if dx.data_ptr() != dx_out.data_ptr():  # the SSD backward cut its input into pieces: dx is a new tensor
        dx_out.copy_(dx)
    dxBC[..., S:S + G * N].copy_(dB.view(batch, seqlen, G * N))
    dxBC[..., S + G * N:].copy_(dC.view(batch, seqlen, G * N))
    del dx, dB, dC
    _, d_conv_w, d_conv_b, _ = causal_conv1d_bwd(x=xBC_in, weight=conv_weight, bias=conv_bias, initial_state=None,
                                                 seq_idx=seq_idx, silu=True, dy=dxBC, dfinal=None, need_dinit=False,
                                                 dx=_views(dzxbcdt, None, H, P, G, N)[1])
    grads = (dzxbcdt, d_conv_w, d_conv_b, d_dt_bias, dA, dD, d_norm_w, d_out_w, d_out_b)
    return pack_grads(grads, (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight,
                              out_proj_bias))


_mamba2_inner_bwd = torch.library.custom_op("mambakit::mamba2_inner_bwd", mutates_args=())(_mamba2_inner_bwd_impl)


@_mamba2_inner_bwd.register_fake
def _(dout, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias, seq_idx,
      keep, dims, T, dt_limit, norm_eps, norm_group, norm_before_gate):
    params = (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias)
    return fake_grads(params, [True] * 9)


def _mamba2_inner_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], output[1])
    ctx.settings = inputs[10:]


def _mamba2_inner_backward(ctx, dout, _dkeep, bwd):
    saved = ctx.saved_tensors
    grads = bwd(dout, *saved, *ctx.settings)
    # absent parameters get no gradient
    return *unpack_grads(grads, [t is not None for t in saved[:9]]), None, None, None, None, None, None, None


_mamba2_inner_op = autograd_op("Mamba2Inner", _mamba2_inner_fwd_impl, _mamba2_inner_fwd, _mamba2_inner_setup_context,
                               _mamba2_inner_backward, _mamba2_inner_bwd_impl, _mamba2_inner_bwd)


def mamba2_inner_triton(*, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm: GatedNormSpec | None, out_proj_weight,
                        out_proj_bias, dims, chunk_size, dt_limit, seq_idx):
    """Normalise layouts and dtypes (float32 parameters: the kernels' accumulators) and apply the node.

    The custom op's schema takes only tensors and scalars, so the norm spec is unpacked here, in this one
    place, into its weight and (eps, group, norm_before_gate); without a norm those are unused placeholders."""
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
    norm_weight = norm.weight.contiguous() if norm is not None else None
    norm_eps, norm_group, norm_before_gate = (1e-5, dims[0] * dims[1], False) if norm is None else (
        float(norm.eps), norm.group, norm.norm_before_gate)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    out, _ = _mamba2_inner_op(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight,
                               out_proj_bias, seq_idx, list(dims), T, [lo, hi], norm_eps, norm_group,
                               norm_before_gate)
    return out
