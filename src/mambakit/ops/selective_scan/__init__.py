"""Selective scan (Mamba-1 "S6"): the public op and its one-step decode update. See README.md for the math."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import FLOATS, ShapeChecker, as_grouped
from ..dispatch import implementation

__all__ = ["selective_scan", "selective_state_update"]

_A_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
_BC_DTYPES = FLOATS + (torch.complex64, torch.complex128)


def _check_params(chk: ShapeChecker, A, D, dt_bias, z, z_dims) -> None:
    chk.tensor("A", A, ("dim", "dstate"), dtypes=_A_DTYPES)
    chk.tensor("D", D, ("dim",), optional=True)
    chk.tensor("dt_bias", dt_bias, ("dim",), optional=True)
    chk.tensor("z", z, z_dims, optional=True)
    chk.divides("B", "ngroups", "dim")


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
    chk = ShapeChecker("selective_scan")
    chk.tensor("x", x, ("batch", "seqlen", "dim"))
    chk.tensor("dt", dt, ("batch", "seqlen", "dim"))
    B, C = as_grouped("B", B, chk), as_grouped("C", C, chk)
    chk.tensor("B", B, ("batch", "seqlen", "ngroups", "dstate"), dtypes=_BC_DTYPES)
    chk.tensor("C", C, ("batch", "seqlen", "ngroups", "dstate"), dtypes=_BC_DTYPES)
    _check_params(chk, A, D, dt_bias, z, ("batch", "seqlen", "dim"))
    state_dtypes = (torch.float32, torch.float64) + ((torch.complex64, torch.complex128) if A.is_complex() else ())
    chk.tensor("initial_state", initial_state, ("batch", "dim", "dstate"), dtypes=state_dtypes, optional=True)
    chk.seq_idx(seq_idx)
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
    chk = ShapeChecker("selective_state_update")
    chk.tensor("x", x, ("batch", "dim"))
    if dt_proj_weight is None:
        chk.tensor("dt", dt, ("batch", "dim"))
    else:
        chk.tensor("dt", dt, ("batch", "rank"))
        chk.tensor("dt_proj_weight", dt_proj_weight, ("dim", "rank"))
    if isinstance(B, torch.Tensor) and B.dim() == 2:
        B = B.unsqueeze(1)
    if isinstance(C, torch.Tensor) and C.dim() == 2:
        C = C.unsqueeze(1)
    chk.tensor("B", B, ("batch", "ngroups", "dstate"), dtypes=_BC_DTYPES)
    chk.tensor("C", C, ("batch", "ngroups", "dstate"), dtypes=_BC_DTYPES)
    _check_params(chk, A, D, dt_bias, z, ("batch", "dim"))
    state_dtypes = (torch.float32, torch.float64) + ((torch.complex64, torch.complex128) if A.is_complex() else ())
    chk.tensor("state", state, ("batch", "dim", "dstate"), dtypes=state_dtypes)
    name, fn = implementation("selective_state_update", backend, x.device, complex_A=A.is_complex())
    if dt_proj_weight is not None and name == "triton":
        y, new_state = fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                          dt_proj_weight=dt_proj_weight)
    else:
        if dt_proj_weight is not None:
            dt = F.linear(dt, dt_proj_weight)
        y, new_state = fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    if new_state is not state:
        state.copy_(new_state)
    return y
