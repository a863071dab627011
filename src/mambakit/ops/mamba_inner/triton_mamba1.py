"""Triton backend of `mamba1_inner`: one autograd node that recomputes the conv output and dt in its backward.

Shapes (legend): B batch, L seqlen, D d_inner, W d_conv, R dt_rank, N d_state, K = R + 2N, c = L / 128.

Saved for the backward: xz (B, L, 2D), x_dbl (B, L, K), the scan's checkpoints (one state per checkpoint
interval, (B, c, D, N) float32) and the parameters. Not saved (made again in the backward): xc = silu(conv(x)) (one conv launch) and
dt = dt_low @ dt_proj_weight^T (a rank-R matmul). Layers composed of the separate ops keep xc, dt, the
fp32 B / C copies and a contiguous x for the conv as well: about 2D more values per token.

Backward (a second custom op, registered as the first's autograd), in order: recompute xc and dt ->
scan backward (dxc, ddt, dB, dC, dz, dA, dD, ddt_bias) ->
dt_proj and x_proj backward (their input gradients added into dxc in place) -> conv backward, which
writes dx straight into the x half of d xz (the scan wrote dz into the other half: no copy, no concatenation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d.triton_conv import causal_conv1d_bwd, causal_conv1d_fwd
from ..common import autograd_op, compute_dtype, fake_grads, pack_grads, unpack_grads
from ..selective_scan import scan_policy
from ..selective_scan.triton_scan import ScanConfig, scan_bwd, scan_fwd
from ..triton_launch import cdiv

__all__ = ["mamba1_inner_triton"]


def _split_x_dbl(x_dbl: torch.Tensor, dt_rank: int, dstate: int):
    """x_dbl (B, L, K) -> dt_low (B, L, R), B (B, L, 1, N), C (B, L, 1, N) as views."""
    dt_low, B, C = torch.split(x_dbl, [dt_rank, dstate, dstate], dim=-1)
    return dt_low, B.unsqueeze(2), C.unsqueeze(2)


# One custom op pair (torch.library, autograd registered): compile, autocast and FSDP see one op with fake tensors.


def _mamba1_inner_fwd_impl(xz: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                           x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, dt_proj_bias: torch.Tensor | None,
                           A: torch.Tensor, D: torch.Tensor | None, seq_idx: torch.Tensor | None, save: bool,
                           config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, L, D), and for the backward x_dbl (B, L, K) and the scan checkpoints (empty unless `save`)."""
    dim = conv_weight.shape[0]
    dt_rank, dstate = dt_proj_weight.shape[1], A.shape[1]
    x, z = xz[..., :dim], xz[..., dim:]
    xc, _ = causal_conv1d_fwd(x=x, weight=conv_weight, bias=conv_bias, initial_state=None, seq_idx=seq_idx, silu=True,
                              return_final_state=False)  # (B, L, D)
    x_dbl = F.linear(xc, x_proj_weight)  # (B, L, K)
    dt_low, B, C = _split_x_dbl(x_dbl, dt_rank, dstate)
    dt = F.linear(dt_low, dt_proj_weight)  # (B, L, D)
    y, _, hck = scan_fwd(x=xc, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_proj_bias, dt_softplus=True,
                         initial_state=None, seq_idx=seq_idx, save_final=False, save_checkpoints=save,
                         config=ScanConfig.from_ints(config))
    if not save:
        return y, xz.new_empty(0), xz.new_empty(0, dtype=torch.float32)
    return y, x_dbl, hck


_mamba1_inner_fwd = torch.library.custom_op("mambakit::mamba1_inner_fwd", mutates_args=())(_mamba1_inner_fwd_impl)


@_mamba1_inner_fwd.register_fake
def _(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, save, config):
    batch, seqlen, _ = xz.shape
    dim, dstate = conv_weight.shape[0], A.shape[1]
    y = xz.new_empty(batch, seqlen, dim)
    if not save:
        return y, xz.new_empty(0), xz.new_empty(0, dtype=torch.float32)
    nintervals = cdiv(seqlen, ScanConfig.from_ints(config).checkpoint_interval)
    acc = compute_dtype(xz.dtype)
    return (y, xz.new_empty(batch, seqlen, x_proj_weight.shape[0]),
            xz.new_empty(batch, nintervals, dim, dstate, dtype=acc))


def _mamba1_inner_bwd_impl(dy: torch.Tensor, xz: torch.Tensor, conv_weight: torch.Tensor,
                           conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                           dt_proj_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor | None,
                           seq_idx: torch.Tensor | None, x_dbl: torch.Tensor, hck: torch.Tensor,
                           config: list[int]) -> list[torch.Tensor]:
    """Gradients of xz, conv weight / bias, x_proj / dt_proj weights, dt bias, A, D (empty where absent)."""
    batch, seqlen = xz.shape[:2]
    dim = conv_weight.shape[0]
    dt_rank, dstate = dt_proj_weight.shape[1], A.shape[1]
    x, z = xz[..., :dim], xz[..., dim:]
    # recompute what the forward did not keep
    xc, _ = causal_conv1d_fwd(x=x, weight=conv_weight, bias=conv_bias, initial_state=None, seq_idx=seq_idx, silu=True,
                              return_final_state=False)
    dt_low, B, C = _split_x_dbl(x_dbl, dt_rank, dstate)
    dt = F.linear(dt_low, dt_proj_weight)
    dxz = torch.empty_like(xz)
    # the scan writes dz straight into the z half of d xz (no copy) when that half has a unit last stride
    dz_half = dxz[..., dim:] if dxz.stride(-1) == 1 else None
    dxc, ddt, dA, dB, dC, dD, dz, ddt_bias, _ = scan_bwd(
        dy=dy, dhlast=None, x=xc, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_proj_bias, dt_softplus=True,
        seq_idx=seq_idx, checkpoints=hck, want_dinitial=False, config=ScanConfig.from_ints(config), dz_out=dz_half)
    del dt
    rows = batch * seqlen
    ddt2 = ddt.reshape(rows, dim)
    dx_dbl = torch.cat([ddt2 @ dt_proj_weight, dB.reshape(rows, dstate), dC.reshape(rows, dstate)], dim=1)
    d_dt_proj_weight = ddt2.t() @ dt_low.reshape(rows, dt_rank)
    del ddt, ddt2
    d_x_proj_weight = dx_dbl.t() @ xc.reshape(rows, dim)
    dxc.view(rows, dim).addmm_(dx_dbl, x_proj_weight)  # xc feeds both the scan and x_proj
    if dz_half is None:
        dxz[..., dim:].copy_(dz)
    _, d_conv_weight, d_conv_bias, _ = causal_conv1d_bwd(x=x, weight=conv_weight, bias=conv_bias, initial_state=None,
                                                         seq_idx=seq_idx, silu=True, dy=dxc, dfinal=None,
                                                         need_dinit=False, dx=dxz[..., :dim])
    grads = (dxz, d_conv_weight, d_conv_bias, d_x_proj_weight, d_dt_proj_weight, ddt_bias, dA, dD)
    return pack_grads(grads, (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D))


_mamba1_inner_bwd = torch.library.custom_op("mambakit::mamba1_inner_bwd", mutates_args=())(_mamba1_inner_bwd_impl)


@_mamba1_inner_bwd.register_fake
def _(dy, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, x_dbl, hck,
      config):
    return fake_grads((xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D), [True] * 8)


def _mamba1_inner_setup_context(ctx, inputs, output):
    xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx, _, config = inputs
    ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx,
                          output[1], output[2])
    ctx.config = config


def _mamba1_inner_backward(ctx, dy, _dx_dbl, _dhck, bwd):
    saved = ctx.saved_tensors
    grads = bwd(dy, *saved, ctx.config)
    # conv_bias, dt_proj_bias and D are optional: their gradient slots are empty when the input was None
    return *unpack_grads(grads, [t is not None for t in saved[:8]]), None, None, None


_mamba1_inner_op = autograd_op("Mamba1Inner", _mamba1_inner_fwd_impl, _mamba1_inner_fwd, _mamba1_inner_setup_context,
                               _mamba1_inner_backward, _mamba1_inner_bwd_impl, _mamba1_inner_bwd)


def mamba1_inner_triton(*, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx,
                        config: ScanConfig | None = None):
    """Fused Triton path of `mambakit.ops.mamba1_inner` (arguments checked there): y (B, L, D) in xz's dtype.

    config: the scan's tiling (tests use a short checkpoint interval); None: `scan_policy.DEFAULT_CONFIG`, whose
        fields left None pick from the shape.
    """
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    tensors = (xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _, _ = _mamba1_inner_op(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                                seq_idx, save, (config or scan_policy.DEFAULT_CONFIG).as_ints())
    return y
