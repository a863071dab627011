"""PyTorch selective scan in checkpoint intervals (Mamba-1 "S6"): linear in seqlen, hand-written backward.

Shapes (legend): b batch, l seqlen, d dim (channels), g ngroups, e = d // g channels per group,
n dstate, t steps of one checkpoint interval (<= checkpoint_interval), c number of intervals.

Math (see README.md; Gu & Dao 2023, Sec. 3.2):
    dt'_t = softplus(dt_t + dt_bias)  (or dt_t + dt_bias)
    a_t = exp(dt'_t * A)   u_t = dt'_t x_t B_t   h_t = a_t h_{t-1} + u_t   y_t = <C_t, h_t> + D x_t,  y *= silu(z)

How it runs (the "torch" backend, CPU and GPU):
  * Layout. Inputs are copied once to time-major (l, b, ...) so that the state of one token,
    (b, g, n, e) with the channel axis innermost, is one contiguous slice: the per-step update is a
    single fused `addcmul_` over a contiguous block, and the reductions over channels / states are
    batched matrix products with contiguous rows.
  * Checkpoint intervals of `checkpoint_interval` steps. Per interval the decays a (t, b, g, n, e) and
    inputs u come from two broadcast products (plus one exp2), the recurrence runs step by step inside
    the interval, and y is one bmm. Interval tensors stay a few MB (cache-sized) and are reused from
    interval to interval.
  * Backward by recomputation. The forward keeps only the state entering each interval, (c, b, g, n, e):
    1 / checkpoint_interval of the (b, l, d, n) tensor that autograd over the loop would keep. The backward
    walks the intervals in reverse, recomputes a and h of one interval from its entry state, runs the adjoint
    recurrence  gh_t = C_t gy_t + a_{t+1} gh_{t+1}  and reduces every gradient interval by interval.
  * Numerics: everything in float32 (float64 for float64 inputs) whatever the input dtype.
  * Complex A (S4D-style, y = 2 Re <C, h>) takes `_complex_scan`: the same recurrence by checkpoint intervals,
    written with plain torch ops, each interval recomputed in the backward (activation checkpointing), so that
    torch autograd derives the complex backward while only interval-entry states are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...deprecation import renamed_argument
from ..common import LOG2E, compute_dtype, write_into
from .reference import final_state_dtype

__all__ = ["selective_scan_torch", "default_checkpoint_interval"]


@dataclass
class _Prepared:
    """The op's inputs in compute dtype and time-major layout (what both passes share)."""

    x: torch.Tensor  # (l, b, d)
    dt: torch.Tensor  # (l, b, d) dt' after bias and softplus
    dt_raw: torch.Tensor  # (l, b, d) dt + dt_bias (before softplus; dt itself without softplus)
    dtx: torch.Tensor  # (l, b, d) dt' * x
    B: torch.Tensor  # (l, b, g, n)
    C: torch.Tensor  # (l, b, g, n)
    A: torch.Tensor  # (g, n, e)
    A_log2: torch.Tensor  # (g, n, e) A * log2(e): exp2 is about twice as cheap as exp on CPU
    keep: torch.Tensor | None  # (l, b) 0.0 where seq_idx changes (state restarts), else 1.0

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        l, b, _ = self.x.shape
        g, n, e = self.A.shape
        return l, b, g, n, e


def default_checkpoint_interval(batch: int, dim: int, dstate: int) -> int:
    """Steps per interval, chosen by measurement (README.md, "Checkpoint interval").

    An interval tensor (t, batch, dim, dstate) of about 2^20 elements (4 MB in float32) was fastest on a
    2-core AVX2 machine: larger ones fall out of cache, smaller ones pay more per-interval op launches.
    Clamped to [8, 64]: at least 8 keeps the saved interval-entry states at <= 1/8 of the full
    (batch, seqlen, dim, dstate) tensor, at most 64 bounds the interval buffers for tiny shapes.
    """
    per_step = max(1, batch * dim * dstate)
    return int(min(64, max(8, 2 ** round(math.log2(2**20 / per_step)))))


def _time_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, l, ...) -> contiguous (l, b, ...) in `dtype`, in one copy."""
    out = torch.empty((t.shape[1], t.shape[0]) + tuple(t.shape[2:]), dtype=dtype, device=t.device)
    return out.copy_(t.transpose(0, 1))


def _keep_mask(seq_idx: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(b, l) seq_idx -> (l, b) multiplier of h_{t-1}: 0 where a new document starts at t > 0."""
    if seq_idx is None:
        return None
    keep = torch.ones(seq_idx.shape[1], seq_idx.shape[0], dtype=dtype, device=seq_idx.device)
    keep[1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).t()
    return keep


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus, seq_idx) -> _Prepared:
    cdt = compute_dtype(x.dtype)
    if dt_bias is None:
        dt_raw = _time_major(dt, cdt)  # (l, b, d)
    else:  # the bias add doubles as the layout copy
        dt_raw = torch.empty(dt.shape[1], dt.shape[0], dt.shape[2], dtype=cdt, device=dt.device)
        write_into(dt_raw, torch.add, dt.transpose(0, 1), dt_bias.to(cdt))
    dt_ = dt_raw
    if dt_softplus:
        dt_ = F.softplus(dt_raw)
    return _prepared_from(_time_major(x, cdt), dt_, dt_raw, _time_major(B, cdt), _time_major(C, cdt), A, seq_idx)


def _prepared_from(x_, dt_, dt_raw, B_, C_, A, seq_idx) -> _Prepared:
    """Assemble the shared inputs from time-major x, dt', B, C (what the forward saves for the backward)."""
    g, n = B_.shape[2], B_.shape[3]
    A_gne = A.to(x_.dtype).reshape(g, A.shape[0] // g, n).transpose(1, 2).contiguous()  # (g, n, e)
    return _Prepared(x=x_, dt=dt_, dt_raw=dt_raw, dtx=dt_ * x_, B=B_, C=C_, A=A_gne, A_log2=A_gne * LOG2E,
                     keep=_keep_mask(seq_idx, x_.dtype))


def _batch_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(l, b, ...) -> contiguous (b, l, ...) in `dtype`, in one copy (gradients go back in the inputs' layout)."""
    out = torch.empty((t.shape[1], t.shape[0]) + tuple(t.shape[2:]), dtype=dtype, device=t.device)
    return out.copy_(t.transpose(0, 1))


def _state_to_gne(state: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, d, n) -> contiguous (b, g, n, e) in `dtype`."""
    b, d, n = state.shape
    return state.to(dtype).reshape(b, g, d // g, n).transpose(2, 3).contiguous()


def _state_from_gne(state: torch.Tensor) -> torch.Tensor:
    """(b, g, n, e) -> contiguous (b, d, n)."""
    b, g, n, e = state.shape
    return state.transpose(2, 3).reshape(b, g * e, n)


def _interval_decay(p: _Prepared, c0: int, c1: int, out: torch.Tensor) -> torch.Tensor:
    """a = exp(dt' A) for steps c0..c1 into out (t, b, g, n, e), zeroed where a document starts."""
    _, b, g, _, e = p.sizes
    t = c1 - c0
    write_into(out, torch.mul, p.dt[c0:c1].view(t, b, g, 1, e), p.A_log2)
    out.exp2_()
    if p.keep is not None:
        # a_t = 0 cuts h_{t-1} out of h_t and, in the backward, the gradient flowing back across it
        out.mul_(p.keep[c0:c1].view(t, b, 1, 1, 1))
    return out


def _interval_input(p: _Prepared, c0: int, c1: int, out: torch.Tensor) -> torch.Tensor:
    """u = dt' x B for steps c0..c1 into out (t, b, g, n, e)."""
    _, b, g, n, e = p.sizes
    t = c1 - c0
    return write_into(out, torch.mul, p.dtx[c0:c1].view(t, b, g, 1, e), p.B[c0:c1].view(t, b, g, n, 1))


def _scan_forward(p: _Prepared, h0: torch.Tensor | None, interval: int,
                  states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence interval by interval.

    Args:
        h0: (b, g, n, e) state before the first token, or None for zeros.
        states: (c, b, g, n, e) receives the state entering each interval (for the backward), or None.
    Returns:
        y (l, b, d) = <C_t, h_t> in compute dtype, and the final state (b, g, n, e).
    """
    l, b, g, n, e = p.sizes
    T = min(interval, l)
    opts = dict(dtype=p.x.dtype, device=p.x.device)
    a_buf = torch.empty(T, b, g, n, e, **opts)
    h_buf = torch.empty(T, b, g, n, e, **opts)
    carry = torch.empty(b, g, n, e, **opts) if states is None else None
    a_steps, h_steps = a_buf.unbind(0), h_buf.unbind(0)  # views made once: Python cost per step matters
    y = torch.empty(l, b, g * e, **opts)
    prev = h0
    for ci, c0 in enumerate(range(0, l, T)):
        c1 = min(c0 + T, l)
        t = c1 - c0
        if states is not None:
            if prev is None:
                states[ci].zero_()  # no initial state: the first interval starts from zeros (skip a*0 below)
            else:
                prev = states[ci].copy_(prev)
        elif prev is not None and ci > 0:
            prev = carry.copy_(prev)  # the last slice of h_buf is about to be overwritten
        _interval_decay(p, c0, c1, a_buf[:t])
        h = _interval_input(p, c0, c1, h_buf[:t])
        for s in range(t):
            if prev is not None:
                h_steps[s].addcmul_(a_steps[s], prev)
            prev = h_steps[s]
        rows = t * b * g
        write_into(y[c0:c1].view(rows, 1, e), torch.bmm, p.C[c0:c1].view(rows, 1, n), h.view(rows, n, e))
    return y, prev.clone()


def _scan_backward(p: _Prepared, states: torch.Tensor, gy: torch.Tensor, g_final: torch.Tensor | None,
                   interval: int, need_B: bool, need_C: bool):
    """Gradients of sum(gy * <C, h>) + sum(g_final * h_last) through the recurrence.

    Args:
        states: (c, b, g, n, e) interval-entry states from the forward.
        gy: (l, b, d) upstream gradient of <C_t, h_t>.   g_final: (b, g, n, e) or None.
    Returns:
        gdtx (l, b, d) w.r.t. dt' x; gdt_decay w.r.t. dt' through the decay, an (l, b, d) view of
        batch-major (b, l, d) memory (it becomes dt's gradient without a layout copy); gA (g, n, e);
        gB, gC (l, b, g, n) or None, gh0 (b, g, n, e) w.r.t. the state before the first token.
    """
    l, b, g, n, e = p.sizes
    T = min(interval, l)
    opts = dict(dtype=p.x.dtype, device=p.x.device)
    a_buf = torch.empty(T, b, g, n, e, **opts)
    h_buf = torch.empty(T + 1, b, g, n, e, **opts)  # h_buf[s] = h_{s-1}: the entry state, then h
    gh_buf = torch.empty(T, b, g, n, e, **opts)
    carry = torch.empty(b, g, n, e, **opts)
    a_steps, h_steps, gh_steps = a_buf.unbind(0), h_buf.unbind(0), gh_buf.unbind(0)
    gdtx = torch.empty(l, b, g * e, **opts)
    gdt_decay = torch.empty(b, l, g * e, **opts).transpose(0, 1)
    gB = torch.empty(l, b, g, n, **opts) if need_B else None
    gC = torch.empty(l, b, g, n, **opts) if need_C else None
    gA = torch.zeros(g, n, e, **opts)
    gA_part = torch.empty(g, n, e, **opts)
    g_next = g_final
    nintervals = (l + T - 1) // T
    for ci in range(nintervals - 1, -1, -1):
        c0 = ci * T
        c1 = min(c0 + T, l)
        t = c1 - c0
        rows = t * b * g
        # recompute the interval's forward from its entry state
        a = _interval_decay(p, c0, c1, a_buf[:t])
        h_buf[0].copy_(states[ci])
        h = _interval_input(p, c0, c1, h_buf[1:t + 1])
        for s in range(t):
            h_steps[s + 1].addcmul_(a_steps[s], h_steps[s])
        gy_rows = gy[c0:c1].view(rows, 1, e)
        if need_C:  # gC_t = sum over channels of gy_t h_t
            write_into(gC[c0:c1].view(rows, 1, n), torch.bmm, gy_rows, h.view(rows, n, e).transpose(1, 2))
        # adjoint recurrence, in place: gh_t = C_t gy_t + a_{t+1} gh_{t+1}
        gh = write_into(gh_buf[:t], torch.mul, gy[c0:c1].view(t, b, g, 1, e), p.C[c0:c1].view(t, b, g, n, 1))
        if g_next is not None:
            gh_steps[t - 1].add_(g_next)
        for s in range(t - 2, -1, -1):
            gh_steps[s].addcmul_(a_steps[s + 1], gh_steps[s + 1])
        g_next = write_into(carry, torch.mul, a_steps[0], gh_steps[0])  # gradient of the interval's entry state
        if need_B:  # gB_t = sum over channels of gh_t dt'_t x_t
            write_into(gB[c0:c1].view(rows, 1, n), torch.bmm, p.dtx[c0:c1].view(rows, 1, e),
                       gh.view(rows, n, e).transpose(1, 2))
        write_into(gdtx[c0:c1].view(rows, 1, e), torch.bmm, p.B[c0:c1].view(rows, 1, n), gh.view(rows, n, e))
        # q = d loss / d (dt' A) = gh_t * a_t * h_{t-1}; then gA = sum_t q dt', gdt' += sum_n q A
        q = a.mul_(gh).mul_(h_buf[:t])
        q_dt = write_into(h_buf[1:t + 1], torch.mul, q, p.dt[c0:c1].view(t, b, g, 1, e))
        gA.add_(write_into(gA_part, torch.sum, q_dt.view(t * b, g, n, e), dim=0))
        write_into(gdt_decay[c0:c1].view(t, b, g, e), torch.sum, q.mul_(p.A), dim=3)
    return gdtx, gdt_decay, gA, gB, gC, g_next


def _finish(p: _Prepared, y_ssm: torch.Tensor, D, z, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """y = (<C, h> + D x) * silu(z) in (b, l, d) out_dtype; also returns the pre-gate (l, b, d) value."""
    if D is not None:
        y_ssm.addcmul_(p.x, D.to(y_ssm.dtype))
    l, b, d = y_ssm.shape
    y = torch.empty(b, l, d, dtype=out_dtype, device=y_ssm.device)
    if z is None:
        y.copy_(y_ssm.transpose(0, 1))
    else:
        write_into(y, torch.mul, y_ssm.transpose(0, 1), F.silu(z.to(y_ssm.dtype)))
    return y, y_ssm


class _SelectiveScanTorchFunction(torch.autograd.Function):
    """Real A: forward keeps interval-entry states only; backward recomputes interval by interval."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, seq_idx, interval):
        p = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, seq_idx)
        l, b, g, n, e = p.sizes
        T = min(interval, l)
        states = torch.empty((l + T - 1) // T, b, g, n, e, dtype=p.x.dtype, device=x.device)
        h0 = None if initial_state is None else _state_to_gne(initial_state, g, p.x.dtype)
        y_ssm, h_last = _scan_forward(p, h0, T, states)
        y, y_pre = _finish(p, y_ssm, D, z, x.dtype)
        ctx.set_materialize_grads(False)
        ctx.dt_softplus, ctx.interval = dt_softplus, T
        ctx.dtypes = [None if t is None else t.dtype for t in (x, dt, B, C, dt_bias, initial_state)]
        # time-major compute-dtype copies, so that the backward redoes neither layout changes nor softplus
        ctx.save_for_backward(p.x, p.dt, p.dt_raw if dt_softplus else None, A, p.B, p.C, D, z, seq_idx, states,
                              y_pre if z is not None else None)
        return y, _state_from_gne(h_last)

    @staticmethod
    def backward(ctx, gout, gfinal):
        x_, dt_, dt_raw, A, B_, C_, D, z, seq_idx, states, y_pre = ctx.saved_tensors
        x_dtype, dt_dtype, B_dtype, C_dtype, dt_bias_dtype, h0_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        p = _prepared_from(x_, dt_, dt_raw, B_, C_, A, seq_idx)
        g = p.sizes[2]
        cdt = p.x.dtype
        # gy: gradient w.r.t. the pre-gate output, time-major (the interval bmm operands need it contiguous).
        # Elementwise work below mixes (l, b, d) tensors with transposed (b, l, d) views instead of
        # copying layouts: every avoided 8 MB temporary saves its page faults as well as a pass.
        gy = torch.zeros_like(p.x) if gout is None else _time_major(gout, cdt)  # None: only the state is used
        gz = None
        if z is not None:
            z_c = z.to(cdt)  # (b, l, d); may be z itself: not modified
            sz = torch.sigmoid(z_c)
            silu = z_c * sz
            if need[6]:  # d silu / dz = s + silu (1 - s); gz = gout * y_pre * silu', built in sz's memory
                gz = sz.addcmul_(silu, sz, value=-1).add_(silu).mul_(y_pre.transpose(0, 1)).mul_(gy.transpose(0, 1))
            gy.mul_(silu.transpose(0, 1))
        g_final = None if gfinal is None else _state_to_gne(gfinal, g, cdt)
        gdtx, gdt, gA, gB, gC, gh0 = _scan_backward(p, states, gy, g_final, ctx.interval, need[3], need[4])
        scratch = p.dtx  # (l, b, d), free once the scan's backward is done
        gdt.addcmul_(gdtx, p.x)  # d loss / d dt', in batch-major memory
        if ctx.dt_softplus:
            gdt.mul_(write_into(scratch, torch.sigmoid, dt_raw))  # softplus' = sigmoid
        gx = gdtx.mul_(p.dt)  # gdtx is not needed any more
        if D is not None:
            gx.addcmul_(gy, D.to(cdt))
        gD = write_into(scratch, torch.mul, gy, p.x).sum((0, 1)) if need[5] else None
        gdt = gdt.transpose(0, 1)  # (b, l, d), contiguous
        return (
            _batch_major(gx, x_dtype) if need[0] else None,
            gdt.to(dt_dtype) if need[1] else None,
            gA.transpose(1, 2).reshape(A.shape).to(A.dtype) if need[2] else None,
            _batch_major(gB, B_dtype) if need[3] else None,
            _batch_major(gC, C_dtype) if need[4] else None,
            gD.to(D.dtype) if need[5] else None,
            gz.to(z.dtype) if need[6] else None,
            gdt.sum((0, 1)).to(dt_bias_dtype) if need[7] else None,
            _state_from_gne(gh0).to(h0_dtype) if need[8] else None,
            None, None, None,
        )


def _complex_interval(h0, dt_c, x_c, B_c, C_c, keep_c, A, y_scale):
    """One interval of the recurrence in plain torch ops (autograd derives the complex backward).

    h0 (b, d, n) complex; dt_c, x_c (t, b, d); B_c, C_c (t, b, g, n); keep_c (t, b) or None.
    Returns y (t, b, d) real and the last state (b, d, n).
    """
    e = x_c.shape[2] // B_c.shape[2]
    B_c, C_c = B_c.repeat_interleave(e, dim=2), C_c.repeat_interleave(e, dim=2)  # channel d reads group d // e
    a = torch.exp(dt_c[..., None] * A)  # (t, b, d, n)
    if keep_c is not None:
        a = a * keep_c[:, :, None, None]
    u = (dt_c * x_c)[..., None] * B_c
    h = h0
    ys = []
    for s in range(a.shape[0]):
        h = a[s] * h + u[s]
        ys.append((h * C_c[s]).sum(-1).real)
    return y_scale * torch.stack(ys), h


class _ComplexScanIntervalTorchFunction(torch.autograd.Function):
    """An interval that keeps only its inputs (views of the whole-sequence tensors, and its entry state);
    the backward reruns it under autograd. torch.utils.checkpoint does the same, but its first call
    imports torch._dynamo, which costs seconds."""

    @staticmethod
    def forward(ctx, h0, dt_c, x_c, B_c, C_c, keep_c, A, y_scale):
        ctx.y_scale = y_scale
        ctx.save_for_backward(h0, dt_c, x_c, B_c, C_c, keep_c, A)
        return _complex_interval(h0, dt_c, x_c, B_c, C_c, keep_c, A, y_scale)

    @staticmethod
    def backward(ctx, gy, gh):
        need = ctx.needs_input_grad
        with torch.enable_grad():
            inputs = [None if t is None else t.detach().requires_grad_(r) for t, r in zip(ctx.saved_tensors, need)]
            y, h = _complex_interval(*inputs, ctx.y_scale)
            wrt = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((y, h), wrt, (gy, gh), allow_unused=True))
        return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs) + (None,)


def _complex_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state, seq_idx, interval):
    """Complex A (or complex B / C): recurrence in checkpoint intervals, each interval recomputed in the backward.

    Memory kept for the backward: the entry state of each interval plus (l, b, d)-sized inputs.
    """
    real = compute_dtype(x.dtype)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    batch, seqlen, dim = x.shape
    n = A.shape[1]
    dt_ = dt.to(real) if dt_bias is None else dt.to(real) + dt_bias.to(real)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    dt_, x_ = dt_.transpose(0, 1), x.to(real).transpose(0, 1)  # (l, b, d)
    B_ = B.to(cplx if B.is_complex() else real).transpose(0, 1)  # (l, b, g, n)
    C_ = C.to(cplx if C.is_complex() else real).transpose(0, 1)
    keep = _keep_mask(seq_idx, real)
    A_ = A.to(cplx)
    h = torch.zeros(batch, dim, n, dtype=cplx, device=x.device)
    if initial_state is not None:
        h = h + initial_state.to(cplx)
    y_scale = 2.0 if A.is_complex() else 1.0  # conjugate-pair convention of S4D (reference.py)
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, dt_bias, initial_state))
    ys = []
    for c0 in range(0, seqlen, interval):
        c1 = min(c0 + interval, seqlen)
        args = (h, dt_[c0:c1], x_[c0:c1], B_[c0:c1], C_[c0:c1], None if keep is None else keep[c0:c1], A_, y_scale)
        y_c, h = _ComplexScanIntervalTorchFunction.apply(*args) if track else _complex_interval(*args)
        ys.append(y_c)
    y = torch.cat(ys).transpose(0, 1)  # (b, l, d)
    if D is not None:
        y = y + D.to(real) * x.to(real)
    if z is not None:
        y = y * F.silu(z.to(real))
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final = h if A.is_complex() else h.real  # a real A keeps a real state (as the reference does)
    return y, final.to(final_state_dtype(x.dtype, A.is_complex()))


def selective_scan_torch(
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
    *,
    checkpoint_interval: int | None = None,
    chunk_len: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan in PyTorch by checkpoint intervals; same semantics as `selective_scan_reference` (validated
    inputs).

    Args:
        x, dt, z: (batch, seqlen, dim).   A: (dim, dstate), real or complex.
        B, C: (batch, seqlen, ngroups, dstate).   D, dt_bias: (dim,).
        initial_state: (batch, dim, dstate).   seq_idx: (batch, seqlen) nondecreasing ints.
        checkpoint_interval: steps between the states kept for the backward (the former `chunk_len`, still
            accepted with a DeprecationWarning), None for `default_checkpoint_interval` (speed / memory
            trade-off only: results do not depend on it beyond rounding).
    Returns:
        y (batch, seqlen, dim) in x's dtype, and the final (batch, dim, dstate) state when asked
        (float32, float64 for float64 inputs, complex for complex A).

    Example:
        >>> x, dt = torch.randn(2, 64, 32), torch.rand(2, 64, 32)
        >>> A, B, C = -torch.rand(32, 16), torch.randn(2, 64, 1, 16), torch.randn(2, 64, 1, 16)
        >>> y, h = selective_scan_torch(x, dt, A, B, C, return_final_state=True)  # (2, 64, 32), (2, 32, 16)
    """
    interval = renamed_argument("selective_scan_torch", "chunk_len", "checkpoint_interval", chunk_len,
                                checkpoint_interval)
    if interval is None:
        interval = default_checkpoint_interval(x.shape[0], x.shape[2], A.shape[1])
    if interval < 1:
        raise ValueError(f"selective_scan_torch: checkpoint_interval must be >= 1, got {interval}")
    if x.shape[1] == 0:  # empty sequence: nothing to scan, the state passes through
        y = torch.empty_like(x)
        state = initial_state if initial_state is not None else x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
        return (y, state.to(final_state_dtype(x.dtype, A.is_complex()), copy=True)) if return_final_state else y
    if A.is_complex() or B.is_complex() or C.is_complex():
        return _complex_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state,
                             seq_idx, interval)
    tracked = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked):
        y, h_last = _SelectiveScanTorchFunction.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus,
                                                      seq_idx, interval)
        return (y, h_last) if return_final_state else y
    # inference: no interval-entry states to keep
    p = _prepare(x, dt, A, B, C, dt_bias, dt_softplus, seq_idx)
    g = p.sizes[2]
    h0 = None if initial_state is None else _state_to_gne(initial_state, g, p.x.dtype)
    y_ssm, h_last = _scan_forward(p, h0, interval)
    y, _ = _finish(p, y_ssm, D, z, x.dtype)
    return (y, _state_from_gne(h_last)) if return_final_state else y
