"""Chunked SSD in PyTorch (Dao & Gu 2024, Section 6, Listing 1): the "torch" backend of `mambakit.ops.ssd`.

Shapes (legend): b batch, L seqlen (padded to c * T), H nheads, P headdim, G ngroups, R = H / G heads
per group, N dstate, c number of chunks, T chunk_size, S number of chunk-end states kept.

The sequence is cut into chunks of T tokens and the SSD runs as batched matmuls, linear in seqlen.
With a_t = dt'_t A (<= 0) the log-decay of token t and acs_t its cumsum inside the chunk:

    1. intra-chunk:  Y_diag = (C B^T ∘ Lmask) (dt x)      Lmask[i, j] = exp(acs_i - acs_j), j <= i
    2. chunk states: S_k = sum_t exp(acs_end - acs_t) B_t (dt x)_t^T
    3. passing:      h_k = exp(acs_end) h_{k-1} + S_k      (a loop over chunks only)
    4. output:       Y_off[t] = exp(acs_t) C_t h_{k-1}

Layouts, chosen for the CPU's matmuls and to avoid copies:
  * everything inside the core is chunk-major, (c, b, ...), so that "all chunks but the first / last"
    is a contiguous slice: chunk 0 reads no state when there is no initial_state, and the last chunk's
    state is only formed when the final state is returned;
  * states are stored (N, R*P) per group: one (N, T) @ (T, R*P) matmul covers the R heads of a group,
    so B and C are never repeated per head;
  * the intra-chunk matmuls are head-major, (c, b, H, T, P); y and the gradients come back in the
    input's (b, L, H, P) layout by writing through permuted views (no transposing copies).

`_SSDTorchFunction` has a hand-written backward. It saves the inputs, y and the chunk-end states, and
recomputes the (T, T) decay masks, so no (T, T) tensor outlives the forward. The gradient of the
log-decays needs no (T, T) reduction (README.md derives it): per token and head,
    d acs_t = <dy_t, y_t> - dt_t <x_t, d(dt x)_t> + [t ends chunk k] <dh_k, h_k>.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..common import write_into
from .reference import final_state_dtype

__all__ = ["ssd_torch"]


# ----------------------------------------------------------------------------------------------
# shared chunk primitives (forward and backward)
# ----------------------------------------------------------------------------------------------

def _doc_masks(sidx_bcT):
    """Boolean masks from seq_idx (b, c, T), see README.md "Packed documents":

    same_doc (c, b, 1, T, T): tokens i, j in one document (applied to C B^T);
    end_doc (b, c, T, 1): token reaches its chunk's end state;   in_doc (b, c, T, 1): token sees the
    state entering its chunk;   keep_chunk (b, c, 1): the entering state survives the whole chunk.
    """
    end_idx = sidx_bcT[:, :, -1]  # (b, c)
    # the state entering chunk 0 (initial_state) belongs to the row's first document
    in_idx = torch.cat([sidx_bcT[:, :1, 0], end_idx[:, :-1]], dim=1)  # (b, c)
    same_doc = (sidx_bcT[:, :, :, None] == sidx_bcT[:, :, None, :]).transpose(0, 1)[:, :, None]
    return (same_doc, (sidx_bcT == end_idx[..., None])[..., None], (sidx_bcT == in_idx[..., None])[..., None],
            (end_idx == in_idx)[..., None])


def _decays(dt_bLH, A, T, masks):
    """Within-chunk cumsum of the log-decays and the per-token decay factors, all exp(<= 0).

    Returns acs, w_end = exp(acs_end - acs_t), w_start = exp(acs_t) (each (b, c, T, H)) and
    decay = exp(acs_end) (b, c, H), zeroed across document boundaries when masks is given.
    """
    b, Lp, H = dt_bLH.shape
    # restarting the cumsum every chunk keeps it small (no cancellation between large sums) and makes
    # every exponent below a difference of a later and an earlier cumsum: <= 0, so exp cannot overflow
    acs = (dt_bLH * A).view(b, Lp // T, T, H).cumsum(dim=2)
    w_end = (acs[:, :, -1:] - acs).exp()
    w_start = acs.exp()
    decay = acs[:, :, -1].exp()
    if masks is not None:
        _, end_doc, in_doc, keep_chunk = masks
        w_end, w_start, decay = w_end * end_doc, w_start * in_doc, decay * keep_chunk
    return acs, w_end, w_start, decay


def _chunk_major(t_bLGN, c, T):
    """(b, L', G, N) -> (c, b, G, T, N) contiguous (B and C are small: this copy is cheap)."""
    b, _, G, N = t_bLGN.shape
    return t_bLGN.view(b, c, T, G, N).permute(1, 0, 3, 2, 4).contiguous()


def _masked_cb(Cg, Bg, masks):
    """C_i . B_j for j <= i in the same document, else 0: (c, b, G, T, T), one per group, not per head."""
    # tril_ writes zeros above the diagonal (a multiply by a 0/1 mask would turn a non-finite B_j into NaN
    # at rows i < j); the document mask multiplies, so a non-finite value stays in the later documents of
    # its chunk, as in the sequential reference (whose reset is h * 0)
    CB = (Cg @ Bg.transpose(-1, -2)).tril_()
    return CB if masks is None else CB.mul_(masks[0])


def _causal_matmul(M, X):
    """M @ X for a lower-triangular M (c, b, H, T, T) and X = dt x (c, b, H, T, P, a temporary: overwritten).

    Row i must depend on rows j <= i of X only, non-finite values included, as in the recurrence: a NaN or
    inf in X[j] makes outputs i >= j non-finite and leaves rows i < j exactly as without it. A plain matmul
    breaks that (M[i, j] = 0 above the diagonal, and 0 * NaN = NaN), so the product runs on X with its
    non-finite entries zeroed, and the non-finite part E = X - X_finite (0 or non-finite per entry) comes
    back as its cumulative sum over the chunk: exactly 0 before the first non-finite entry of a column,
    non-finite from it on (inf + -inf and NaN stay non-finite).

    On CPU the repair is skipped when sum(X) is finite (then every entry is: a NaN or inf never sums to a
    finite value; an overflowing sum of finite values only takes the repair needlessly): the sum costs 2% of
    the matmul, the repair 60% (the cumsum over T is strided). Elsewhere the test would be a host sync, and
    under torch.compile a data-dependent branch, so the repair always runs.
    """
    if X.device.type == "cpu" and not torch.compiler.is_compiling() and bool(X.sum().isfinite()):
        return M @ X
    X_fin = torch.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    y = M @ X_fin
    return y.add_(X.sub_(X_fin).cumsum_(dim=-2))


def _segment_decay(acs_bcTH):
    """Lmask[i, j] = exp(acs_i - acs_j) for j <= i, 1 above the diagonal: (c, b, H, T, T).

    Above the diagonal the exponent is positive (it could overflow): it is zeroed before the exp, and
    those entries are then killed by the triangular C B^T, so only segment sums <= 0 are exponentiated.
    """
    acs_h = acs_bcTH.permute(1, 0, 3, 2).contiguous()  # (c, b, H, T): contiguous, so the (T, T) result is too
    return (acs_h[..., :, None] - acs_h[..., None, :]).tril_().exp_()


def _head_major(t_bLHP, scale_bLH, c, T):
    """t * scale written straight into the head-major, chunk-major layout (c, b, H, T, P), one pass."""
    b, _, H, P = t_bLHP.shape
    out = torch.empty(c, b, H, T, P, dtype=t_bLHP.dtype, device=t_bLHP.device)
    write_into(out, torch.mul, t_bLHP.view(b, c, T, H, P).permute(1, 0, 3, 2, 4),
               scale_bLH.reshape(b, c, T, H).permute(1, 0, 3, 2)[..., None])
    return out


def _group_major(t_bLHP, scale_bcTH, G, k0, k1):
    """t * scale for chunks k0..k1-1 in the grouped layout (k1 - k0, b, G, T, R*P), one pass."""
    b, c, T, H = scale_bcTH.shape
    P = t_bLHP.shape[-1]
    R = H // G
    out = torch.empty(k1 - k0, b, G, T, R * P, dtype=t_bLHP.dtype, device=t_bLHP.device)
    write_into(out.view(k1 - k0, b, G, T, R, P), torch.mul,
               t_bLHP.view(b, c, T, G, R, P)[:, k0:k1].permute(1, 0, 3, 2, 4, 5),
               scale_bcTH.view(b, c, T, G, R, 1)[:, k0:k1].permute(1, 0, 3, 2, 4, 5))
    return out


def _nat_grouped(t, P):
    """Grouped chunk-major (k, b, G, T, R*P) viewed in the input's index order (b, k, T, G, R, P), no copy."""
    return t.unflatten(-1, (-1, P)).permute(1, 0, 3, 2, 4, 5)


def _nat_heads(t, G):
    """Head-major chunk-major (k, b, H, T, P) viewed in the input's index order (b, k, T, G, R, P), no copy."""
    k, b, H, T, P = t.shape
    return t.view(k, b, G, H // G, T, P).permute(1, 0, 4, 2, 3, 5)


def _state_to_bhpn(h_bGNRP, H, P):
    """(b, G, N, R*P) -> (b, H, P, N), the public state layout."""
    b, G, N, _ = h_bGNRP.shape
    return h_bGNRP.view(b, G, N, H // G, P).permute(0, 1, 3, 4, 2).reshape(b, H, P, N)


def _state_from_bhpn(h_bHPN, G):
    """(b, H, P, N) -> (b, G, N, R*P), the layout of the state matmuls."""
    b, H, P, N = h_bHPN.shape
    return h_bHPN.view(b, G, H // G, P, N).permute(0, 1, 4, 2, 3).reshape(b, G, N, H // G * P)


def _flat3(t):
    """(..., m, k) contiguous -> (batch, m, k) view for bmm / baddbmm_."""
    return t.view(-1, t.shape[-2], t.shape[-1])


def _d_per_channel(D):
    """D as a (H, P) or broadcastable (H, 1) multiplier of x."""
    return D[:, None] if D.dim() == 1 else D


def _rowdot(u, v):
    """Sum over the last axis of u * v: a per-token, per-head dot product over headdim."""
    return torch.einsum("...p,...p->...", u, v)


# ----------------------------------------------------------------------------------------------
# forward and backward of the chunked core (padded inputs, compute dtype)
# ----------------------------------------------------------------------------------------------

def _chunk_fwd(x, dt, A, B, C, D, h0, T, masks, need_final):
    """x (b, L', H, P), dt (b, L', H) (dt' already), A (H,), B, C (b, L', G, N), D (H,) / (H, P) / None,
    h0 (b, H, P, N) or None.

    Returns y (b, L', H, P) (D skip included) and h_all (S + 1, b, G, N, R*P): h_all[k] is the state entering
    chunk k, h_all[c] (present when need_final) the final state.
    """
    b, Lp, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, c = H // G, Lp // T
    acs, w_end, w_start, decay = _decays(dt, A, T, masks)
    Bg, Cg = _chunk_major(B, c, T), _chunk_major(C, c, T)  # (c, b, G, T, N)

    # 1. intra-chunk: M = (C B^T) ∘ Lmask per head, built in Lmask's buffer; Y_diag = M (dt x)
    M = _segment_decay(acs)  # (c, b, H, T, T)
    M.view(c, b, G, R, T, T).mul_(_masked_cb(Cg, Bg, masks)[:, :, :, None])
    y_diag = _causal_matmul(M, _head_major(x, dt, c, T))  # (c, b, H, T, P)
    del M

    # 2.-3. chunk states written into h_all[1:], then passed along in place; the last chunk's state
    # only exists to be returned, so it is skipped otherwise
    S = c if need_final else c - 1
    h_all = torch.empty(S + 1, b, G, N, R * P, dtype=x.dtype, device=x.device)
    if h0 is None:
        h_all[0].zero_()
    else:
        h_all[0] = _state_from_bhpn(h0, G)
    if S > 0:
        xw = _group_major(x, dt.view(b, c, T, H) * w_end, G, 0, S)  # (S, b, G, T, R*P)
        write_into(_flat3(h_all[1:]), torch.bmm, _flat3(Bg[:S]).transpose(1, 2), _flat3(xw))  # (S, b, G, N, R*P)
        del xw
        for k in range(S):
            h_all[k + 1].view(b, G, N, R, P).addcmul_(decay[:, k].view(b, G, 1, R, 1), h_all[k].view(b, G, N, R, P))

    # 4. state -> output; chunk 0 reads no state without initial_state. y = Y_diag + w_start * Y_off
    # in one pass, written in the natural layout
    first = 0 if h0 is not None else 1
    y = torch.empty(b, c, T, G, R, P, dtype=x.dtype, device=x.device)
    if first:
        y[:, :1] = _nat_heads(y_diag[:1], G)
    if c > first:
        y_off = Cg[first:] @ h_all[first:c]  # (c - first, b, G, T, R*P)
        write_into(y[:, first:], torch.addcmul, _nat_heads(y_diag[first:], G), _nat_grouped(y_off, P),
                   w_start[:, first:].view(b, c - first, T, G, R, 1))
    y = y.view(b, Lp, H, P)
    if D is not None:
        y.addcmul_(x, _d_per_channel(D))
    return y, h_all


def _chunk_bwd(dy, dh_last, x, dt, A, B, C, D, has_h0, y, h_all, T, masks):
    """Gradients of `_chunk_fwd` w.r.t. x, dt, A, B, C, D and h0; dy (b, L', H, P), dh_last (b, H, P, N) or None."""
    b, Lp, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R, c = H // G, Lp // T
    S = h_all.shape[0] - 1
    first = 0 if has_h0 else 1
    acs, w_end, w_start, decay = _decays(dt, A, T, masks)
    Bg, Cg = _chunk_major(B, c, T), _chunk_major(C, c, T)
    dy5 = dy.view(b, c, T, H, P)
    # the dependence of y on Lmask's rows and on w_start, summed: <dy_t, y_t - D x_t>
    dacs = _rowdot(dy5, y.view(b, c, T, H, P))  # (b, c, T, H)
    dD = None
    if D is not None:
        if D.dim() == 1:
            dyx = _rowdot(dy, x)  # (b, L', H)
            dD = dyx.sum(dim=(0, 1))
            dacs -= (dyx * D).view(b, c, T, H)
        else:
            dyx = dy * x
            dD = dyx.sum(dim=(0, 1))
            dacs -= torch.einsum("blhp,hp->blh", dyx, D).view(b, c, T, H)
            del dyx

    # 1. intra-chunk (Lmask and M recomputed)
    Lm = _segment_decay(acs)  # (c, b, H, T, T)
    CB = _masked_cb(Cg, Bg, masks)  # (c, b, G, T, T)
    M = (Lm.view(c, b, G, R, T, T) * CB[:, :, :, None]).view(c, b, H, T, T)
    dy_h = torch.empty(c, b, H, T, P, dtype=dy.dtype, device=dy.device)
    dy_h.copy_(dy5.permute(1, 0, 3, 2, 4))
    dxdt_h = M.transpose(-1, -2) @ dy_h  # (c, b, H, T, P)
    del M
    dM = dy_h @ _head_major(x, dt, c, T).transpose(-1, -2)  # (c, b, H, T, T)
    del dy_h
    dM.mul_(Lm)
    del Lm
    dCB = dM.view(c, b, G, R, T, T).sum(dim=3) if R > 1 else dM.view(c, b, G, T, T)
    del dM
    if masks is None:
        dCB.tril_()
    else:
        dCB.mul_(torch.ones(T, T, dtype=torch.bool, device=dCB.device).tril_() & masks[0])
    dCg = dCB @ Bg  # (c, b, G, T, N)
    dBg = dCB.transpose(-1, -2) @ Cg
    del dCB

    # 4. state -> output: dh_all[k] for the states read by chunks first..c-1
    dh_all = torch.empty_like(h_all)  # dh_all[k]: gradient w.r.t. h_all[k]
    if c > first:
        dyw = _group_major(dy, w_start, G, first, c)  # (c - first, b, G, T, R*P)
        write_into(_flat3(dh_all[first:c]), torch.bmm, _flat3(Cg[first:]).transpose(1, 2), _flat3(dyw))
        _flat3(dCg[first:]).baddbmm_(_flat3(dyw), _flat3(h_all[first:c]).transpose(-1, -2))
        del dyw
    if S == c:
        if dh_last is None:
            dh_all[c].zero_()
        else:
            dh_all[c] = _state_from_bhpn(dh_last.to(h_all.dtype), G)

    # 3. state passing backwards; the log-decay at each chunk end gets <dh_k, h_k> (w_end and decay)
    for k in range(S - 1, first - 1, -1):
        dh_all[k].view(b, G, N, R, P).addcmul_(decay[:, k].view(b, G, 1, R, 1), dh_all[k + 1].view(b, G, N, R, P))
    dxdt = torch.empty(b, c, T, G, R, P, dtype=x.dtype, device=x.device)
    if S > 0:
        dS = dh_all[1:]  # (S, b, G, N, R*P)
        hS = h_all[1:]
        dend = _rowdot(dS.view(S, b, G, N, R, P), hS.view(S, b, G, N, R, P)).sum(dim=3).view(S, b, H)
        dacs[:, :S, -1] += dend.transpose(0, 1)
        # 2. chunk states
        dxw = Bg[:S] @ dS  # (S, b, G, T, R*P)
        xw = _group_major(x, dt.view(b, c, T, H) * w_end, G, 0, S)  # (S, b, G, T, R*P)
        _flat3(dBg[:S]).baddbmm_(_flat3(xw), _flat3(dS).transpose(-1, -2))
        del xw
        write_into(dxdt[:, :S], torch.addcmul, _nat_heads(dxdt_h[:S], G), _nat_grouped(dxw, P),
                   w_end[:, :S].view(b, S, T, G, R, 1))
        del dxw
    if S < c:
        dxdt[:, S:] = _nat_heads(dxdt_h[S:], G)
    del dxdt_h

    # d(dt x) -> dx, d dt; acs is a within-chunk cumsum, so d a_t = sum_{s >= t in the chunk} d acs_s
    dxdt = dxdt.view(b, Lp, H, P)
    u = _rowdot(dxdt, x)  # (b, L', H)
    dx = dxdt.mul_(dt[..., None])
    if D is not None:
        dx.addcmul_(dy, _d_per_channel(D))
    dacs -= (dt * u).view(b, c, T, H)
    da = dacs.flip(2).cumsum(2).flip(2).reshape(b, Lp, H)
    ddt = u + da * A
    dA = (da * dt).sum(dim=(0, 1))
    dB = dBg.permute(1, 0, 3, 2, 4).reshape(b, Lp, G, N)
    dC = dCg.permute(1, 0, 3, 2, 4).reshape(b, Lp, G, N)
    dh0 = _state_to_bhpn(dh_all[0], H, P) if has_h0 else None
    return dx, ddt, dA, dB, dC, dD, dh0


class _SSDTorchFunction(torch.autograd.Function):
    """The chunked core with a recomputing backward; inputs padded to a multiple of T, in the compute dtype."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, T, sidx, need_final):
        masks = None if sidx is None else _doc_masks(sidx.view(sidx.shape[0], -1, T))
        y, h_all = _chunk_fwd(x, dt, A, B, C, D, h0, T, masks, need_final)
        ctx.save_for_backward(x, dt, A, B, C, D, y, h_all, sidx)
        ctx.T, ctx.has_h0 = T, h0 is not None
        b, _, H, P = x.shape
        h_last = _state_to_bhpn(h_all[-1], H, P) if need_final else None
        return y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        x, dt, A, B, C, D, y, h_all, sidx = ctx.saved_tensors
        T = ctx.T
        masks = None if sidx is None else _doc_masks(sidx.view(sidx.shape[0], -1, T))
        dy = torch.zeros_like(y) if dy is None else dy.contiguous()
        dx, ddt, dA, dB, dC, dD, dh0 = _chunk_bwd(dy, dh_last, x, dt, A, B, C, D, ctx.has_h0, y, h_all, T, masks)
        return dx, ddt, dA, dB, dC, dD, dh0, None, None, None


# ----------------------------------------------------------------------------------------------
# public entry (called by mambakit.ops.ssd with validated inputs)
# ----------------------------------------------------------------------------------------------

def effective_dt_as(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """dt' in `dtype`: bias, softplus, clamp (clamped only when a limit is finite, as the reference)."""
    dt_ = dt.to(dtype)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(dtype)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    lo, hi = dt_limit
    if lo > 0.0 or hi < math.inf:
        dt_ = dt_.clamp(min=lo, max=hi)
    return dt_


# The chunked torch path is 1.3-1.8x faster on CPU with blocks of 64 than of 256 (benchmarks/cpu_ssd.py); a caller's
# larger chunk_size (the configs' 256 is the Triton kernels' choice) is capped here, on CPU only.
CPU_MAX_BLOCK = 64


def ssd_torch(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                chunk_size=256, initial_state=None, return_final_state=False, seq_idx=None):
    """Chunked SSD; arguments as in `mambakit.ops.ssd` (B, C 4-D, inputs already validated).

    Args:
        x: (b, L, H, P).  dt: (b, L, H).  A: (H,).  B, C: (b, L, G, N).  D: (H,) or (H, P).  z: like x.
        dt_bias: (H,).  initial_state: (b, H, P, N).  seq_idx: (b, L) nondecreasing ints.
    Returns:
        y (b, L, H, P) in x's dtype, and the final state (b, H, P, N) (float32, float64 for float64 x) when asked.

    Example:
        >>> y = ssd_torch(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=64)
    """
    b, L, H, P = x.shape
    cd = final_state_dtype(x.dtype)  # compute dtype: float32, float64 for float64 inputs
    if L == 0:  # nothing to scan: the state passes through unchanged
        h = x.new_zeros(b, H, P, B.shape[-1], dtype=cd) if initial_state is None else initial_state.to(cd)
        return (x.clone(), h) if return_final_state else x.clone()
    # the block is this backend's own choice (the result does not depend on it): at most CPU_MAX_BLOCK off CUDA
    T = min(chunk_size, L) if x.is_cuda else min(chunk_size, CPU_MAX_BLOCK, L)
    pad = (-L) % T

    x_ = x.to(cd)
    dt_ = effective_dt_as(dt, dt_bias, dt_softplus, dt_limit, cd)  # (b, L, H)
    B_, C_ = B.to(cd), C.to(cd)
    sidx = seq_idx
    if pad:
        # zero dt on padding: no decay and no input, so the last chunk ends with the state after token L - 1
        x_p, dt_p = F.pad(x_, (0, 0, 0, 0, 0, pad)), F.pad(dt_, (0, 0, 0, pad))
        B_, C_ = F.pad(B_, (0, 0, 0, 0, 0, pad)), F.pad(C_, (0, 0, 0, 0, 0, pad))
        if sidx is not None:
            sidx = torch.cat([sidx, sidx[:, -1:].expand(b, pad)], dim=1)  # padding joins the last document
    else:
        x_p, dt_p = x_, dt_
    h0 = None if initial_state is None else initial_state.to(cd)
    y, h_last = _SSDTorchFunction.apply(x_p.contiguous(), dt_p.contiguous(), A.to(cd), B_.contiguous(), C_.contiguous(),
                                  None if D is None else D.to(cd),
                                  h0, T, None if sidx is None else sidx.contiguous(), return_final_state)
    if pad:
        y = y[:, :L]
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, h_last.to(final_state_dtype(x.dtype))
