"""Sequential reference of the state space dual layer (Mamba-2 "SSD"; Dao & Gu 2024, Sections 3 and 6).

Shapes (legend): B batch, L seqlen, H nheads, P headdim, G ngroups, N dstate.

    dt'_t = clamp(softplus(dt_t + dt_bias), *dt_limit)     (no softplus when dt_softplus is False)
    h_t   = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t B_t^T       A: (H,) scalar per head, h: (B, H, P, N)
    y_t   = h_t C_t + D * x_t,  then y_t *= silu(z_t)

Head h reads the B_t, C_t of group h // (H / G). Where seq_idx changes between t-1 and t, the state
restarts from zero. Runs one step at a time in float64: the ground truth for the chunked paths.
`ssd_chunked_reference` below is the same function written as the paper's chunked algorithm
(Listing 1), kept as readable math next to the recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import compute_dtype


def final_state_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """States are float32, or float64 when the inputs are float64 (`ops.common.compute_dtype`)."""
    return compute_dtype(x_dtype)


def effective_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """dt' in float64: bias, softplus, then clamp to dt_limit (as the reference Mamba-2 does)."""
    dt_ = dt.to(torch.float64)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(torch.float64)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    lo, hi = dt_limit
    if lo > 0.0 or hi < float("inf"):
        dt_ = dt_.clamp(min=lo, max=hi)
    return dt_


def _skip_and_gate(y, x, D, z):
    """y + D * x (D per head or per channel), then the silu(z) gate; all (B, L, H, P) float64."""
    if D is not None:
        D_ = D.to(torch.float64)
        y = y + (D_[:, None] if D_.dim() == 1 else D_) * x
    if z is not None:
        y = y * F.silu(z.to(torch.float64))
    return y


def ssd_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                  dt_limit=(0.0, float("inf")), chunk_size=256, initial_state=None,
                  return_final_state=False, seq_idx=None):
    """Sequential SSD; arguments as in `mambakit.ops.ssd` (B, C 4-D). chunk_size does not change the result."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    f64 = torch.float64
    dt_ = effective_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, L, H)
    x_ = x.to(f64)
    A_ = A.to(f64)
    B_ = B.to(f64).repeat_interleave(nheads // ngroups, dim=2)  # (B, L, H, N)
    C_ = C.to(f64).repeat_interleave(nheads // ngroups, dim=2)
    h = torch.zeros(batch, nheads, headdim, dstate, dtype=f64, device=x.device)
    if initial_state is not None:
        h = h + initial_state.to(f64)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(f64)[:, None, None, None]
            h = h * keep
        decay = torch.exp(dt_[:, t] * A_)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt_[:, t, :, None] * x_[:, t])[..., None] * B_[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_[:, t]))
    y = torch.stack(ys, dim=1) if ys else torch.zeros_like(x_)  # (B, L, H, P)
    y = _skip_and_gate(y, x_, D, z).to(x.dtype)
    if not return_final_state:
        return y
    return y, h.to(final_state_dtype(x.dtype))


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) log-decays -> (..., T, T) with [i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal."""
    T = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return out.masked_fill(~mask, float("-inf"))


def ssd_chunked_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                          dt_limit=(0.0, float("inf")), chunk_size=64, initial_state=None,
                          return_final_state=False):
    """The paper's chunked SSD (Listing 1) in float64, without seq_idx: readable, not fast.

    1. intra-chunk (diagonal blocks): Y_diag = (C B^T ∘ L) (dt x), L the decay mask from segsum;
    2. chunk states: the state each chunk contributes at its end;
    3. state passing: a recurrence over chunks (itself an SSD with one step per chunk);
    4. state -> output: each chunk's incoming state read out through C with the decay so far.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    f64 = torch.float64
    pad = (-seqlen) % chunk_size
    dt_ = effective_dt(dt, dt_bias, dt_softplus, dt_limit)
    # zero dt on padding: no decay and no input, so the final state is the state after the last real token
    X = F.pad(x.to(f64), (0, 0, 0, 0, 0, pad)) * F.pad(dt_, (0, 0, 0, pad))[..., None]  # (B, L', H, P)
    Adt = F.pad(dt_, (0, 0, 0, pad)) * A.to(f64)  # (B, L', H)
    Bh = F.pad(B.to(f64), (0, 0, 0, 0, 0, pad)).repeat_interleave(nheads // ngroups, dim=2)
    Ch = F.pad(C.to(f64), (0, 0, 0, 0, 0, pad)).repeat_interleave(nheads // ngroups, dim=2)
    nc = X.shape[1] // chunk_size

    def chunks(t):
        return t.reshape(batch, nc, chunk_size, *t.shape[2:])

    X, Adt, Bh, Ch = chunks(X), chunks(Adt).permute(0, 3, 1, 2), chunks(Bh), chunks(Ch)  # Adt: (B, H, c, T)
    A_cumsum = torch.cumsum(Adt, dim=-1)
    L = torch.exp(segsum(Adt))  # (B, H, c, T, T)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, X)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (B, H, c, T)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_states, X)  # (B, c, H, P, N)
    h0 = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state.to(f64)[:, None]
    states = torch.cat([h0, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(A_cumsum))
    y = (Y_diag + Y_off).reshape(batch, nc * chunk_size, nheads, headdim)[:, :seqlen]
    y = _skip_and_gate(y, x.to(f64), D, z).to(x.dtype)
    if not return_final_state:
        return y
    return y, final.to(final_state_dtype(x.dtype))


def ssd_state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               dt_limit=(0.0, float("inf"))):
    """One recurrent step; returns y (B, H, P) and the new state (the caller writes it in place)."""
    y, new_state = ssd_reference(
        x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D, z=None if z is None else z[:, None],
        dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=state, return_final_state=True,
    )
    return y[:, 0], new_state
