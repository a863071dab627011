"""Mamba-1's mixer between in_proj and out_proj as one op: conv -> x_proj / dt_proj -> gated scan.

Shapes (legend): B batch, L seqlen, D d_inner (channels), W d_conv, R dt_rank, N d_state, K = R + 2N.

    (x, z) = xz                                   (B, L, D) each
    xc = silu(causal_conv1d(x))                   (B, L, D)
    (dt_low, B, C) = xc @ x_proj_weight^T         (B, L, R), (B, L, N), (B, L, N)  = x_dbl (B, L, K)
    dt = dt_low @ dt_proj_weight^T                (B, L, D)   (bias and softplus inside the scan)
    y = selective_scan(xc, dt, A, B, C, D, z, dt_bias, softplus)

Why one op: the Triton backward of the scan needs only its inputs and its checkpoints (one state per interval), and the
conv output and dt are cheap to make again (one conv launch, one (B L, R) x (R, D) matmul), so the
"triton" backend keeps xz, x_dbl (K = R + 2N channels, ~4% of D at d_model 2048) and the scan's
checkpoints (D N / 128 floats per token) instead of xc, dt, fp32 copies of B / C and the scan's
inputs. This is the fused training path of Gu & Dao 2023 (Section 3.3.2: recomputation), in
mamba_ssm's checkpoint level 1 form. The "torch" and "reference" backends compose the public ops
(autograd through them): the same math, the ground truth of the tests, and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d import causal_conv1d
from ..checks import FLOATS, ShapeChecker
from ..common import autocast_dtype
from ..dispatch import implementation
from ..selective_scan import selective_scan

__all__ = ["mamba1_inner"]


def mamba1_inner(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Conv, projections and gated selective scan of a Mamba-1 layer, from in_proj's output.

    Args:
        xz: (batch, seqlen, 2 * dim) in_proj's output, x then z.
        conv_weight: (dim, width) depthwise causal conv taps (Conv1d weight squeezed); conv_bias: (dim,).
        x_proj_weight: (dt_rank + 2 * dstate, dim), rows [dt_low | B | C].
        dt_proj_weight: (dim, dt_rank).   dt_proj_bias: (dim,) step-size bias (softplus(dt + bias)).
        A: (dim, dstate) float32 (= -exp(A_log)).   D: (dim,) skip connection.
        seq_idx: (batch, seqlen) int, nondecreasing: packed documents (conv window and state restart).
        backend: None (Triton on CUDA, PyTorch otherwise), "reference", "torch" or "triton".
    Returns:
        y: (batch, seqlen, dim) in xz's dtype, gated by silu(z): out_proj's input.

    Example:
        >>> y = mamba1_inner(xz, conv.weight[:, 0], conv.bias, x_proj.weight, dt_proj.weight,
        ...                  dt_proj.bias.float(), -torch.exp(A_log), D)        # (B, L, D)
    """
    chk = ShapeChecker("mamba1_inner")
    chk.tensor("conv_weight", conv_weight, ("dim", "width"))
    chk.tensor("xz", xz, ("batch", "seqlen", 2 * chk.size("dim")))
    chk.tensor("conv_bias", conv_bias, ("dim",), optional=True)
    chk.tensor("A", A, ("dim", "dstate"), dtypes=(torch.float32, torch.float64))
    chk.tensor("dt_proj_weight", dt_proj_weight, ("dim", "dt_rank"))
    chk.tensor("x_proj_weight", x_proj_weight, (chk.size("dt_rank") + 2 * chk.size("dstate"), "dim"), dtypes=FLOATS)
    chk.tensor("dt_proj_bias", dt_proj_bias, ("dim",), optional=True)
    chk.tensor("D", D, ("dim",), optional=True)
    chk.seq_idx(seq_idx)
    if chk.size("width") < 2:
        raise ValueError(f"mamba1_inner: conv_weight must have width >= 2, got shape {tuple(conv_weight.shape)}")
    name, fn = implementation("mamba1_inner", backend, xz.device)
    if name == "triton":
        amp = autocast_dtype(xz.device)
        if amp is None:
            return fn(xz=xz, conv_weight=conv_weight, conv_bias=conv_bias,
                                       x_proj_weight=x_proj_weight, dt_proj_weight=dt_proj_weight,
                                       dt_proj_bias=dt_proj_bias, A=A, D=D, seq_idx=seq_idx)
        # under autocast, x_proj and dt_proj run in the autocast dtype as nn.Linear would (the casts are
        # differentiable: the weights' gradients come back in their own dtype); the conv and the scan take
        # their parameters as they are, like the separate ops
        with torch.autocast(xz.device.type, enabled=False):
            return fn(xz=xz.to(amp), conv_weight=conv_weight, conv_bias=conv_bias,
                                       x_proj_weight=x_proj_weight.to(amp), dt_proj_weight=dt_proj_weight.to(amp),
                                       dt_proj_bias=dt_proj_bias, A=A, D=D, seq_idx=seq_idx)
    return fn(xz=xz, conv_weight=conv_weight, conv_bias=conv_bias, x_proj_weight=x_proj_weight,
              dt_proj_weight=dt_proj_weight, dt_proj_bias=dt_proj_bias, A=A, D=D, seq_idx=seq_idx, backend=name)


def mamba1_inner_composed(*, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, seq_idx,
                          backend: str) -> torch.Tensor:
    """The op as the public ops in a row on `backend` (autograd through each)."""
    dt_rank, dstate = dt_proj_weight.shape[1], A.shape[1]
    x, z = xz.chunk(2, dim=-1)  # (B, L, D) each
    xc = causal_conv1d(x, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx, backend=backend)
    dt_low, B, C = torch.split(F.linear(xc, x_proj_weight), [dt_rank, dstate, dstate], dim=-1)
    dt = F.linear(dt_low, dt_proj_weight)  # the bias is added inside the scan, in fp32, before softplus
    return selective_scan(xc, dt, A, B, C, D=D, z=z, dt_bias=dt_proj_bias, dt_softplus=True, seq_idx=seq_idx,
                          backend=backend)
