"""Triton backend of `mamba1_inner`: one autograd node that recomputes the conv output and dt in its backward.

Shapes (legend): B batch, L seqlen, D d_inner, W d_conv, R dt_rank, N d_state, K = R + 2N, c = L / 128.

Saved for the backward: xz (B, L, 2D), x_dbl (B, L, K), the scan's per-chunk states (B, c, D, N) float32
and the parameters. Not saved (made again in the backward): xc = silu(conv(x)) (one conv launch) and
dt = dt_low @ dt_proj_weight^T (a rank-R matmul). Layers composed of the separate ops keep xc, dt, the
fp32 B / C copies and a contiguous x for the conv as well: about 2D more values per token.

Backward, in order: recompute xc and dt -> scan backward (dxc, ddt, dB, dC, dz, dA, dD, ddt_bias) ->
dt_proj and x_proj backward (their input gradients added into dxc in place) -> conv backward, which
writes dx straight into the x half of d xz (dz is copied into the other half: no concatenation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d.triton_conv import _causal_conv1d_bwd, _causal_conv1d_fwd
from ..selective_scan.triton_scan import ScanConfig, _scan_bwd, _scan_fwd

__all__ = ["mamba1_inner_triton"]


def _split_x_dbl(x_dbl: torch.Tensor, dt_rank: int, dstate: int):
    """x_dbl (B, L, K) -> dt_low (B, L, R), B (B, L, 1, N), C (B, L, 1, N) as views."""
    dt_low, B, C = torch.split(x_dbl, [dt_rank, dstate, dstate], dim=-1)
    return dt_low, B.unsqueeze(2), C.unsqueeze(2)


class Mamba1InnerFunction(torch.autograd.Function):
    """xz and weights -> gated scan output; see the module docstring for what is saved and recomputed."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, config):
        dim = conv_weight.shape[0]
        dt_rank, dstate = dt_proj_weight.shape[1], A.shape[1]
        x, z = xz[..., :dim], xz[..., dim:]
        xc, _ = _causal_conv1d_fwd(x, conv_weight, conv_bias, None, seq_idx, True, False)  # (B, L, D)
        x_dbl = F.linear(xc, x_proj_weight)  # (B, L, K)
        dt_low, B, C = _split_x_dbl(x_dbl, dt_rank, dstate)
        dt = F.linear(dt_low, dt_proj_weight)  # (B, L, D)
        needs_grad = any(ctx.needs_input_grad)
        y, _, hck = _scan_fwd(xc, dt, A, B, C, D, z, dt_proj_bias, True, None, seq_idx, save_final=False,
                              save_chunks=needs_grad, config=config)
        if needs_grad:
            ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                                  seq_idx, x_dbl, hck)
            ctx.config = config
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, x_dbl,
         hck) = ctx.saved_tensors
        need = ctx.needs_input_grad
        batch, seqlen = xz.shape[:2]
        dim = conv_weight.shape[0]
        dt_rank, dstate = dt_proj_weight.shape[1], A.shape[1]
        x, z = xz[..., :dim], xz[..., dim:]
        # recompute what the forward did not keep
        xc, _ = _causal_conv1d_fwd(x, conv_weight, conv_bias, None, seq_idx, True, False)
        dt_low, B, C = _split_x_dbl(x_dbl, dt_rank, dstate)
        dt = F.linear(dt_low, dt_proj_weight)
        dxc, ddt, dA, dB, dC, dD, dz, ddt_bias, _ = _scan_bwd(
            dy, None, xc, dt, A, B, C, D, z, dt_proj_bias, True, seq_idx, hck, want_dh0=False, config=ctx.config)
        del dt
        rows = batch * seqlen
        ddt2 = ddt.reshape(rows, dim)
        dx_dbl = torch.cat([ddt2 @ dt_proj_weight, dB.reshape(rows, dstate), dC.reshape(rows, dstate)], dim=1)
        d_dt_proj_weight = ddt2.t() @ dt_low.reshape(rows, dt_rank) if need[4] else None
        del ddt, ddt2
        d_x_proj_weight = dx_dbl.t() @ xc.reshape(rows, dim) if need[3] else None
        dxc.view(rows, dim).addmm_(dx_dbl, x_proj_weight)  # xc feeds both the scan and x_proj
        dxz = torch.empty_like(xz)
        dxz[..., dim:].copy_(dz)
        _, d_conv_weight, d_conv_bias, _ = _causal_conv1d_bwd(x, conv_weight, conv_bias, None, seq_idx, True, dxc,
                                                              None, False, dx=dxz[..., :dim])
        return (dxz, d_conv_weight, d_conv_bias, d_x_proj_weight, d_dt_proj_weight, ddt_bias, dA, dD, None, None)


def mamba1_inner_triton(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx,
                        config: ScanConfig | None = None):
    """Fused Triton path of `mambakit.ops.mamba1_inner` (arguments checked there): y (B, L, D) in xz's dtype.

    config: the scan's tiling (tests use a short checkpoint chunk); None picks from the shape.
    """
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    return Mamba1InnerFunction.apply(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                                     seq_idx, config or ScanConfig())
