"""The "torch" backend of the normalised projections: the unfused ops in a row (add_rms_norm / rms_norm,
F.linear, causal_conv1d_update), so that it computes exactly what the decode step computes op by op.

Shapes (legend): B batch, K input features, N output features, C conv channels, W conv width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..causal_conv1d import causal_conv1d_update
from ..rms_norm import add_rms_norm, rms_norm

__all__ = ["norm_linear_torch"]


def norm_linear_torch(
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
    """(out (B, N), residual stream (B, K) or None); arguments as `norm_linear_triton` (gated mode when z is given).

    Example:
        >>> out, s = norm_linear_torch(torch.randn(2, 8), torch.randn(16, 8), torch.ones(8))
    """
    if z is not None:
        a = rms_norm(x, norm_weight, eps=eps, z=z, group_size=group_size, norm_before_gate=norm_before_gate,
                     backend="torch")
        s = None
    else:
        a, s = add_rms_norm(x, residual, norm_weight, eps=eps, residual_dtype=residual_dtype, backend="torch")
    out = F.linear(a, weight, bias)  # (B, N)
    if conv_state is not None:
        c0, c1 = conv_start, conv_start + conv_weight.shape[0]
        y = causal_conv1d_update(conv_state, out[:, c0:c1], conv_weight, conv_bias, activation="silu",
                                 backend="torch")
        if torch.is_grad_enabled():
            out = torch.cat([out[:, :c0], y, out[:, c1:]], dim=1)
        else:
            out[:, c0:c1] = y
    return out, s
