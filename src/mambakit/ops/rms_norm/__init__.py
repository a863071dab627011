"""RMSNorm, plain and gated by silu(z), with optional per-group statistics. See README.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import FLOATS, check_rms_norm
from ..dispatch import implementation

__all__ = ["GatedNormSpec", "rms_norm", "add_rms_norm"]


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
    hidden = check_rms_norm("rms_norm", x, weight, eps, z=z).size("hidden")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or hidden % group_size):
        raise ValueError(f"rms_norm: group_size must be a positive int dividing hidden={hidden}, got {group_size!r}")
    _, fn = implementation("rms_norm", backend, x.device)
    return fn(x, weight, eps=eps, z=z, group_size=group_size, norm_before_gate=norm_before_gate)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual_dtype: torch.dtype | None = None,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step in one pass: s = x + residual; y = rms_norm(s in weight's dtype, weight).

    Exactly what `Block` computes unfused (the same roundings: s in the promoted dtype of x and residual,
    normalised after a cast to weight's dtype), so both give identical numbers up to float32 rounding of the
    statistics. The Triton backend runs one kernel forward (instead of add, cast, norm, scale and a cast for the
    next matmul) and one backward, and keeps only s and one float32 per row for the backward: it is the
    training path of every block on CUDA, and the decode step's norm.

    Args:
        x: (..., hidden).   residual: like x, or None (the first block: s = x).   weight: (hidden,).
        residual_dtype: dtype of the returned residual (None: s's own dtype; float32 keeps the residual
            stream in float32 under bf16 weights).
        backend: None, "torch" or "triton".
        out_dtype: dtype of y (None: weight's dtype). `Block` passes the autocast dtype when the mixer's first
            op is a matmul that autocast would cast y to anyway: the same values, without the cast.
    Returns:
        y (..., hidden) in out_dtype, and s (..., hidden) in residual_dtype.

    Example:
        >>> y, residual = add_rms_norm(hidden, residual, norm.weight, eps=1e-5, residual_dtype=torch.float32)
    """
    check_rms_norm("add_rms_norm", x, weight, eps, residual=residual)
    if residual_dtype is not None and residual_dtype not in FLOATS:
        raise ValueError(f"add_rms_norm: residual_dtype must be a floating dtype, got {residual_dtype}")
    if out_dtype is not None and out_dtype not in FLOATS:
        raise ValueError(f"add_rms_norm: out_dtype must be a floating dtype, got {out_dtype}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight))
    _, fn = implementation("add_rms_norm", backend, x.device, needs_grad=needs_grad)
    return fn(x, residual, weight, eps=eps, residual_dtype=residual_dtype, out_dtype=out_dtype)


@dataclass(frozen=True, eq=False)
class GatedNormSpec:
    """Mamba-2's gated RMSNorm as one value: what the fused mixer op needs of the norm, and nothing loose.

    The fused op (`mamba2_inner`), its composed and Triton backends and the `Mamba2` module pass this one
    object instead of weight, eps, group size and gate order as separate arguments, so that none of them
    can be dropped or swapped on the way to the kernels (`RMSNormGated.spec()` builds it from the module).

    Fields:
        weight: (hidden,) the norm's scale (a parameter: gradients flow to it through the ops).
        eps: added to the mean square, >= 0.
        group_size: channels per normalisation group, dividing hidden; None means one group.
        norm_before_gate: False computes norm(x * silu(z)) (Mamba-2's default), True norm(x) * silu(z).

    Example:
        >>> norm = GatedNormSpec(torch.ones(256), eps=1e-5, group_size=128)
        >>> y = norm(torch.randn(2, 10, 256), z=torch.randn(2, 10, 256))   # (2, 10, 256)
    """

    weight: torch.Tensor
    eps: float = 1e-5
    group_size: int | None = None
    norm_before_gate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 1:
            raise ValueError(f"GatedNormSpec: weight must be a tensor of shape (hidden,), got "
                             f"{getattr(self.weight, 'shape', type(self.weight))}")
        if self.eps < 0:
            raise ValueError(f"GatedNormSpec: eps must be >= 0, got {self.eps}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 1):
            raise ValueError(f"GatedNormSpec: group_size must be a positive int or None, got {self.group_size!r}")
        if not isinstance(self.norm_before_gate, bool):
            raise ValueError(f"GatedNormSpec: norm_before_gate must be a bool, got {self.norm_before_gate!r}")

    @property
    def group(self) -> int:
        """Channels per group, the whole width when `group_size` is None."""
        return self.weight.shape[0] if self.group_size is None else self.group_size

    def __call__(self, x: torch.Tensor, z: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        """`rms_norm(x, weight, eps, z, group_size, norm_before_gate, backend)`: x, z (..., hidden) -> (..., hidden)."""
        return rms_norm(x, self.weight, eps=self.eps, z=z, group_size=self.group_size,
                        norm_before_gate=self.norm_before_gate, backend=backend)
