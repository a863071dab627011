"""RMSNorm, plain and gated by silu(z), with optional per-group statistics. See README.md."""

from __future__ import annotations

import torch

from ..checks import ShapeChecker
from ..dispatch import select_backend

__all__ = ["rms_norm"]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Root-mean-square normalisation over the last dim, optionally gated: norm(x * silu(z)) or norm(x) * silu(z).

    Args:
        x: (..., hidden), any leading dims.   weight: (hidden,).   eps: added to the mean square.
        z: like x, the gate (Mamba-2's output gate).   group_size: normalise each run of this many
            channels separately (must divide hidden; None means one group).
        norm_before_gate: False computes norm(x * silu(z)) (Mamba-2's default), True norm(x) * silu(z).
        backend: None, "reference", "torch" or "triton".
    Returns:
        (..., hidden) in x's dtype; statistics are computed in float32.

    Example:
        >>> y = rms_norm(torch.randn(2, 10, 256), torch.ones(256), z=torch.randn(2, 10, 256), group_size=128)
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"rms_norm: x must be a tensor of shape (..., hidden), got {getattr(x, 'shape', type(x))}")
    lead = tuple(f"d{i}" for i in range(x.dim() - 1))
    chk = ShapeChecker("rms_norm")
    chk.tensor("x", x, lead + ("hidden",))
    chk.tensor("weight", weight, ("hidden",))
    chk.tensor("z", z, lead + ("hidden",), optional=True)
    hidden = chk.size("hidden")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or hidden % group_size):
        raise ValueError(f"rms_norm: group_size must be a positive int dividing hidden={hidden}, got {group_size!r}")
    if eps < 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    name = select_backend("rms_norm", backend, x.device)
    if name == "reference":
        from .reference import rms_norm_reference as fn
    elif name == "torch":
        from .norm import rms_norm_torch as fn
    else:
        from .triton_norm import rms_norm_triton as fn
    return fn(x, weight, eps=eps, z=z, group_size=group_size, norm_before_gate=norm_before_gate)
