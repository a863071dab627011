"""Normalised projections of the decode step: (add +) RMSNorm -> linear (-> causal conv update + silu). See README.md."""

from __future__ import annotations

import torch

from ..checks import ShapeChecker
from ..dispatch import implementation

__all__ = ["add_rms_norm_linear", "decode_linear", "gated_rms_norm_linear"]


def _check_linear(chk: ShapeChecker, weight, bias, norm_weight) -> None:
    chk.tensor("weight", weight, ("out_features", "features"))
    chk.tensor("bias", bias, ("out_features",), optional=True)
    chk.tensor("norm_weight", norm_weight, ("features",))
    if norm_weight.dtype != weight.dtype:
        chk.fail("norm_weight", f"must have weight's dtype {weight.dtype} (the normalised activation feeds the "
                                f"projection as it is), got {norm_weight.dtype}")


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_dtype: torch.dtype | None = None,
    conv_state: torch.Tensor | None = None,
    conv_weight: torch.Tensor | None = None,
    conv_bias: torch.Tensor | None = None,
    conv_start: int = 0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's pre-norm and its mixer's input projection, for one token per row:

        s = x + residual;  a = rms_norm(s, norm_weight);  out = a @ weight^T + bias
        out[:, c0:c0+C] = silu(causal_conv1d_update(conv_state, out[:, c0:c0+C], conv_weight, conv_bias))

    Exactly `add_rms_norm`, `F.linear` and `causal_conv1d_update` in a row (the same roundings); the Triton
    backend runs them as one kernel (forward only: with gradients the torch path runs).

    Args:
        x: (batch, features).   residual: (batch, features) or None (the first block).
        norm_weight: (features,), weight's dtype.   weight: (out_features, features).   bias: (out_features,).
        residual_dtype: dtype of the returned residual stream (None: the promoted dtype of x and residual).
        conv_state: (batch, C, width - 1), shifted in place; conv_weight (C, width); conv_bias (C,);
            conv_start: the first of the C output channels the conv applies to.
    Returns:
        out (batch, out_features) in weight's dtype, s (batch, features) in residual_dtype.

    Example:
        >>> xz, residual = add_rms_norm_linear(hidden, residual, norm.weight, in_proj.weight,
        ...                                    residual_dtype=torch.float32, conv_state=state.conv_state,
        ...                                    conv_weight=conv1d.weight[:, 0], conv_bias=conv1d.bias)
    """
    chk = ShapeChecker("add_rms_norm_linear")
    chk.tensor("x", x, ("batch", "features"))
    chk.tensor("residual", residual, ("batch", "features"), optional=True)
    _check_linear(chk, weight, bias, norm_weight)
    if conv_state is not None:
        chk.tensor("conv_weight", conv_weight, ("conv_channels", "width"))
        chk.tensor("conv_bias", conv_bias, ("conv_channels",), optional=True)
        chk.tensor("conv_state", conv_state, ("batch", "conv_channels", chk.size("width") - 1))
        if not 0 <= conv_start <= chk.size("out_features") - chk.size("conv_channels"):
            raise ValueError(f"add_rms_norm_linear: conv_start={conv_start} puts the {chk.size('conv_channels')} conv "
                             f"channels outside the {chk.size('out_features')} outputs")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, norm_weight, weight, bias, conv_weight, conv_bias))
    _, fn = implementation("add_rms_norm_linear", backend, x.device, needs_grad=needs_grad)
    return fn(x, weight, norm_weight, residual=residual, bias=bias, eps=eps, residual_dtype=residual_dtype,
              conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias, conv_start=conv_start)


def gated_rms_norm_linear(
    x: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Mamba-2's gated RMSNorm and output projection, for one token per row:

        out = rms_norm(x, norm_weight, z=z, group_size, norm_before_gate) @ weight^T + bias

    Exactly `rms_norm` then `F.linear` (the same roundings); one kernel on the Triton backend (forward only).

    Args:
        x, z: (batch, features).   norm_weight: (features,), weight's dtype.   weight: (out_features, features).
        group_size: features per norm group (None: one group), dividing features.
    Returns:
        out (batch, out_features) in weight's dtype.

    Example:
        >>> out = gated_rms_norm_linear(y, z, norm.weight, out_proj.weight, group_size=norm.group_size)
    """
    chk = ShapeChecker("gated_rms_norm_linear")
    chk.tensor("x", x, ("batch", "features"))
    chk.tensor("z", z, ("batch", "features"))
    _check_linear(chk, weight, bias, norm_weight)
    if group_size is not None and (group_size < 1 or chk.size("features") % group_size):
        raise ValueError(f"gated_rms_norm_linear: group_size={group_size} must divide features={chk.size('features')}")
    if x.dtype != weight.dtype:
        chk.fail("x", f"must have weight's dtype {weight.dtype}, got {x.dtype}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, z, norm_weight, weight, bias))
    _, fn = implementation("gated_rms_norm_linear", backend, x.device, needs_grad=needs_grad)
    return fn(x, weight, norm_weight, z=z, bias=bias, eps=eps, group_size=group_size,
              norm_before_gate=norm_before_gate)[0]


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """`F.linear` for the few rows of a decode step: out = x @ weight^T + bias.

    The Triton backend reads the weights once in one kernel for up to 4 rows (in a CUDA graph on an H200 it took
    1.9 / 2.4 us at batch 1 for Mamba-1 130M's x_proj / out_proj, cuBLAS 4.1 / 5.8 us); more rows, or rows wider
    than 8192 features, run `F.linear`. Forward only: with gradients the torch path (`F.linear`) runs.

    Args:
        x: (batch, features) in weight's dtype.   weight: (out_features, features).   bias: (out_features,).
    Returns:
        (batch, out_features) in weight's dtype.

    Example:
        >>> dt_low_B_C = decode_linear(x, x_proj.weight)
    """
    chk = ShapeChecker("decode_linear")
    chk.tensor("x", x, ("batch", "features"))
    chk.tensor("weight", weight, ("out_features", "features"))
    chk.tensor("bias", bias, ("out_features",), optional=True)
    if x.dtype != weight.dtype:
        chk.fail("x", f"must have weight's dtype {weight.dtype}, got {x.dtype}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    _, fn = implementation("decode_linear", backend, x.device, needs_grad=needs_grad)
    return fn(x, weight, bias)
