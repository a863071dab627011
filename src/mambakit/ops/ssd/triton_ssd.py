"""The "triton" backend of `mambakit.ops.ssd`: chunk primitives composed forward and backward.

Shapes (legend): b batch, L seqlen, H nheads, P headdim, G ngroups, N dstate, c = ceil(L / T) chunks,
T chunk_size.

Forward, four launches, all linear in L:
    1. `chunk_decay_fwd`   dt' and the within-chunk cumsum of dt' A              (b, H, c, T) x 2, fp32
    2. `chunk_cb_fwd`      C B^T per group and chunk, masks folded in            (b, c, G, T, T) fp32
    3. `chunk_state_fwd`   chunk states fused with state passing                 (b, c + 1, H, P, N)
    4. `chunk_scan_fwd`    y = diagonal blocks + incoming state + D x, z gate    (b, L, H, P)
Backward, four launches (plus three tiny sums):
    5. `chunk_state_bwd`   gradients of the chunk-end states (reverse walk) and of the initial state
    6. `chunk_dcb_bwd`     dCB per group; the decay gradient's intra-chunk part (one fp32 tile's row - column sums)
    7. `chunk_dbc_bwd`     dB, dC per group
    8. `chunk_dx_bwd`      dx, ddt, dz; dA, ddt_bias, dD partials (reverse cumsum of dcs fused in)

Saved for the backward: the inputs, dt', cs, CB and the chunk states (everything else is cheaper to
recompute than to store: the decays, dt' x, silu(z)); y before the gate (fp32) only when z is given.
The states are bf16 for bf16 inputs (they are only dot operands in the backward), fp32 otherwise.
"""

from __future__ import annotations

import math

import torch

from ..common import autograd_op, fake_grads, pack_grads, unpack_grads
from ..triton_launch import next_power_of_2
from .triton_chunk_decay import chunk_decay_fwd
from .triton_chunk_scan import chunk_cb_fwd, chunk_scan_fwd
from .triton_chunk_scan_bwd import bwd_config, chunk_dbc_bwd, chunk_dcb_bwd, chunk_dx_bwd
from .triton_chunk_state import chunk_state_bwd, chunk_state_fwd
from .triton_common import store_dtype

__all__ = ["batch_pieces", "ssd_triton", "ssd_triton_forward", "ssd_triton_intermediates", "ssd_triton_backward", "kernel_chunk"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_chunk(chunk_size: int, seqlen: int) -> int:
    """The kernels' chunk T: chunk_size rounded up to a power of two in [16, 256], no longer than needed."""
    return min(256, max(16, next_power_of_2(chunk_size)), max(16, next_power_of_2(seqlen)))


# CUDA caps grid axes 1 and 2 at 65535 blocks; the launches put batch x chunks (x groups) or batch x heads there.
_GRID_YZ = 65535
# The arguments with a batch dimension first (everything else is per head or a setting).
_PER_ROW = frozenset({"x", "dt", "B", "C", "z", "initial_state", "seq_idx", "dy", "dfinal", "dtp", "cs", "cb",
                      "states", "y_pre"})


def batch_pieces(b: int, L: int, H: int, G: int, T: int) -> list[slice]:
    """Batch slices whose launches fit the grid: one slice for every usual shape, several when batch x chunks x
    groups or batch x heads would pass 65535 (e.g. 512 rows of 8192 tokens at T = 64). Each slice is an
    independent problem, so running them one after the other gives exactly the same numbers."""
    nc = -(-L // T)
    per_row = max(nc * G, nc, H)
    if per_row > _GRID_YZ:
        raise ValueError(f"ssd: one row of seqlen {L} makes {nc} chunks of {T} ({G} groups), more than the GPU grid's "
                         f"{_GRID_YZ} blocks per axis; use a larger chunk_size or feed the sequence in pieces "
                         "(initial_states / return_final_states)")
    rows = max(1, min(b, _GRID_YZ // per_row))
    return [slice(i, min(i + rows, b)) for i in range(0, b, rows)]


def _by_pieces(fn, kwargs: dict) -> list | None:
    """`fn`'s results over batch slices when one launch would not fit the grid, else None (run it whole)."""
    x, B = kwargs["x"], kwargs["B"]
    pieces = batch_pieces(x.shape[0], x.shape[1], x.shape[2], B.shape[2], kwargs["T"])
    if len(pieces) == 1:
        return None
    return [fn(**{k: (v[p] if k in _PER_ROW and v is not None else v) for k, v in kwargs.items()}) for p in pieces]


def _cat(ts):
    return None if ts[0] is None else torch.cat(ts)


def ssd_triton_intermediates(*, x, dt, A, B, C, dt_bias, initial_state, seq_idx, dt_softplus, dt_limit, T):
    """Launches 1-3 (decay, C B^T, chunk states): dt', cs, cb, states, final state."""
    parts = _by_pieces(ssd_triton_intermediates, dict(x=x, dt=dt, A=A, B=B, C=C, dt_bias=dt_bias,
                                                      initial_state=initial_state, seq_idx=seq_idx,
                                                      dt_softplus=dt_softplus, dt_limit=dt_limit, T=T))
    if parts is not None:
        return tuple(torch.cat(ts) for ts in zip(*parts))
    dtp, cs = chunk_decay_fwd(dt, A, dt_bias, dt_softplus, dt_limit, T)
    cb = chunk_cb_fwd(C, B, seq_idx, T, x.dtype)
    states, final = chunk_state_fwd(x, B, dtp, cs, initial_state, seq_idx, T)
    return dtp, cs, cb, states, final


def ssd_triton_forward(*, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, dt_limit, T):
    """Run the four forward launches; returns y, final state and what the backward needs."""
    parts = _by_pieces(ssd_triton_forward, dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                                                initial_state=initial_state, seq_idx=seq_idx,
                                                dt_softplus=dt_softplus, dt_limit=dt_limit, T=T))
    if parts is not None:
        ys, finals, saved = zip(*parts)
        return torch.cat(ys), torch.cat(finals), tuple(_cat(ts) for ts in zip(*saved))
    dtp, cs, cb, states, final = ssd_triton_intermediates(x=x, dt=dt, A=A, B=B, C=C, dt_bias=dt_bias,
                                                          initial_state=initial_state, seq_idx=seq_idx,
                                                          dt_softplus=dt_softplus, dt_limit=dt_limit, T=T)
    y, y_pre = chunk_scan_fwd(x, z, D, C, cb, states, dtp, cs, seq_idx, T)
    return y, final, (dtp, cs, cb, states, y_pre)


def ssd_triton_backward(*, dy, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, cb, states, y_pre,
                        dt_softplus, dt_limit, T, need_dh0, dx_out=None):
    """Launches 5-8 and the parameter sums: (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0).

    dy: (b, L, H, P) with a contiguous last dim; dfinal: (b, H, P, N) float32 or None. The intermediates
    are what `ssd_triton_forward` returns (y_pre only when z is given). Shared by the SSD's own autograd
    node and the fused Mamba-2 node (ops/mamba_inner), which recomputes the intermediates and passes dx_out
    (a channel slice of its conv's upstream gradient, see `chunk_dx_bwd`): dx is written there unless the
    input is cut into pieces, so a caller copies only when the returned dx is not dx_out.
    """
    parts = _by_pieces(ssd_triton_backward, dict(dy=dy, dfinal=dfinal, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z,
                                                 dt_bias=dt_bias, seq_idx=seq_idx, dtp=dtp, cs=cs, cb=cb,
                                                 states=states, y_pre=y_pre, dt_softplus=dt_softplus,
                                                 dt_limit=dt_limit, T=T, need_dh0=need_dh0))
    if parts is not None:  # per-row gradients are concatenated, the parameters' summed over the slices
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = zip(*parts)
        add = lambda ts: None if ts[0] is None else sum(ts[1:], ts[0])  # noqa: E731
        return _cat(dx), _cat(ddt), add(dA), _cat(dB), _cat(dC), add(dD), _cat(dz), add(dbias), _cat(dh0)
    G, N = B.shape[2], B.shape[3]
    dH, dh0, ddend = chunk_state_bwd(dy, z, C, cs, seq_idx, states, dfinal, need_dh0, T)
    cfg_dcb, cfg_dbc, cfg_dx, nslot = bwd_config(N, T)
    dcb, rowp = chunk_dcb_bwd(x, dy, z, dtp, cs, seq_idx, cb, G, nslot, T, cfg=cfg_dcb)
    dB, dC = chunk_dbc_bwd(x, dy, z, B, C, dtp, cs, seq_idx, states, dH, dcb, rowp, T, cfg=cfg_dbc)
    del dcb  # (b, c, G, T, T): not needed by the dx launch
    dx, ddt, dz, dA_p, dbias_p, dD_p = chunk_dx_bwd(
        x, dt, dy, z, y_pre, A, dt_bias, D, B, dtp, cs, seq_idx, cb, dH, rowp, ddend, dt_softplus, dt_limit, T,
        cfg=cfg_dx, dx_out=dx_out)
    dA = dA_p.sum(dim=(0, 1))
    dbias = dbias_p.sum(dim=(0, 1)) if dt_bias is not None else None
    dD = None
    if D is not None:
        dD = dD_p.sum(dim=(0, 1, 2))  # (H, P)
        if D.dim() == 1:
            dD = dD.sum(dim=-1)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0


# One custom op pair (torch.library, autograd registered): compile, autocast and FSDP see one op with fake tensors.
# The forward returns, besides y and the final state, the intermediates its backward reads.


def _ssd_fwd_impl(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                  initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, dt_softplus: bool,
                  dt_limit: list[float], T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                  torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, final state, dt', cs, C B^T, chunk states, y before the gate (empty without z))."""
    y, final, (dtp, cs, cb, states, y_pre) = ssd_triton_forward(
        x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state, seq_idx=seq_idx,
        dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), T=T)
    return y, final, dtp, cs, cb, states, x.new_empty(0, dtype=torch.float32) if y_pre is None else y_pre


_ssd_fwd_op = torch.library.custom_op("mambakit::ssd_fwd", mutates_args=())(_ssd_fwd_impl)


@_ssd_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, dt_limit, T):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = -(-L // T)
    f32 = torch.float32
    y_pre = x.new_empty(b, L, H, P, dtype=f32) if z is not None else x.new_empty(0, dtype=f32)
    return (x.new_empty(b, L, H, P), x.new_empty(b, H, P, N, dtype=f32), x.new_empty(b, H, nc, T, dtype=f32),
            x.new_empty(b, H, nc, T, dtype=f32), x.new_empty(b, nc, G, T, T, dtype=f32),
            x.new_empty(b, nc + 1, H, P, N, dtype=store_dtype(x.dtype)), y_pre)


def _ssd_bwd_impl(dy: torch.Tensor, dfinal: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                  B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                  dt_bias: torch.Tensor | None, seq_idx: torch.Tensor | None, dtp: torch.Tensor, cs: torch.Tensor,
                  cb: torch.Tensor, states: torch.Tensor, y_pre: torch.Tensor, dt_softplus: bool, dt_limit: list[float],
                  T: int, need_dh0: bool) -> list[torch.Tensor]:
    """[dx, ddt, dA, dB, dC, dD, dz, ddt_bias] in their inputs' dtypes, then dh0 (float32); empty where absent."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dfinal = dfinal.float().contiguous() if dfinal is not None else None
    *grads, dh0 = ssd_triton_backward(dy=dy, dfinal=dfinal, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                                      seq_idx=seq_idx, dtp=dtp, cs=cs, cb=cb, states=states,
                                      y_pre=y_pre if z is not None else None, dt_softplus=dt_softplus,
                                      dt_limit=tuple(dt_limit), T=T, need_dh0=need_dh0)
    return pack_grads(grads, (x, dt, A, B, C, D, z, dt_bias)) + [x.new_empty(0) if dh0 is None else dh0]


_ssd_bwd_op = torch.library.custom_op("mambakit::ssd_bwd", mutates_args=())(_ssd_bwd_impl)


@_ssd_bwd_op.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, cb, states, y_pre, dt_softplus, dt_limit, T,
      need_dh0):
    b, _, H, P = x.shape
    dh0 = x.new_empty(b, H, P, B.shape[3], dtype=torch.float32) if need_dh0 else x.new_empty(0)
    return fake_grads((x, dt, A, B, C, D, z, dt_bias), [True] * 8) + [dh0]


def _ssd_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, dt_limit, T = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, *output[2:])
    ctx.dt_softplus, ctx.dt_limit, ctx.T = dt_softplus, dt_limit, T
    ctx.has_h0 = initial_state is not None


def _ssd_backward(ctx, dy, dfinal, *_intermediates, bwd):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, cb, states, y_pre = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(x)
    need_dh0 = ctx.has_h0 and ctx.needs_input_grad[8]
    grads = bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, cb, states, y_pre,
                        ctx.dt_softplus, ctx.dt_limit, ctx.T, need_dh0)
    present = (True, True, True, True, True, D is not None, z is not None, dt_bias is not None, need_dh0)
    return *unpack_grads(grads, present), None, None, None, None


_ssd_op = autograd_op("SSD", _ssd_fwd_impl, _ssd_fwd_op, _ssd_setup_context, _ssd_backward, _ssd_bwd_impl, _ssd_bwd_op)


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels take any strides except on the last dim, which must be 1 (coalesced rows)."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def ssd_triton(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD in Triton; arguments as in `mambakit.ops.ssd` (B, C 4-D, inputs validated there).

    Args:
        x, z: (b, L, H, P) float32 / bfloat16 / float16.  dt: (b, L, H).  A: (H,).  B, C: (b, L, G, N).
        D: (H,) or (H, P).  dt_bias: (H,).  initial_state: (b, H, P, N).  seq_idx: (b, L) int.
        chunk_size: the kernels' chunk is chunk_size rounded up to a power of two and clamped to [16, 256]
            (tiles smaller than 16 do not reach the tensor cores; the result does not depend on the chunk
            beyond rounding, so a model configured with chunk 8 or 300 runs here unchanged); sequences
            shorter than a chunk use a smaller power of two
            (the result does not depend on it beyond rounding).
    Returns:
        y: (b, L, H, P) in x's dtype; with return_final_state also the final state (b, H, P, N) float32.
        Differentiable in x, dt, A, B, C, D, z, dt_bias, initial_state (and through the final state).

    Example:
        >>> y, h = ssd_triton(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, return_final_state=True)
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"ssd: backend 'triton' needs x of dtype float32, bfloat16 or float16, got {x.dtype} "
                         "(use backend='torch' for float64)")
    batch, seqlen, nheads, headdim = x.shape
    if seqlen == 0:
        raise ValueError("ssd: backend 'triton' needs seqlen >= 1")
    T = kernel_chunk(chunk_size, seqlen)
    x, z, dt, B, C = (_last_dim_contiguous(t) for t in (x, z, dt, B, C))
    A = A.float()
    D = D.float().contiguous() if D is not None else None
    dt_bias = dt_bias.float().contiguous() if dt_bias is not None else None
    initial_state = initial_state.float().contiguous() if initial_state is not None else None
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    y, final = _ssd_op(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, [lo, hi], T)[:2]
    if return_final_state:
        return y, final
    return y
