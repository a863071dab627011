"""Sequential reference of the selective scan (Mamba-1 "S6"; Gu & Dao 2023, Section 3.2, Algorithm 2).

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate.

    dt'_t = softplus(dt_t + dt_bias)    (or dt_t + dt_bias without softplus)
    h_t   = exp(dt'_t * A) * h_{t-1} + dt'_t * B_t * x_t        h: (B, D, N), diagonal A: (D, N)
    y_t   = <C_t, h_t> + D * x_t,  then y_t *= silu(z_t)

Channel d reads the B_t, C_t of group d // (D / G). Where seq_idx changes between t-1 and t, h_{t-1}
is replaced by zeros (packed documents). Complex A (S4D's conjugate-pair convention): h is complex
and y_t = 2 Re <C_t, h_t>.

Runs one step at a time in float64 (complex128): the ground truth that every fast path is tested
against, including its gradients (autograd runs through the loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def final_state_dtype(x_dtype: torch.dtype, complex_state: bool) -> torch.dtype:
    """States are float32 (complex64), or float64 (complex128) when the inputs are float64."""
    if x_dtype == torch.float64:
        return torch.complex128 if complex_state else torch.float64
    return torch.complex64 if complex_state else torch.float32


def selective_scan_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                             initial_state=None, return_final_state=False, seq_idx=None):
    """Sequential selective scan; arguments as in `mambakit.ops.selective_scan` (B, C already 4-D)."""
    batch, seqlen, dim = x.shape
    ngroups = B.shape[2]
    is_complex = A.is_complex()
    real = torch.float64
    cplx = torch.complex128
    dt_ = dt.to(real)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(real)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    work = cplx if is_complex else real
    x_ = x.to(real)
    A_ = A.to(work)
    # channel d reads group d // (dim // ngroups): expand B, C from (B, L, G, N) to (B, L, D, N)
    B_ = B.to(work if B.is_complex() else real).repeat_interleave(dim // ngroups, dim=2)
    C_ = C.to(work if C.is_complex() else real).repeat_interleave(dim // ngroups, dim=2)
    h = torch.zeros(batch, dim, A.shape[1], dtype=work, device=x.device)
    if initial_state is not None:
        h = h + initial_state.to(work)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(real)[:, None, None]  # (B, 1, 1)
            h = h * keep
        dA = torch.exp(dt_[:, t, :, None] * A_)  # (B, D, N)
        h = dA * h + (dt_[:, t] * x_[:, t])[:, :, None] * B_[:, t]
        y = (h * C_[:, t]).sum(-1)  # (B, D)
        if is_complex:
            y = 2 * y.real
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else torch.zeros(batch, 0, dim, dtype=real, device=x.device)  # (B, L, D)
    if D is not None:
        y = y + D.to(real) * x_
    if z is not None:
        y = y * F.silu(z.to(real))
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, h.to(final_state_dtype(x.dtype, is_complex))


def selective_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step; returns y (batch, dim) and the new state (the caller writes it in place).

    state: (B, D, N); x, dt, z: (B, D); B, C: (B, G, N).
    """
    y, new_state = selective_scan_reference(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D, z=None if z is None else z[:, None],
        dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=state, return_final_state=True,
    )
    return y[:, 0], new_state
