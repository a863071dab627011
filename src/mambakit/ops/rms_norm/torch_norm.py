"""PyTorch path of RMSNorm, plain and gated (CPU and GPU, autograd by torch).

Shapes (legend): N... any leading dims, H hidden, G group_size (H % G == 0), H // G groups.

    h = x * silu(z)                 (gated, norm_before_gate=False; h = x otherwise)
    y = h / sqrt(mean_G(h^2) + eps) * weight
    y = y * silu(z)                 (gated, norm_before_gate=True)

Statistics and products run in float32 (float64 for float64 inputs); the output has x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import compute_dtype


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """RMSNorm over the last dim; arguments as in `mambakit.ops.rms_norm` (already validated).

    Shapes: x, z (..., H); weight (H,). Returns (..., H) in x's dtype.

    Example:
        >>> y = rms_norm_torch(torch.randn(2, 10, 256), torch.ones(256), z=torch.randn(2, 10, 256), group_size=128)
    """
    cdt = compute_dtype(x.dtype)
    h_NH = x.to(cdt)
    gate_NH = F.silu(z.to(cdt)) if z is not None else None
    if gate_NH is not None and not norm_before_gate:
        h_NH = h_NH * gate_NH
    hidden = h_NH.shape[-1]
    group = hidden if group_size is None else group_size
    # F.rms_norm is one fused op on CPU and CUDA (and differentiable): per group via a (..., H/G, G) view
    y_NH = F.rms_norm(h_NH.unflatten(-1, (hidden // group, group)), (group,), eps=eps).flatten(-2)
    y_NH = y_NH * weight.to(cdt)
    if gate_NH is not None and norm_before_gate:
        y_NH = y_NH * gate_NH
    return y_NH.to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual, y = rms_norm(s.to(weight.dtype)) in out_dtype (default: weight's dtype); arguments as in
    `mambakit.ops.add_rms_norm`.

    Example:
        >>> y, s = add_rms_norm_torch(torch.randn(2, 8), None, torch.ones(8), residual_dtype=torch.float32)
    """
    s = x if residual is None else x + residual
    y = rms_norm_torch(s.to(weight.dtype), weight, eps=eps)
    if out_dtype is not None:
        y = y.to(out_dtype)
    if residual is None:
        # a new tensor, never x itself (as the Triton kernel writes a new s): a block handing its input back as
        # an output is, under FSDP2, returning a view (its pre-forward autograd Function makes the inputs views)
        return y, s.to(s.dtype if residual_dtype is None else residual_dtype, copy=True)
    return y, s if residual_dtype is None else s.to(residual_dtype)
