"""The selective scan's backward with states outside the tile: the "chunked" backward variant (Mamba-1 "S6").

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate; CHUNK the checkpoint interval, SUB the block.

`scan_bwd_kernel` (triton_scan_bwd.py) holds all N states of a few channels per step, (NL, NH, BD) in registers, and
walks time: its per-(step, channel) work (loads, softplus, the gate, dx / ddt / dz) is repeated by the NH lanes that
share a channel, and its sums over the states (y, sum_n g B, sum_n g a h A) are shuffles. Here a program is one warp
over BD = 32 channels, a lane per channel, and holds SUB steps (a block, a tuple of SUB rows) in registers; the states
are the loop:

    per checkpoint interval (in reverse):
        forward pass (SUB < CHUNK): from the interval's checkpoint through all blocks but the last, per state, keeping
            the state entering each block (a per-program buffer)
        per block (in reverse): the rows' dt' x, dt' = softplus(dt + bias), dy (gated), once per (step, channel)
            per state n:
                forward from the block's entering state: a_t = exp(dt'_t A_n), h_t = a_t h_{t-1} + dt'_t B_tn x_t,
                    y_t += C_tn h_t,   dC_tn += sum_d dy_t h_t
                reverse from the carry a_{t+1} g_{t+1} of the step after the block:  g_t = C_tn dy_t + carry,
                    S1_t += g_t B_tn,   S2_t += g_t a_t h_{t-1} A_n,   dA_n += g_t a_t h_{t-1} dt'_t,
                    dB_tn += sum_d g_t dt'_t x_t,   carry = a_t g_t
            then per (step, channel): dz from y, dx = dt' S1 + D dy, ddt = (x S1 + S2) sigma (x, z, sigma loaded again)

so the per-(step, channel) work is done once for all N states, the sums over the states are register adds, and the
sums over channels (dB, dC) are warp reductions per (step, state) over groups of RED_CH lanes, each group's added by a
float32 atomic into its replica. Each lane keeps its own channel's carry, dA_n and block states in the per-program
buffer (the state loop is a runtime loop: one body, not N unrolled copies), so no barrier is needed. A time-parallel
launch (SEGMENTED) takes the carry entering each segment from the adjoint-only pass, as the default backward does.
TRANSPOSED (variant "chunked-t") sums a block's SUB rows of dB / dC over the warp at once (`_transposed_sum`: a
reduce-scatter, then one atomic for the block's rows) instead of one warp sum and one atomic per row. A whole block
(every block but a ragged last one; all of them when SUB divides seqlen, EVEN_T) runs copies of the block's code
without masks or clamped steps, its B / C at constant offsets (the row stride S_BT is a constexpr).
The variants (scan_policy.BWD_VARIANTS, "chunked*") and their static counts: docs/design/triton_selective_scan.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_launch import fast_launch
from ..triton_math import LOG2E, dt_softplus_sigmoid, fast_sigmoid, lane_xor
from .triton_scan_tile import entering_carry_index, time_offset

__all__ = ["scan_bwd_chunked_kernel"]

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _group_sum(v, BD: tl.constexpr, RED_CH: tl.constexpr):
    """(BD,) -> (BD / RED_CH,): the sums over groups of RED_CH consecutive lanes (warp shuffles)."""
    return tl.sum(tl.reshape(v, (BD // RED_CH, RED_CH)), axis=1)


@triton.jit
def _transposed_sum(vals, dl, BD: tl.constexpr, SUB: tl.constexpr, PTX: tl.constexpr):
    """SUB rows of (BD,) -> (BD,): lane l holds the sum over all BD lanes of row l // (BD / SUB) (SUB and BD powers of
    two, SUB <= BD). A reduce-scatter first: each of log2(SUB) stages pairs the rows' halves, every lane sends the half
    it gives up to its partner across the stage's lane bit and adds the one it receives to the half it keeps (one
    shuffle per pair, not one per row); then log2(BD / SUB) butterfly levels on the one row left. 4 shuffles and adds
    per row at SUB 8 of BD 32 where a warp sum per row takes 5 of each (and one atomic for the SUB rows, not SUB)."""
    for stage in tl.static_range(5):  # log2(SUB) <= 5 reduce-scatter stages (constexpr: unrolled)
        if (SUB >> stage) > 1:  # rows i and i + SUB / 2^(stage+1) pair up across lane bit BD / 2^(stage+1)
            upper = (dl & (BD >> (stage + 1))) != 0
            kept = ()
            for i in tl.static_range(SUB >> (stage + 1)):
                send = tl.where(upper, vals[i], vals[i + (SUB >> (stage + 1))])
                keep = tl.where(upper, vals[i + (SUB >> (stage + 1))], vals[i])
                kept = kept + (keep + lane_xor(send, dl, BD >> (stage + 1), PTX),)
            vals = kept
    v = vals[0]
    for level in tl.static_range(5):  # the butterfly over the lanes sharing a row
        if (BD // SUB) >> level > 1:
            v = v + lane_xor(v, dl, (BD // SUB) >> (level + 1), PTX)
    return v


@triton.jit
def _rows(ts, tn, x_b, dt_b, dy_b, z_b, seq_b, d, dl, bias, s_t, s_yt, s_zt, s_st, SUB: tl.constexpr,
          WITH_DY: tl.constexpr, ACC: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
          SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
          FULL: tl.constexpr):
    """The SUB rows from step ts, once per (step, channel): (dt' x, dt', dy gated (WITH_DY), keep) each, (BD,)
    vectors; steps past tn are zeros (dt' = 0: a = 1, no input). keep is False where a document starts at the step
    (its state entering is cut, also at a checkpoint); steps past tn compare the last step with itself, so that
    they pass the carry through. FULL: the block lies before tn (no masks, no clamped steps)."""
    rows = ()
    for u in tl.static_range(SUB):
        t = ts + u
        ok = dl * 0 + t < tn  # (BD,): full-shape masks (the interpreter wants them)
        to = time_offset(t if FULL else tl.minimum(t, tn - 1), I64)
        if FULL:
            x = tl.load(x_b + (to * s_t + d)).to(ACC)
        else:
            x = tl.load(x_b + (to * s_t + d), mask=ok, other=0.0).to(ACC)
        delta, _ = dt_softplus_sigmoid(tl.load(dt_b + (to * s_t + d)).to(ACC), bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
        if not FULL:
            delta = tl.where(ok, delta, 0.0)
        if WITH_DY:
            if FULL:
                dy = tl.load(dy_b + (to * s_yt + d)).to(ACC)
            else:
                dy = tl.load(dy_b + (to * s_yt + d), mask=ok, other=0.0).to(ACC)
            if HAS_Z:
                zf = tl.load(z_b + (to * s_zt + d)).to(ACC)
                dy = dy * zf * fast_sigmoid(zf, LIBDEVICE)
        else:
            dy = delta  # (unused)
        if HAS_SEQ:
            prev = time_offset(tl.maximum(t - 1, 0) if FULL else tl.minimum(tl.maximum(t - 1, 0), tn - 1), I64)
            keep = tl.load(seq_b + to * s_st) == tl.load(seq_b + prev * s_st)
        else:
            keep = t < tn  # (unused)
        rows = rows + ((delta * x, delta, dy, keep),)
    return rows


@triton.jit
def _state_loop(rows, ts, tn, S1, S2, Y, h_at, h_sn, cb, A_ptr, d, s_Ad, s_An, dstate, B_b, C_b, dB_b, dC_b, dB_t, dC_t,
                red_off, red_ok, s_gn, dl, S_BT: tl.constexpr, BD: tl.constexpr, RED_CH: tl.constexpr,
                SUB: tl.constexpr, ACC: tl.constexpr, HAS_SEQ: tl.constexpr, TRANSPOSED: tl.constexpr,
                LIBDEVICE: tl.constexpr, I64: tl.constexpr, FULL: tl.constexpr):
    """One block's loop over the states (the block from step ts, its `rows` from `_rows`): per state n, forward from
    the state entering the block (h_at + n h_sn) and back from the carry in cb, adding dB / dC (atomics) and dA_n,
    the carry (cb); -> the sums over the states (S1, S2, Y) of each row, added to those given. FULL: the block lies
    before tn, so row u is step ts + u (B / C at constant offsets from one address); else steps past tn read step
    tn - 1's B / C (their dt' = 0 and dy = 0 keep them out of every sum)."""
    for n in range(0, dstate):
        A2 = tl.load(A_ptr + (d * s_Ad + n * s_An)).to(ACC) * LOG2E
        h = tl.load(h_at + n * h_sn).to(ACC)
        if FULL:  # one address per state, the block's rows at constant offsets from it
            Bp = B_b + (time_offset(ts, I64) * S_BT + n)
            Cp = C_b + (time_offset(ts, I64) * S_BT + n)
        # forward through the block: keep a_t, h_{t-1}, B, C of each row for the reverse
        fw = ()
        Y_new = ()
        dCv = ()
        for u in tl.static_range(SUB):
            xdt, delta, dy, keep = rows[u]
            to = time_offset(ts + u if FULL else tl.minimum(ts + u, tn - 1), I64)
            if FULL:
                Bn = tl.load(Bp + u * S_BT).to(ACC)
                Cn = tl.load(Cp + u * S_BT).to(ACC)
            else:
                Bn = tl.load(B_b + (to * S_BT + n)).to(ACC)
                Cn = tl.load(C_b + (to * S_BT + n)).to(ACC)
            a = tl.exp2(delta * A2)
            if HAS_SEQ:
                a = tl.where(keep, a, 0.0)
            fw = fw + ((a, h, Bn, Cn),)
            h = a * h + xdt * Bn
            Y_new = Y_new + (Y[u] + Cn * h,)
            if TRANSPOSED:
                dCv = dCv + (dy * h,)
            else:  # (no mask: a step past seqlen adds dy * h = 0 to the last step's row)
                tl.atomic_add(dC_b + (to * s_gn + n), _group_sum(dy * h, BD, RED_CH), sem="relaxed")
        Y = Y_new
        if TRANSPOSED:
            tl.atomic_add(dC_t + (red_off + n), _transposed_sum(dCv, dl, BD, SUB, LIBDEVICE), mask=red_ok,
                          sem="relaxed")
        # reverse through the block
        carry = tl.load(cb + n * BD)
        dA_n = tl.load(cb + (dstate + n) * BD)
        S1_new = ()
        S2_new = ()
        dBv = ()
        for u in tl.static_range(SUB - 1, -1, -1):  # (a constexpr index: tuples take no other)
            xdt, delta, dy, keep = rows[u]
            to = time_offset(ts + u if FULL else tl.minimum(ts + u, tn - 1), I64)
            a, h_prev, Bn, Cn = fw[u]
            gt = Cn * dy + carry  # dL/dh_t
            q = gt * a * h_prev
            S1_new = (S1[u] + gt * Bn,) + S1_new
            S2_new = (S2[u] + q * A2,) + S2_new
            dA_n += q * delta
            if TRANSPOSED:
                dBv = (gt * xdt,) + dBv
            else:  # (x = 0 past seqlen)
                tl.atomic_add(dB_b + (to * s_gn + n), _group_sum(gt * xdt, BD, RED_CH), sem="relaxed")
            carry = a * gt
        if TRANSPOSED:
            tl.atomic_add(dB_t + (red_off + n), _transposed_sum(dBv, dl, BD, SUB, LIBDEVICE), mask=red_ok,
                          sem="relaxed")
        S1 = S1_new
        S2 = S2_new
        tl.store(cb + n * BD, carry)
        tl.store(cb + (dstate + n) * BD, dA_n)
    return S1, S2, Y


@triton.jit
def _epilogue(rows, S1, S2, Y, ts, tn, x_b, dt_b, dy_b, z_b, dx_b, ddt_b, dz_b, d, dl, bias, Dv, s_t, s_yt, s_zt, s_dzt,
              dD_acc, dbias_acc, SUB: tl.constexpr, ACC: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
              DZ_AT: tl.constexpr, FULL: tl.constexpr):
    """A block's per-(step, channel) gradients from the sums over the states (S1, S2, Y): dz (from the recomputed
    y), dx, ddt stored, x, dz's and ddt's inputs loaded again; -> dD_acc, dbias_acc with the block's added. FULL: the
    block lies before tn (no masks)."""
    for u in tl.static_range(SUB):
        xdt, delta, dy, keep = rows[u]
        ok = dl * 0 + ts + u < tn
        to = time_offset(ts + u if FULL else tl.minimum(ts + u, tn - 1), I64)
        xo = to * s_t + d
        if FULL:
            x = tl.load(x_b + xo).to(ACC)
        else:
            x = tl.load(x_b + xo, mask=ok, other=0.0).to(ACC)
        if HAS_Z:
            y = Y[u] + Dv * x if HAS_D else Y[u]
            if FULL:
                dout = tl.load(dy_b + (to * s_yt + d)).to(ACC)
            else:
                dout = tl.load(dy_b + (to * s_yt + d), mask=ok, other=0.0).to(ACC)
            zf = tl.load(z_b + (to * s_zt + d)).to(ACC)
            sz = fast_sigmoid(zf, LIBDEVICE)
            dzo = xo if DZ_AT == 0 else to * s_zt + d if DZ_AT == 1 else to * s_dzt + d
            dz = (dout * y * sz * (1.0 + zf * (1.0 - sz))).to(dz_b.dtype.element_ty)
            if FULL:
                tl.store(dz_b + dzo, dz)
            else:
                tl.store(dz_b + dzo, dz, mask=ok)
        dx = delta * S1[u]
        if HAS_D:
            dx += Dv * dy
            dD_acc += dy * x
        if FULL:
            tl.store(dx_b + xo, dx.to(dx_b.dtype.element_ty))
        else:
            tl.store(dx_b + xo, dx.to(dx_b.dtype.element_ty), mask=ok)
        ddt = x * S1[u] + S2[u] * LN2
        if SOFTPLUS:  # d dt' / d dt = sigmoid(dt + bias)
            v = tl.load(dt_b + xo).to(ACC)
            ddt = ddt * fast_sigmoid(v + bias if HAS_BIAS else v, LIBDEVICE)
        if FULL:
            tl.store(ddt_b + xo, ddt.to(ddt_b.dtype.element_ty))
        else:
            ddt = tl.where(ok, ddt, 0.0)
            tl.store(ddt_b + xo, ddt.to(ddt_b.dtype.element_ty), mask=ok)
        dbias_acc += ddt
    return dD_acc, dbias_acc


@fast_launch
@triton.jit
def scan_bwd_chunked_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, seq_ptr, hck_ptr, dy_ptr, dhlast_ptr, cin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr, buf_ptr,
    seqlen, dim, dstate, group_size, nchunks, seg_len, nseg, cin_n, cin_k, rep_stride,
    s_b, s_t, s_zb, s_zt, s_Bb, s_Bg, s_sb, s_st, s_Ad, s_An, s_yb, s_yt, s_dzb, s_dzt,
    S_BT: tl.constexpr, NREP: tl.constexpr, RED_CH: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    BD: tl.constexpr, ACC: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_DHLAST: tl.constexpr, WANT_DH0: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
    SEGMENTED: tl.constexpr, DZ_AT: tl.constexpr, TRANSPOSED: tl.constexpr, EVEN_T: tl.constexpr,
):
    """Backward of time segment pid_c (the whole sequence when nseg == 1) for BD channels of batch row pid_b,
    checkpoint intervals in reverse; the arguments are `scan_bwd_kernel`'s, less its scratch and tiling knobs.
    dB / dC: (NREP, B, L, G, N) float32 replicas: the sum of each group of RED_CH channels (a divisor of BD) goes to
    replica (pid_d BD / RED_CH + group) % NREP.
    SUB: the steps held in registers, a divisor of CHUNK; SUB < CHUNK walks each interval in SUB-step blocks, after a
    forward pass that keeps the state entering each block.
    buf: (programs, 2 + CHUNK / SUB, N, BD) float32, each lane's own channel: its carry and dA_n partial sum between
    intervals, then the state entering each block of the interval."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    dl = tl.arange(0, BD)
    d = pid_d * BD + dl  # (BD,): a lane per channel
    ngroups = dim // group_size
    g = (pid_d * BD) // group_size
    s_gn = ngroups * dstate
    bias = tl.load(bias_ptr + d).to(ACC) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + d).to(ACC) if HAS_D else 0.0
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
    # dB_t / dC_t: each group of RED_CH lanes (the whole warp when RED_CH == BD) adds its sum into its own replica
    grp = tl.arange(0, BD // RED_CH)
    rep = ((pid_d * (BD // RED_CH) + grp) % NREP).to(tl.int64) * rep_stride  # (BD / RED_CH,)
    row0 = (pid_b * seqlen * ngroups + g) * dstate  # (b, t=0, g) of a replica
    dB_b = dB_ptr + (rep + row0)
    dC_b = dC_ptr + (rep + row0)
    if TRANSPOSED:  # a block's SUB rows summed at once (_transposed_sum): lane l ends with row l // (BD / SUB)'s sum
        lrow = dl // (BD // SUB)
        own = dl % (BD // SUB) == 0  # the lane that adds it
        rep_t = (pid_d % NREP).to(tl.int64) * rep_stride
        dB_t = dB_ptr + (rep_t + row0)
        dC_t = dC_ptr + (rep_t + row0)
    else:
        dB_t = dB_ptr
        dC_t = dC_ptr
    st_off = (pid_b * dim + d) * dstate  # (b, d, n=0) of a (B, D, N) state
    prog = (pid_b * nseg + pid_c) * tl.num_programs(0) + pid_d
    # carry of state n at cb + n * BD, dA_n at cb + (dstate + n) * BD, the state entering block k at hb + (k N + n) BD
    cb = buf_ptr + prog * ((2 + CHUNK // SUB) * dstate * BD) + dl
    hb = cb + 2 * dstate * BD
    if SEGMENTED:
        r = entering_carry_index(pid_c, cin_n, cin_k)
        cin_b = cin_ptr + ((pid_b * cin_n + r) * dim + d) * dstate
    for n in range(0, dstate):  # the carry entering the segment's last step, dA_n = 0
        if SEGMENTED:
            carry = tl.load(cin_b + n).to(ACC)
        elif HAS_DHLAST:
            carry = tl.load(dhlast_ptr + (st_off + n)).to(ACC)
        else:
            carry = tl.zeros((BD,), dtype=ACC)
        tl.store(cb + n * BD, carry)
        tl.store(cb + (dstate + n) * BD, tl.zeros((BD,), dtype=ACC))
    dD_acc = tl.zeros((BD,), dtype=ACC)
    dbias_acc = tl.zeros((BD,), dtype=ACC)
    c_lo = pid_c * (seg_len // CHUNK)
    c_hi = tl.minimum(c_lo + seg_len // CHUNK, nchunks)
    for ci in range(0, c_hi - c_lo):
        c = c_hi - 1 - ci
        t0 = c * CHUNK
        tn = tl.minimum(t0 + CHUNK, seqlen)
        ck = hck_ptr + ((pid_b * nchunks + c) * dim + d) * dstate  # the state entering the interval
        nsb = (tn - t0 + SUB - 1) // SUB
        if SUB < CHUNK:  # forward through the blocks: the state entering each one into hb
            for n in range(0, dstate):
                tl.store(hb + n * BD, tl.load(ck + n).to(ACC))
            for sb in range(0, nsb - 1):
                ts = t0 + sb * SUB
                rows = _rows(ts, tn, x_b, dt_b, dy_b, z_b, seq_b, d, dl, bias, s_t, s_yt, s_zt, s_st, SUB, False, ACC,
                             HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ, LIBDEVICE, I64, True)
                for n in range(0, dstate):
                    A2 = tl.load(A_ptr + (d * s_Ad + n * s_An)).to(ACC) * LOG2E
                    h = tl.load(hb + (sb * dstate + n) * BD)
                    for u in tl.static_range(SUB):
                        xdt, delta, dy, keep = rows[u]
                        to = time_offset(ts + u, I64)  # (a block before the last: whole)
                        a = tl.exp2(delta * A2)
                        if HAS_SEQ:
                            a = tl.where(keep, a, 0.0)
                        h = a * h + xdt * tl.load(B_b + (to * S_BT + n)).to(ACC)
                    tl.store(hb + ((sb + 1) * dstate + n) * BD, h)
        for sbi in range(0, nsb):  # the blocks in reverse
            sb = nsb - 1 - sbi
            ts = t0 + sb * SUB
            # only what the state loop reads stays in registers through it: x, dz's and ddt's inputs are loaded again
            # after it
            # a whole block: every block but a ragged last one, all of them when SUB divides seqlen (EVEN_T)
            full = True if EVEN_T else ts + SUB <= tn
            if full:
                rows = _rows(ts, tn, x_b, dt_b, dy_b, z_b, seq_b, d, dl, bias, s_t, s_yt, s_zt, s_st, SUB, True, ACC,
                             HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ, LIBDEVICE, I64, True)
            else:
                rows = _rows(ts, tn, x_b, dt_b, dy_b, z_b, seq_b, d, dl, bias, s_t, s_yt, s_zt, s_st, SUB, True, ACC,
                             HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ, LIBDEVICE, I64, False)
            if TRANSPOSED:  # each lane's row of the block in dB / dC, and whether it adds it
                red_off = time_offset(tl.minimum(ts + lrow, tn - 1), I64) * s_gn
                red_ok = own & (ts + lrow < tn)
            else:
                red_off = 0
                red_ok = False
            S1 = ()  # sum_n g B_n, per row
            S2 = ()  # sum_n g a h_{t-1} A_n log2(e)
            Y = ()  # sum_n C_n h: the pre-gate output, recomputed
            for u in tl.static_range(SUB):
                S1 = S1 + (tl.zeros((BD,), dtype=ACC),)
                S2 = S2 + (tl.zeros((BD,), dtype=ACC),)
                Y = Y + (tl.zeros((BD,), dtype=ACC),)
            # the state entering the block: kept by the forward pass, or the interval's checkpoint
            h_at, h_sn = (hb + sb * dstate * BD, BD) if SUB < CHUNK else (ck, 1)
            if full:  # rows ts + u unclamped
                S1, S2, Y = _state_loop(rows, ts, tn, S1, S2, Y, h_at, h_sn, cb, A_ptr, d, s_Ad, s_An, dstate, B_b, C_b,
                                        dB_b, dC_b, dB_t, dC_t, red_off, red_ok, s_gn, dl, S_BT, BD, RED_CH, SUB, ACC,
                                        HAS_SEQ, TRANSPOSED, LIBDEVICE, I64, True)
            else:
                S1, S2, Y = _state_loop(rows, ts, tn, S1, S2, Y, h_at, h_sn, cb, A_ptr, d, s_Ad, s_An, dstate, B_b, C_b,
                                        dB_b, dC_b, dB_t, dC_t, red_off, red_ok, s_gn, dl, S_BT, BD, RED_CH, SUB, ACC,
                                        HAS_SEQ, TRANSPOSED, LIBDEVICE, I64, False)
            if full:
                dD_acc, dbias_acc = _epilogue(rows, S1, S2, Y, ts, tn, x_b, dt_b, dy_b, z_b, dx_b, ddt_b, dz_b, d, dl,
                                              bias, Dv, s_t, s_yt, s_zt, s_dzt, dD_acc, dbias_acc, SUB, ACC, HAS_D,
                                              HAS_Z, HAS_BIAS, SOFTPLUS, LIBDEVICE, I64, DZ_AT, True)
            else:
                dD_acc, dbias_acc = _epilogue(rows, S1, S2, Y, ts, tn, x_b, dt_b, dy_b, z_b, dx_b, ddt_b, dz_b, d, dl,
                                              bias, Dv, s_t, s_yt, s_zt, s_dzt, dD_acc, dbias_acc, SUB, ACC, HAS_D,
                                              HAS_Z, HAS_BIAS, SOFTPLUS, LIBDEVICE, I64, DZ_AT, False)
    for n in range(0, dstate):
        if WANT_DH0:
            tl.store(dh0_ptr + (st_off + n), tl.load(cb + n * BD), mask=d * 0 + pid_c == 0)
        tl.atomic_add(dA_ptr + (d * dstate + n), tl.load(cb + (dstate + n) * BD), sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias_acc, sem="relaxed")
