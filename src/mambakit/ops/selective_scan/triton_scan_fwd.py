"""Triton kernels of the selective scan's forward (Mamba-1 "S6"): the scan and the time-segment combine.

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate, K = L / CHUNK checkpoints.
Tiles: see triton_scan_tile.py. The expanded state (B, L, D, N) never leaves registers (Gu & Dao 2023,
Section 3.3).

    dt'_t = softplus(dt_t + dt_bias) (or dt_t + dt_bias);   a_t = exp(dt'_t A) (zero where seq_idx changes)
    h_t   = a_t h_{t-1} + dt'_t x_t B_t ;   y_t = (<C_t, h_t> + D x_t) * silu(z_t)

Each program walks its time segment once, four steps per iteration with the inputs of each pair loaded one
pair ahead; every CHUNK steps (the checkpoint interval) it saves h as (B, K, D, N) float32 for the backward
(1/CHUNK of the expanded state). When batch x dim gives too few programs (`scan_policy.default_time_segments`)
the forward is time-parallel over nseg segments of whole checkpoint intervals: pass 1 (`scan_fwd_kernel`,
STATE_ONLY) scans each segment but the last from a zero state, keeping its end state, its sum of dt' (the
segment's decay is exp(A sum dt'), zero if seq_idx restarts in it); pass 2 (`seg_combine_kernel`) chains
those into each segment's true start state; pass 3 (the full kernel) scans every segment from its start
state, writing y, the final state and the same whole-sequence checkpoints, so the backward is the same.
All math is float32 (float64 for float64 inputs); exponentials are exp2 with A pre-scaled by log2(e).
Loads are never placed right after stores they could alias (Triton marks no pointer noalias, so the
hardware would wait): each step's inputs are loaded one step ahead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_launch import fast_launch
from ..triton_math import LOG2E, dt_softplus_sigmoid, fast_sigmoid, prefetch_l2
from .triton_scan_tile import load_bc, load_rows, tile_index, time_offset

__all__ = ["scan_fwd_kernel", "seg_combine_kernel"]


@triton.jit
def _load_step(t, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
               HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr, I64: tl.constexpr,
               SKIP_C: tl.constexpr):
    """Raw inputs of step t: x, dt, z (BD,), B, C (NL, NH), seq_idx. Past the segment end tn the index is
    clamped (the step is masked later) so that no load needs a predicate or a zero-filled register.
    With SKIP_C (the state-only pass) C is not loaded (B stands in, unused)."""
    to = time_offset(tl.minimum(t, tn - 1), I64)
    x = tl.load(x_b + to * s_t + d1)
    dt = tl.load(dt_b + to * s_t + d1)
    z = tl.load(z_b + to * s_zt + d1) if HAS_Z else x
    # the forward keeps (base + t * stride) + lane here: the base + (offset) form compiled to more instructions
    # in this loop (docs/design/kernel_figures.md), unlike its y stores and the backward
    Bv = load_bc(B_b + to * s_Bt, 0, n2, n_ok2, EVEN_N)
    Cv = Bv if SKIP_C else load_bc(C_b + to * s_Bt, 0, n2, n_ok2, EVEN_N)
    s = tl.load(seq_b + to * s_st) if HAS_SEQ else 0
    return x, dt, z, Bv, Cv, s


@triton.jit
def _fwd_step(h, inp, s_prev, valid, A2, Dv, bias, ACC: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
              STATE_ONLY: tl.constexpr, LIBDEVICE: tl.constexpr):
    """One recurrence step on the (NL, NH, BD) state. Returns the new state, y_t (BD,) (dt' instead in the
    state-only pass, which forms no output), and whether the step restarts the state (seq_idx change)."""
    x, dt, z, Bv, Cv, s = inp
    x = x.to(ACC)
    delta, _ = dt_softplus_sigmoid(dt.to(ACC), bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
    delta = tl.where(valid, delta, 0.0)  # a padded step is the identity: a = 1, u = 0
    a = tl.exp2(delta[None, None, :] * A2)
    restart = False
    if HAS_SEQ:
        restart = (s != s_prev) & valid
        a = tl.where(restart, 0.0, a)  # new document: forget the state
    h = a * h + (delta * x)[None, None, :] * Bv.to(ACC)[:, :, None]
    if STATE_ONLY:
        y = delta
    else:
        y = tl.sum(tl.sum(h * Cv.to(ACC)[:, :, None], axis=0), axis=0)
        if HAS_D:
            y += Dv * x
        if HAS_Z:
            zf = z.to(ACC)
            y = y * zf * fast_sigmoid(zf, LIBDEVICE)
    return h, y, restart




@fast_launch
@triton.jit
def scan_fwd_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr, seq_ptr,
    y_ptr, hlast_ptr, hck_ptr, sdt_ptr, keep_ptr,
    seqlen, seg_len, nseg, dim, dstate, group_size, nchunks,
    s_b, s_t, s_zb, s_zt, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_h0b, s_h0c,
    CHUNK: tl.constexpr, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_LAST: tl.constexpr, SAVE_CK: tl.constexpr,
    STATE_ONLY: tl.constexpr, EVEN_N: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Forward over time segment pid_c = [pid_c * seg_len, +seg_len) of one batch row (the whole sequence
    when nseg == 1); seg_len is a multiple of CHUNK, so checkpoints keep their whole-sequence indices.

    Full pass: starts from h0 (HAS_H0; at h0_ptr + b * s_h0b + c * s_h0c, i.e. the segment start states
    of the combine pass when nseg > 1), writes y, the checkpoints, and the final state (last segment).
    STATE_ONLY (pass 1 of the time-parallel forward): starts from zero, writes only the segment's end
    state into hlast_ptr (B, nseg, D, N), sum of dt' (B, nseg, D) into sdt_ptr and, with seq_idx,
    keep = 0 if the state restarts anywhere in the segment (its first step included) into keep_ptr.

    PREFETCH > 0 (`ScanConfig.fwd_prefetch`): each 4-step iteration asks the L2 for the x / dt (and z) rows
    PREFETCH steps ahead, so the loads one pair ahead find them there instead of in DRAM.
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    t0 = pid_c * seg_len
    tn = tl.minimum(t0 + seg_len, seqlen)
    dl, d1, n2, n_ok2, n3, d3, n_ok3, g = tile_index(pid_d, dstate, group_size, NL, NH, BD)
    # exp(dt' A) = exp2(dt' * A log2 e): one MUFU op per (channel, state, step)
    A2 = load_rows(A_ptr, s_An, s_Ad, d1, n3, dstate, NL, NH, BD, ACC) * LOG2E
    Dv = tl.load(D_ptr + d1).to(ACC) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d1).to(ACC) if HAS_BIAS else 0.0
    x_b = x_ptr + pid_b * s_b
    dt_b = dt_ptr + pid_b * s_b
    y_b = y_ptr + pid_b * s_b
    z_b = z_ptr + pid_b * s_zb
    B_b = B_ptr + pid_b * s_Bb + g * s_Bg
    C_b = C_ptr + pid_b * s_Bb + g * s_Bg
    seq_b = seq_ptr + pid_b * s_sb
    st_off = (pid_b * dim + d3) * dstate + n3  # (B, D, N) states: final
    if HAS_H0:
        h = load_rows(h0_ptr + pid_b * s_h0b + pid_c * s_h0c, 1, dstate, d1, n3, dstate, NL, NH, BD, ACC)
    else:
        h = tl.zeros((NL, NH, BD), dtype=ACC)
    ck_off = (pid_b * nchunks * dim + d3) * dstate + n3  # (B, K, D, N) checkpoints, the backward's order
    sdt = tl.zeros((BD,), dtype=ACC)  # state-only pass: sum of dt' over the segment
    restarted = t0 < 0  # state-only pass: a restart seen (False)
    # store masks compare index vectors (lane index * 0 + t), never a broadcast scalar comparison: Triton
    # 3.9's interpreter splats a scalar i1 into a non-boolean array and rejects it as a mask. The compiler
    # folds the zero vector, so the predicate (and the SASS) is unchanged
    zero_d = d1 * 0  # (BD,)

    # Four steps per iteration in two pairs, each pair's inputs loaded one pair ahead so HBM latency
    # hides behind the other pair's math. The ping-pong (P loaded at the end for the next iteration,
    # Q at the start for this one) keeps loads out of loop-carried rotation: no register moves.
    P0 = _load_step(t0, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                    HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
    P1 = _load_step(t0 + 1, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                    HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
    # seq_idx before the segment: a document starting exactly at t0 restarts the carried-in state
    # (seq_idx[0] itself at t0 = 0: no restart at the first step, as in the sequential scan)
    s_prev = tl.load(seq_b + time_offset(tl.maximum(t0 - 1, 0), I64) * s_st) if HAS_SEQ else P0[5]
    for t in range(t0, tn, 4):
        Q0 = _load_step(t + 2, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
        Q1 = _load_step(t + 3, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
        if PREFETCH > 0:
            for u in tl.static_range(4):
                ahead = time_offset(tl.minimum(t + PREFETCH + u, tn - 1), I64)
                prefetch_l2(x_b + ahead * s_t + d1)
                prefetch_l2(dt_b + ahead * s_t + d1)
                if HAS_Z and not STATE_ONLY:
                    prefetch_l2(z_b + ahead * s_zt + d1)
        if SAVE_CK:
            if t % CHUNK == 0:  # state before step t = start of chunk t // CHUNK (CHUNK % 4 == 0)
                tl.store(hck_ptr + ck_off + tl.cast(t // CHUNK, tl.int64) * dim * dstate, h, mask=n_ok3)
        yo = time_offset(t, I64) * s_t + d1
        h, y0, r0 = _fwd_step(h, P0, s_prev, t < tn, A2, Dv, bias, ACC, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                              HAS_SEQ, STATE_ONLY, LIBDEVICE)
        h, y1, r1 = _fwd_step(h, P1, P0[5], t + 1 < tn, A2, Dv, bias, ACC, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                              HAS_SEQ, STATE_ONLY, LIBDEVICE)
        s_prev = P1[5]
        if STATE_ONLY:
            sdt += y0 + y1
            restarted = restarted | r0 | r1
        else:
            tl.store(y_b + yo, y0.to(y_ptr.dtype.element_ty))
            tl.store(y_b + (yo + s_t), y1.to(y_ptr.dtype.element_ty), mask=zero_d + (t + 1) < tn)
        P0 = _load_step(t + 4, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
        P1 = _load_step(t + 5, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
        h, y2, r2 = _fwd_step(h, Q0, s_prev, t + 2 < tn, A2, Dv, bias, ACC, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                              HAS_SEQ, STATE_ONLY, LIBDEVICE)
        h, y3, r3 = _fwd_step(h, Q1, Q0[5], t + 3 < tn, A2, Dv, bias, ACC, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                              HAS_SEQ, STATE_ONLY, LIBDEVICE)
        s_prev = Q1[5]
        if STATE_ONLY:
            sdt += y2 + y3
            restarted = restarted | r2 | r3
        else:
            tl.store(y_b + (yo + 2 * s_t), y2.to(y_ptr.dtype.element_ty), mask=zero_d + (t + 2) < tn)
            tl.store(y_b + (yo + 3 * s_t), y3.to(y_ptr.dtype.element_ty), mask=zero_d + (t + 3) < tn)
    if STATE_ONLY:
        seg = pid_b * nseg + pid_c
        tl.store(hlast_ptr + (seg * dim + d3) * dstate + n3, h, mask=n_ok3)
        tl.store(sdt_ptr + seg * dim + d1, sdt)
        if HAS_SEQ:
            # one flag per (row, segment), written by the lane of channel 0
            keep = tl.where(restarted, 0.0, 1.0) + tl.zeros((BD,), dtype=ACC)
            tl.store(keep_ptr + seg + d1 * 0, keep, mask=d1 == 0)
    elif SAVE_LAST:
        tl.store(hlast_ptr + st_off, h, mask=n_ok3 & (d3 * 0 + pid_c == nseg - 1))



@fast_launch
@triton.jit
def seg_combine_kernel(hloc_ptr, sdt_ptr, keep_ptr, A_ptr, h0_ptr, hstart_ptr, nseg, dim, dstate, s_Ad, s_An,
                        BLOCK: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 of the time-parallel forward: the true start state of every segment, sequentially over them:
        start_0 = h0 (or 0),   start_{c+1} = keep_c exp(A sum_c dt') start_c + local_c
    where local_c is segment c's end state from a zero start (pass 1). Elementwise over (D, N) of one row;
    each segment's inputs are loaded one segment ahead (no load waits behind the store it follows)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)  # flat (d, n) index of the (D, N) state
    ok = e < dim * dstate
    d = e // dstate
    n = e % dstate
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=ok, other=0.0).to(ACC) * LOG2E
    if HAS_H0:
        h = tl.load(h0_ptr + b * dim * dstate + e, mask=ok, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK,), dtype=ACC)
    tl.store(hstart_ptr + b * nseg * dim * dstate + e, h, mask=ok)
    hl = tl.load(hloc_ptr + b * nseg * dim * dstate + e, mask=ok, other=0.0)  # pass 1 wrote ACC
    sd = tl.load(sdt_ptr + b * nseg * dim + d, mask=ok, other=0.0)
    one = tl.full((BLOCK,), 1.0, dtype=ACC)
    kp = tl.load(keep_ptr + b * nseg + e * 0) if HAS_SEQ else one
    for c in range(0, nseg - 1):
        seg = b * nseg + c
        nxt = b * nseg + tl.minimum(c + 1, nseg - 2)
        hl_n = tl.load(hloc_ptr + nxt * dim * dstate + e, mask=ok, other=0.0)
        sd_n = tl.load(sdt_ptr + nxt * dim + d, mask=ok, other=0.0)
        kp_n = tl.load(keep_ptr + nxt + e * 0) if HAS_SEQ else one
        h = (kp * tl.exp2(A2 * sd)) * h + hl
        tl.store(hstart_ptr + (seg + 1) * dim * dstate + e, h, mask=ok)
        hl, sd, kp = hl_n, sd_n, kp_n

