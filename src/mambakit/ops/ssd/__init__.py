"""State space duality (Mamba-2 "SSD"): the public chunked op and its one-step decode update. See README.md."""

from __future__ import annotations

import math

import torch

from ..checks import check_ssd, write_back
from ..dispatch import implementation

__all__ = ["ssd", "ssd_state_update"]


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    chunk_size: int = 256,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 state space dual layer: a selective SSM whose A is a scalar per head, computed in chunks.

        dt'_t = clamp(softplus(dt_t + dt_bias), *dt_limit)
        h_t = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t B_t^T ;  y_t = h_t C_t + D * x_t ;  y *= silu(z)

    Args:
        x: (batch, seqlen, nheads, headdim).   dt: (batch, seqlen, nheads).   A: (nheads,) float32.
        B, C: (batch, seqlen, ngroups, dstate) or (batch, seqlen, dstate); head h uses group
            h // (nheads // ngroups).
        D: (nheads,) or (nheads, headdim).   dt_bias: (nheads,).   z: like x.
        chunk_size: block length of the chunked algorithm (any seqlen works; the result does not
            depend on it beyond rounding).
        initial_state: (batch, nheads, headdim, dstate).   return_final_state: also return the
            float32 state after the last token, same shape.
        seq_idx: (batch, seqlen) int32, nondecreasing per row; the state restarts where it changes.
        backend: None (Triton on CUDA, PyTorch otherwise), "reference", "torch" or "triton".
    Returns:
        y: (batch, seqlen, nheads, headdim) in x's dtype, and the final state when asked.

    Example:
        >>> x = torch.randn(2, 300, 8, 64); dt = torch.rand(2, 300, 8); A = -torch.rand(8)
        >>> B, C = torch.randn(2, 2, 300, 1, 128)
        >>> y, h = ssd(x, dt, A, B, C, chunk_size=128, return_final_state=True)  # h: (2, 8, 64, 128)
    """
    B, C = check_ssd("ssd", x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, step=False, seq_idx=seq_idx)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    _, fn = implementation("ssd", backend, x.device)
    return fn(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
              chunk_size=chunk_size, initial_state=initial_state, return_final_state=return_final_state,
              seq_idx=seq_idx)


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    backend: str | None = None,
) -> torch.Tensor:
    """One recurrent step of `ssd` for decoding; updates `state` in place.

    Args:
        state: (batch, nheads, headdim, dstate) float32, overwritten with the new state. A bfloat16 /
            float16 state (an inference cache allocated with `state_dtype=torch.bfloat16`) is read,
            updated in float32 and rounded back: it halves the state traffic of large-batch decoding.
        x, z: (batch, nheads, headdim).   dt: (batch, nheads).   A: (nheads,).
        B, C: (batch, ngroups, dstate) or (batch, dstate).   D: (nheads,) or (nheads, headdim).
    Returns:
        y: (batch, nheads, headdim) in x's dtype.

    Example:
        >>> state = torch.zeros(2, 8, 64, 128)
        >>> y = ssd_state_update(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    """
    B, C = check_ssd("ssd_state_update", x, dt, A, B, C, D, z, dt_bias, dt_limit, state, step=True)
    _, fn = implementation("ssd_state_update", backend, x.device)
    return write_back(state, fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                dt_limit=tuple(dt_limit)))
