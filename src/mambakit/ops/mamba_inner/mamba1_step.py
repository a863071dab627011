"""Mamba-1's decode step between the block's norm and out_proj as one op: in_proj -> conv update -> x_proj / dt_proj
-> state update -> gate. Forward only (decoding).

Shapes (legend): B batch (one token per row), M d_model, D d_inner, W d_conv, R dt_rank, N d_state, Q = R + 2N.

    (x, z) = h @ in_proj_weight^T + in_proj_bias          (B, D) each
    xc = silu(causal_conv1d_update(conv_state, x))        (B, D), conv_state (B, D, W - 1) shifted in place
    (dt_low, B, C) = xc @ x_proj_weight^T + x_proj_bias   (B, Q)
    y = selective_state_update(ssm_state, xc, dt_low, A, B, C, D, z, dt_proj_bias, softplus,
                               dt_proj_weight)            (B, D), ssm_state (B, D, N) updated in place

Why one op: past the fused step's 8 rows a Mamba-1 layer's decode step was seven launches (norm, four cuBLAS GEMMs,
conv update, state update) of 2-7 us each (BENCHMARKS.md, session 17's profile). The "triton" backend runs the part
after the norm and before out_proj in two kernels (`triton_mamba1_step.py`; faster up to 32 rows, slower at 64); the
"torch" and "reference" backends compose the public ops, dt_proj through `selective_state_update`'s
dt_proj_weight (as the fused decode step passes it: F.linear first on those backends).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d import causal_conv1d_update
from ..checks import FLOATS, ShapeChecker
from ..dispatch import implementation
from ..selective_scan import selective_state_update

__all__ = ["mamba1_step"]


def mamba1_step(
    h: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    x_proj_bias: torch.Tensor | None,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None,
    ssm_state: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One token of a Mamba-1 layer from its normalised input to out_proj's input; both states advance in place.

    Args:
        h: (batch, d_model) the block's normalised hidden state, in in_proj_weight's dtype.
        in_proj_weight: (2 * dim, d_model), rows x then z.   in_proj_bias: (2 * dim,) or None.
        conv_state: (batch, dim, width - 1) the conv's window, shifted in place.
        conv_weight: (dim, width) depthwise causal conv taps (Conv1d weight squeezed); conv_bias: (dim,) or None.
        x_proj_weight: (dt_rank + 2 * dstate, dim), rows [dt_low | B | C]; x_proj_bias: its (dt_rank + 2 dstate,).
        dt_proj_weight: (dim, dt_rank).   dt_proj_bias: (dim,) step-size bias (softplus(dt + bias)).
        A: (dim, dstate) float32 (= -exp(A_log)).   D: (dim,) skip connection.
        ssm_state: (batch, dim, dstate) float32 (or float64; bf16 / fp16: updated in float32 and rounded back),
            updated in place.
        backend: None (Triton on CUDA, PyTorch otherwise), "reference", "torch" or "triton".
    Returns:
        y: (batch, dim) in h's dtype, gated by silu(z): out_proj's input.

    Example:
        >>> y = mamba1_step(norm(hidden), m.in_proj.weight, m.in_proj.bias, cache.conv_state, m.conv1d.weight[:, 0],
        ...                 m.conv1d.bias, m.x_proj.weight, m.x_proj.bias, m.dt_proj.weight, m.dt_proj.bias,
        ...                 -torch.exp(m.A_log.float()), m.D.float(), cache.ssm_state)
    """
    chk = ShapeChecker("mamba1_step")
    chk.tensor("h", h, ("batch", "d_model"), dtypes=FLOATS)
    chk.tensor("in_proj_weight", in_proj_weight, ("two_dim", "d_model"), dtypes=FLOATS)
    if chk.size("two_dim") % 2:
        chk.fail("in_proj_weight", f"needs an even number of rows (x then z), got {chk.size('two_dim')}")
    dim = chk.size("two_dim") // 2
    chk.tensor("in_proj_bias", in_proj_bias, ("two_dim",), optional=True)
    chk.tensor("conv_weight", conv_weight, (dim, "width"))
    chk.tensor("conv_bias", conv_bias, (dim,), optional=True)
    chk.tensor("conv_state", conv_state, ("batch", dim, chk.size("width") - 1))
    chk.tensor("dt_proj_weight", dt_proj_weight, (dim, "dt_rank"))
    chk.tensor("dt_proj_bias", dt_proj_bias, (dim,), optional=True)
    chk.tensor("A", A, (dim, "dstate"), dtypes=(torch.float32, torch.float64))
    chk.tensor("D", D, (dim,), optional=True)
    chk.tensor("ssm_state", ssm_state, ("batch", dim, "dstate"), dtypes=FLOATS)
    chk.tensor("x_proj_weight", x_proj_weight, (chk.size("dt_rank") + 2 * chk.size("dstate"), dim))
    chk.tensor("x_proj_bias", x_proj_bias, (chk.size("dt_rank") + 2 * chk.size("dstate"),), optional=True)
    if h.dtype != in_proj_weight.dtype:
        chk.fail("h", f"must have in_proj_weight's dtype {in_proj_weight.dtype}, got {h.dtype}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, in_proj_weight, in_proj_bias, conv_weight, conv_bias,
                                                     x_proj_weight, x_proj_bias, dt_proj_weight, dt_proj_bias, A, D))
    name, fn = implementation("mamba1_step", backend, h.device, needs_grad=needs_grad)
    args = (h, in_proj_weight, in_proj_bias, conv_state, conv_weight, conv_bias, x_proj_weight, x_proj_bias,
            dt_proj_weight, dt_proj_bias, A, D, ssm_state)
    return fn(*args) if name == "triton" else fn(*args, backend=name)


def mamba1_step_composed(h, in_proj_weight, in_proj_bias, conv_state, conv_weight, conv_bias, x_proj_weight,
                         x_proj_bias, dt_proj_weight, dt_proj_bias, A, D, ssm_state, backend=None):
    """The "torch" / "reference" backends: the public ops one after another (`backend` names theirs)."""
    x, z = F.linear(h, in_proj_weight, in_proj_bias).chunk(2, dim=-1)
    x = causal_conv1d_update(conv_state, x, conv_weight, conv_bias, activation="silu", backend=backend)
    rank = dt_proj_weight.shape[1]
    dstate = A.shape[1]
    dt_low, B, C = torch.split(F.linear(x, x_proj_weight, x_proj_bias), [rank, dstate, dstate], dim=-1)
    return selective_state_update(ssm_state, x, dt_low, A, B, C, D=D, z=z, dt_bias=dt_proj_bias, dt_softplus=True,
                                  backend=backend, dt_proj_weight=dt_proj_weight)
