"""The selective scan's backward with time inside the tile: the "chunked" backward variant (Mamba-1 "S6").

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate, T = CHUNK the checkpoint interval.

`scan_bwd_kernel` (triton_scan_bwd.py) walks time one step at a time with all N states of BD channels in registers:
every step is a dependent link of a chain, and the per-(step, channel) work (loads, softplus, the gate) is done by
each of the lanes that share a channel. Here a program holds a (T, BD) tile of one checkpoint interval instead:
the per-(step, channel) work is done once per element and serves all N states, and time becomes a parallel axis
through two associative scans per state over the tile's T rows:

    per interval (in reverse), per state n (unrolled):
        a_t  = exp(dt'_t A_n)                  h_t = a_t h_{t-1} + dt'_t B_tn x_t      forward scan, from the
                                                                                        interval's checkpoint
        a'_t = a_{t+1} (1 past the interval)   g_t = C_tn dy_t + a'_t g_{t+1}          reverse scan, from the
                                                                                        carry a_{t1} g_{t1} of
                                                                                        the interval after it
        dC_tn += sum_d dy h, dB_tn += sum_d g dt' x (float32 atomics), dA_n += sum_t g (h_t - b_t) dt'
        S1 += g B_n, S2 += g (h_t - b_t) A_n, y += C_n h                            (T, BD) accumulators
    then dx = dt' S1 + D dy, ddt = (x S1 + S2) sigma(v), dz from y, per element.

g (h_t - b_t) is g a_t h_{t-1} without a shifted tile: only a'_t needs the next step's dt', loaded as the tile one
row down. Both recurrences are affine maps, composed by `_affine` (associative), so `tl.associative_scan` runs them;
the entering state h_{t0-1} and the entering carry apply to the scanned (product, sum) pairs afterwards.
A time-parallel launch (SEGMENTED) takes the carry entering each segment from the adjoint-only pass, as the
default backward does (`scan_bwd_carry_kernel` + the segment combine).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_launch import fast_launch
from ..triton_math import LOG2E, dt_softplus_sigmoid, fast_sigmoid
from .triton_scan_tile import time_offset

__all__ = ["scan_bwd_chunked_kernel"]

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _affine(p1, s1, p2, s2):
    """Compose v -> p1 v + s1, then v -> p2 v + s2 (the scan's combine; associative)."""
    return p1 * p2, s1 * p2 + s2


@fast_launch
@triton.jit
def scan_bwd_chunked_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, seq_ptr, hck_ptr, dy_ptr, dhlast_ptr, cin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr, cbuf_ptr,
    seqlen, dim, group_size, nchunks, seg_len, nseg, cin_n, cin_k, rep_stride,
    s_b, s_t, s_zb, s_zt, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_yb, s_yt, s_dzb, s_dzt,
    NREP: tl.constexpr, CHUNK: tl.constexpr, BD: tl.constexpr, DSTATE: tl.constexpr, ACC: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_DHLAST: tl.constexpr, WANT_DH0: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
    SEGMENTED: tl.constexpr, DZ_AT: tl.constexpr,
):
    """Backward of time segment pid_c (the whole sequence when nseg == 1) for BD channels of batch row pid_b,
    checkpoint intervals in reverse; the arguments are `scan_bwd_kernel`'s, less its scratch and tiling knobs.
    dB / dC: (NREP, B, L, G, N) float32 replicas (program pid_d adds into replica pid_d % NREP).
    cbuf: (programs, N, BD) float32, each program's carries between intervals. In registers a (BD,) vector per state
    would cost a register per channel a thread covers (8 in the tile's layout: 128 for 16 states), and spill."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    dl = tl.arange(0, BD)
    d = pid_d * BD + dl  # (BD,)
    d2 = d[None, :]
    tr = tl.arange(0, CHUNK)
    ngroups = dim // group_size
    g = (pid_d * BD) // group_size
    s_gn = ngroups * DSTATE
    bias = tl.load(bias_ptr + d2).to(ACC) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + d2).to(ACC) if HAS_D else 0.0
    x_b = x_ptr + pid_b * s_b
    dt_b = dt_ptr + pid_b * s_b
    dx_b = dx_ptr + pid_b * s_b
    ddt_b = ddt_ptr + pid_b * s_b
    dz_b = dz_ptr + pid_b * s_dzb
    z_b = z_ptr + pid_b * s_zb
    dy_b = dy_ptr + pid_b * s_yb
    B_b = B_ptr + pid_b * s_Bb + g * s_Bg
    C_b = C_ptr + pid_b * s_Bb + g * s_Bg
    seq_b = seq_ptr + pid_b * s_sb
    rep = (pid_d % NREP).to(tl.int64) * rep_stride
    row0 = (pid_b * seqlen * ngroups + g) * DSTATE  # (b, t=0, g) of a replica
    dB_b = dB_ptr + (rep + row0)
    dC_b = dC_ptr + (rep + row0)
    st_off = (pid_b * dim + d) * DSTATE  # (b, d, n=0) of a (B, D, N) state
    prog = (pid_b * nseg + pid_c) * tl.num_programs(0) + pid_d
    cb = cbuf_ptr + prog * (DSTATE * BD) + dl  # carry of state n at cb + n * BD
    if SEGMENTED:
        # carry segments are cin_k times finer (reversed order): the one entering this segment's last step is
        # the carry-in of sub-segment (pid_c + 1) cin_k - 1, stored at cin_n - (pid_c + 1) cin_k (0: last)
        r = tl.maximum(cin_n - (pid_c + 1) * cin_k, 0)
        cin_b = cin_ptr + ((pid_b * cin_n + r) * dim + d) * DSTATE
    # the carry entering the segment's last step, per state
    for n in tl.static_range(DSTATE):
        if SEGMENTED:
            carry = tl.load(cin_b + n).to(ACC)
        elif HAS_DHLAST:
            carry = tl.load(dhlast_ptr + (st_off + n)).to(ACC)
        else:
            carry = tl.zeros((BD,), dtype=ACC)
        tl.store(cb + n * BD, carry)
    dD_acc = tl.zeros((BD,), dtype=ACC)
    dbias_acc = tl.zeros((BD,), dtype=ACC)
    c_lo = pid_c * (seg_len // CHUNK)
    c_hi = tl.minimum(c_lo + seg_len // CHUNK, nchunks)
    for ci in range(0, c_hi - c_lo):
        c = c_hi - 1 - ci
        t0 = c * CHUNK
        tn = tl.minimum(t0 + CHUNK, seqlen)
        t = t0 + tr  # (T,)
        t2 = t[:, None]
        ok_t = t < tn
        ok = (t2 < tn) & (d2 >= 0)  # (T, BD): full-shape masks (the interpreter wants them)
        nxt = (t2 + 1 < tn) & (d2 >= 0)  # a step after this one inside the interval
        to = time_offset(t2, I64)
        xo = to * s_t + d2
        x = tl.load(x_b + xo, mask=ok, other=0.0).to(ACC)
        delta, sig = dt_softplus_sigmoid(tl.load(dt_b + xo, mask=ok, other=0.0).to(ACC), bias, HAS_BIAS, SOFTPLUS,
                                         LIBDEVICE)
        delta = tl.where(ok, delta, 0.0)
        # dt' of the step after (a'_t = a_{t+1}): the same tile one row down
        delta_n, _ = dt_softplus_sigmoid(tl.load(dt_b + (xo + s_t), mask=nxt, other=0.0).to(ACC), bias, HAS_BIAS,
                                         SOFTPLUS, LIBDEVICE)
        dout = tl.load(dy_b + (to * s_yt + d2), mask=ok, other=0.0).to(ACC)
        if HAS_Z:
            zo = to * s_zt + d2
            zf = tl.load(z_b + zo, mask=ok, other=0.0).to(ACC)
            sz = fast_sigmoid(zf, LIBDEVICE)
            dy = dout * zf * sz
        else:
            dy = dout
        if HAS_SEQ:
            s_cur = tl.load(seq_b + time_offset(t, I64) * s_st, mask=ok_t, other=0)
            s_prev = tl.load(seq_b + time_offset(tl.maximum(t - 1, 0), I64) * s_st, mask=ok_t, other=0)
            s_next = tl.load(seq_b + time_offset(t + 1, I64) * s_st, mask=t + 1 < tn, other=0)
            keep = (s_cur == s_prev)[:, None]  # no document starts at t
            keep_n = (s_next == s_cur)[:, None]  # none starts at t + 1
        xdt = x * delta
        S1 = tl.zeros((CHUNK, BD), dtype=ACC)  # sum_n g B_n
        S2 = tl.zeros((CHUNK, BD), dtype=ACC)  # sum_n g (h - b) A_n log2(e)
        yacc = tl.zeros((CHUNK, BD), dtype=ACC)  # sum_n C_n h: the pre-gate output, recomputed
        ck = hck_ptr + ((pid_b * nchunks + c) * dim + d) * DSTATE  # the state entering the interval
        bc_t = time_offset(t, I64) * s_Bt
        dbc_t = time_offset(t, I64) * s_gn
        tl.debug_barrier()  # the carries stored by other threads
        for n in tl.static_range(DSTATE):
            A2 = (tl.load(A_ptr + (d * s_Ad + n * s_An)).to(ACC) * LOG2E)[None, :]
            Bn = tl.load(B_b + (bc_t + n), mask=ok_t, other=0.0).to(ACC)[:, None]
            Cn = tl.load(C_b + (bc_t + n), mask=ok_t, other=0.0).to(ACC)[:, None]
            a = tl.exp2(delta * A2)
            if HAS_SEQ:
                a = tl.where(keep, a, 0.0)
            b = xdt * Bn
            pf, sf = tl.associative_scan((a, b), 0, _affine)
            h = sf + pf * tl.load(ck + n).to(ACC)[None, :]
            yacc += Cn * h
            tl.atomic_add(dC_b + (dbc_t + n), tl.sum(dy * h, axis=1), mask=ok_t, sem="relaxed")
            an = tl.exp2(delta_n * A2)
            if HAS_SEQ:
                an = tl.where(keep_n, an, 0.0)
            an = tl.where(nxt, an, 1.0)  # the interval's last step: the carry already holds a_{t+1}
            pr, sr = tl.associative_scan((an, Cn * dy), 0, _affine, reverse=True)
            gt = sr + pr * tl.load(cb + n * BD)[None, :]  # dL/dh_t
            S1 += gt * Bn
            q = gt * (h - b)  # g_t a_t h_{t-1}
            S2 += q * A2
            tl.atomic_add(dA_ptr + (d * DSTATE + n), tl.sum(q * delta, axis=0), sem="relaxed")
            tl.atomic_add(dB_b + (dbc_t + n), tl.sum(gt * xdt, axis=1), mask=ok_t, sem="relaxed")
            # the carry into the interval before: a_{t0} g_{t0}
            tl.store(cb + n * BD, tl.sum(tl.where(t2 == t0, a * gt, 0.0), axis=0))
        if HAS_Z:
            y = yacc + Dv * x if HAS_D else yacc
            dzo = xo if DZ_AT == 0 else zo if DZ_AT == 1 else to * s_dzt + d2
            tl.store(dz_b + dzo, (dout * y * sz * (1.0 + zf * (1.0 - sz))).to(dz_b.dtype.element_ty), mask=ok)
        dx = delta * S1
        if HAS_D:
            dx += Dv * dy
            dD_acc += tl.sum(dy * x, axis=0)
        tl.store(dx_b + xo, dx.to(dx_b.dtype.element_ty), mask=ok)
        ddt = x * S1 + S2 * LN2
        if SOFTPLUS:
            ddt = ddt * sig
        ddt = tl.where(ok, ddt, 0.0)
        tl.store(ddt_b + xo, ddt.to(ddt_b.dtype.element_ty), mask=ok)
        dbias_acc += tl.sum(ddt, axis=0)
    if WANT_DH0:
        tl.debug_barrier()
        for n in tl.static_range(DSTATE):
            tl.store(dh0_ptr + (st_off + n), tl.load(cb + n * BD), mask=d * 0 + pid_c == 0)
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias_acc, sem="relaxed")
