"""State space duality (Mamba-2 "SSD"): the public chunked op and its one-step decode update. See README.md."""

from __future__ import annotations

import math

import torch

from ..checks import ShapeChecker, as_grouped
from ..dispatch import implementation

__all__ = ["ssd", "ssd_state_update"]

_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_params(chk: ShapeChecker, A, D, dt_bias, dt_limit) -> None:
    chk.tensor("A", A, ("nheads",), dtypes=(torch.float32, torch.float64))
    if D is not None and isinstance(D, torch.Tensor) and D.dim() == 2:
        chk.tensor("D", D, ("nheads", "headdim"), dtypes=_PARAM_DTYPES)
    else:
        chk.tensor("D", D, ("nheads",), dtypes=_PARAM_DTYPES, optional=True)
    chk.tensor("dt_bias", dt_bias, ("nheads",), dtypes=_PARAM_DTYPES, optional=True)
    chk.divides("B", "ngroups", "nheads")
    if len(dt_limit) != 2 or not (0.0 <= dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"ssd: dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit}")


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
    chk = ShapeChecker("ssd")
    chk.tensor("x", x, ("batch", "seqlen", "nheads", "headdim"))
    chk.tensor("dt", dt, ("batch", "seqlen", "nheads"))
    B, C = as_grouped("B", B, chk), as_grouped("C", C, chk)
    chk.tensor("B", B, ("batch", "seqlen", "ngroups", "dstate"))
    chk.tensor("C", C, ("batch", "seqlen", "ngroups", "dstate"))
    chk.tensor("z", z, ("batch", "seqlen", "nheads", "headdim"), optional=True)
    _check_params(chk, A, D, dt_bias, dt_limit)
    chk.tensor("initial_state", initial_state, ("batch", "nheads", "headdim", "dstate"),
               dtypes=(torch.float32, torch.float64), optional=True)
    chk.seq_idx(seq_idx)
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
    chk = ShapeChecker("ssd_state_update")
    chk.tensor("x", x, ("batch", "nheads", "headdim"))
    chk.tensor("dt", dt, ("batch", "nheads"))
    if isinstance(B, torch.Tensor) and B.dim() == 2:
        B = B.unsqueeze(1)
    if isinstance(C, torch.Tensor) and C.dim() == 2:
        C = C.unsqueeze(1)
    chk.tensor("B", B, ("batch", "ngroups", "dstate"))
    chk.tensor("C", C, ("batch", "ngroups", "dstate"))
    chk.tensor("z", z, ("batch", "nheads", "headdim"), optional=True)
    _check_params(chk, A, D, dt_bias, dt_limit)
    chk.tensor("state", state, ("batch", "nheads", "headdim", "dstate"),
               dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
    _, fn = implementation("ssd_state_update", backend, x.device)
    y, new_state = fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                      dt_limit=tuple(dt_limit))
    if new_state is not state:
        state.copy_(new_state)
    return y
