"""Depthwise causal 1-D convolution (the short conv before the SSM) and its one-token update. See README.md."""

from __future__ import annotations

import torch

from ..checks import ShapeChecker
from ..dispatch import implementation

__all__ = ["causal_conv1d", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _check_common(chk: ShapeChecker, weight, bias, activation) -> None:
    chk.tensor("weight", weight, ("dim", "width"))
    chk.tensor("bias", bias, ("dim",), optional=True)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{chk.op}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if chk.size("width") < 2:
        raise ValueError(f"{chk.op}: weight must have width >= 2, got shape {tuple(weight.shape)}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over the sequence: y_t = act(bias + sum_k weight[:, k] * x_{t-W+1+k}).

    Args:
        x: (batch, seqlen, dim).   weight: (dim, width), weight[:, -1] multiplies the current token.
        bias: (dim,).   activation: None, "silu" or "swish".
        initial_state: (batch, dim, width - 1), the previous width-1 inputs, oldest first.
        return_final_state: also return the window after the last token, (batch, dim, width - 1).
        seq_idx: (batch, seqlen) int32, nondecreasing; the window restarts from zeros where it changes.
        backend: None, "reference", "torch" or "triton".
    Returns:
        y: (batch, seqlen, dim) in x's dtype, and the final window when asked.

    Example:
        >>> y = causal_conv1d(torch.randn(2, 100, 64), torch.randn(64, 4), activation="silu")
    """
    chk = ShapeChecker("causal_conv1d")
    chk.tensor("x", x, ("batch", "seqlen", "dim"))
    _check_common(chk, weight, bias, activation)
    chk.tensor("initial_state", initial_state, ("batch", "dim", chk.size("width") - 1), optional=True)
    chk.seq_idx(seq_idx)
    _, fn = implementation("causal_conv1d", backend, x.device)
    return fn(x, weight, bias=bias, activation=activation, initial_state=initial_state,
              return_final_state=return_final_state, seq_idx=seq_idx)


def causal_conv1d_update(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One decoding step of `causal_conv1d`; shifts `conv_state` in place.

    Args:
        conv_state: (batch, dim, width - 1), the previous inputs, oldest first (overwritten).
        x: (batch, dim) the new token.   weight: (dim, width).   bias: (dim,).
    Returns:
        y: (batch, dim) in x's dtype.

    Example:
        >>> state = torch.zeros(2, 64, 3); y = causal_conv1d_update(state, torch.randn(2, 64), torch.randn(64, 4))
    """
    chk = ShapeChecker("causal_conv1d_update")
    chk.tensor("x", x, ("batch", "dim"))
    _check_common(chk, weight, bias, activation)
    chk.tensor("conv_state", conv_state, ("batch", "dim", chk.size("width") - 1))
    _, fn = implementation("causal_conv1d_update", backend, x.device)
    y, new_state = fn(conv_state, x, weight, bias=bias, activation=activation)
    if new_state is not conv_state:
        conv_state.copy_(new_state)
    return y
