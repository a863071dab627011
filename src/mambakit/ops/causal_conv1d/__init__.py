"""Depthwise causal 1-D convolution (the short conv before the SSM) and its one-token update. See README.md."""

from __future__ import annotations

import torch

from ..checks import check_causal_conv1d, write_back
from ..dispatch import implementation

__all__ = ["causal_conv1d", "causal_conv1d_update"]


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
    check_causal_conv1d("causal_conv1d", x, weight, bias, activation, initial_state, step=False, seq_idx=seq_idx)
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
    check_causal_conv1d("causal_conv1d_update", x, weight, bias, activation, conv_state, step=True)
    _, fn = implementation("causal_conv1d_update", backend, x.device)
    return write_back(conv_state, fn(conv_state, x, weight, bias=bias, activation=activation))
