"""Selective scan (Mamba-1 "S6"): the public op and its one-step decode update. See README.md for the math."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_selective_scan, write_back
from ..dispatch import implementation

__all__ = ["selective_scan", "selective_state_update"]


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective state space scan of Mamba-1 (input-dependent dt, B, C; diagonal A per channel).

        dt'_t = softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias
        h_t = exp(dt'_t * A) * h_{t-1} + dt'_t * B_t * x_t ;  y_t = <C_t, h_t> + D * x_t ;  y *= silu(z)

    Args:
        x, dt: (batch, seqlen, dim) inputs and step sizes.
        A: (dim, dstate) float32 state matrix (negative real part for a stable scan); complex64
            allowed on the reference and torch backends (then y_t = 2 Re <C_t, h_t>).
        B, C: (batch, seqlen, ngroups, dstate), or (batch, seqlen, dstate) for ngroups = 1;
            channel d uses group d // (dim // ngroups).
        D, dt_bias: (dim,) skip connection and step-size bias.
        z: (batch, seqlen, dim) gate.
        initial_state: (batch, dim, dstate) state before the first token (gradients flow into it).
        return_final_state: also return the (batch, dim, dstate) float32 state after the last token.
        seq_idx: (batch, seqlen) int32 document index, nondecreasing along each row; the state
            restarts from zero where it changes (packed sequences).
        backend: None (Triton on CUDA, PyTorch otherwise), "reference", "torch" or "triton".
    Returns:
        y: (batch, seqlen, dim) in x's dtype, and the final state when asked.

    Example:
        >>> x = torch.randn(2, 64, 32); dt = torch.rand(2, 64, 32)
        >>> A = -torch.rand(32, 16); B, C = torch.randn(2, 2, 64, 1, 16)
        >>> y, h = selective_scan(x, dt, A, B, C, return_final_state=True)   # (2, 64, 32), (2, 32, 16)
    """
    B, C = check_selective_scan("selective_scan", x, dt, A, B, C, D, z, dt_bias, initial_state, step=False,
                                seq_idx=seq_idx)
    _, fn = implementation("selective_scan", backend, x.device, complex_A=A.is_complex())
    return fn(
        x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
        return_final_state=return_final_state, seq_idx=seq_idx,
    )


def selective_state_update(
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
    backend: str | None = None,
    dt_proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step of `selective_scan` for decoding; updates `state` in place.

    Args:
        state: (batch, dim, dstate) float32 state, overwritten with the new state.
        x, dt, z: (batch, dim).   B, C: (batch, ngroups, dstate) or (batch, dstate).
        A: (dim, dstate).   D, dt_bias: (dim,).
        dt_proj_weight: (dim, rank), Mamba-1's dt_proj: dt is then its low-rank input (batch, rank) and the
            step uses dt @ dt_proj_weight^T (the Triton kernel computes it in float32 in-kernel, saving a
            matmul launch per layer; other backends call F.linear first).
    Returns:
        y: (batch, dim) in x's dtype.

    Example:
        >>> state = torch.zeros(2, 32, 16)
        >>> y = selective_state_update(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    """
    B, C = check_selective_scan("selective_state_update", x, dt, A, B, C, D, z, dt_bias, state, step=True,
                                dt_proj_weight=dt_proj_weight)
    name, fn = implementation("selective_state_update", backend, x.device, complex_A=A.is_complex())
    if dt_proj_weight is not None and name == "triton":  # dt_proj inside the state-update kernel
        return write_back(state, fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                    dt_proj_weight=dt_proj_weight))
    if dt_proj_weight is not None:
        dt = F.linear(dt, dt_proj_weight)
    return write_back(state, fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus))
