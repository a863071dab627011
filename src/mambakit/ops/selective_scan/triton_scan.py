"""Triton kernels of the selective scan (Mamba-1 "S6"): fused forward, backward with recomputation.

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate, K = L / CHUNK chunks.
Kernel tiles: a program owns BD channels of one batch row and all N states of them, held as a
(NL, NH, BD) register tile: NL states in each thread (contiguous in memory, so B_t / C_t load as
one vector), NH lanes along the states, BD lanes along the channels. N = NL * NH (padded to a power
of two). The expanded state (B, L, D, N) never leaves registers (Gu & Dao 2023, Section 3.3).

    dt'_t = softplus(dt_t + dt_bias) (or dt_t + dt_bias);   a_t = exp(dt'_t A) (zero where seq_idx changes)
    h_t   = a_t h_{t-1} + dt'_t x_t B_t ;   y_t = (<C_t, h_t> + D x_t) * silu(z_t)

Forward: each program walks the sequence once, four steps per iteration with the inputs of each
pair loaded one pair ahead; every CHUNK steps it saves h as (B, K, D, N) float32 for the backward
(1/CHUNK of the expanded state). When batch x dim gives too few programs (`default_time_chunks`) the
forward is time-parallel over nc segments of whole CHUNKs: pass 1 (the same kernel, STATE_ONLY) scans
each segment but the last from a zero state, keeping its end state, its sum of dt' (the segment's
decay is exp(A sum dt'), zero if seq_idx restarts in it); pass 2 chains those into each segment's true
start state; pass 3 (the full kernel) scans every segment from its start state, writing y, the final
state and the same whole-sequence checkpoints, so the backward is the same. Backward, per program,
chunks in reverse:
    pass A  re-walks the chunk forward from its checkpoint, keeping h every U steps and dt', sigma(v)
            per step in a per-program scratch buffer (L2 sized);
    pass B  walks the chunk's U-step blocks in reverse: re-derives the block's U states in registers
            from the scratch, then runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} through
            them, emitting dx, ddt, dz per step, dB_t / dC_t (summed over the program's channels, then
            atomically added across programs), and accumulating dA, dD, ddt_bias in registers.
All math is float32 (float64 for float64 inputs); exponentials are exp2 with A pre-scaled by log2(e).

Layout: the tile must keep its NL states inside each thread (reductions over the states are then
register adds, B_t / C_t one vector load). Triton lets every load of >= 32 * num_warps elements
"anchor" the layout of what it feeds, with the vectorised layout its coalescing pass picks (at most
128 bits per thread along the contiguous axis). So the forward gathers its (dstate, BD) tiles
(A, initial state) row by row, and the backward, whose per-chunk tiles must be real vector loads,
holds NL <= 4 float32 states per thread, exactly one 128-bit vector: those anchors then have the
loop's layout. Loads are never placed right after stores they could alias (Triton marks no pointer
noalias, so the hardware would wait): each step's or block's inputs are loaded one step / block ahead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..common import fake_grads, pack_grads, unpack_grads
from ..dispatch import triton_interpret
from ..triton_launch import cdiv, fast_launch, next_power_of_2, sm_count

__all__ = ["selective_scan_triton", "ScanConfig", "default_time_chunks"]

DEFAULT_CHUNK = 128  # steps between forward checkpoints; backward scratch is O(CHUNK) per program
DEFAULT_REPLICAS = 32  # copies of dB / dC the backward's atomics spread over
DEFAULT_REDUCE_CHANNELS = 4  # dB / dC: channel lanes summed by shuffles before the atomic (H100 sweep)
# Backward occupancy (H100 sweeps, BENCHMARKS.md). U = 4 needs ~224 registers a thread (9 one-warp programs per
# SM), U = 2 ~146 (13): U = 2 issues ~15% more instructions per step but wins once the launch has the warps to
# fill an SM (batch 8 x 512: 1.44 vs 1.72 ms fwd+bwd), U = 4 wins below (batch 2 x 2048 in one segment: 1.76 vs
# 2.05). Time segments are added until the launch has BWD_MIN_WARPS_PER_SM warps per SM.
BWD_U2_MIN_WARPS_PER_SM = 13
BWD_MIN_WARPS_PER_SM = 24


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _log1p(w, LIBDEVICE: tl.constexpr):
    # log(1 + w) loses the low bits of a small w (dt' ~ 1e-3 is typical): keep relative accuracy
    if LIBDEVICE:
        r = libdevice.log1p(w)
    else:  # Triton's interpreter has no libdevice: Goldberg's exact-rounding trick
        u = 1.0 + w
        r = tl.where(u == 1.0, w, tl.log(u) * (w / tl.where(u == 1.0, 1.0, u - 1.0)))
    return r


@triton.jit
def _sigmoid(v, LIBDEVICE: tl.constexpr):
    # 1 / (1 + exp(-v)) with exp2 and the approximate divide (MUFU rcp, <= 2 ulp): tl.sigmoid's IEEE
    # division carries ~8 range-check instructions per use, paid per channel and step
    e = tl.exp2(-v * 1.4426950408889634)
    if LIBDEVICE:
        r = libdevice.fast_dividef(1.0, 1.0 + e) if v.dtype == tl.float32 else 1.0 / (1.0 + e)
    else:
        r = 1.0 / (1.0 + e)
    return r


@triton.jit
def _delta(dt, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIBDEVICE: tl.constexpr):
    """dt' = softplus(dt + bias) and d dt'/d dt = sigmoid(dt + bias) (1 without softplus)."""
    v = dt
    if HAS_BIAS:
        v = v + bias
    if SOFTPLUS:
        w = tl.exp2(-tl.abs(v) * 1.4426950408889634)  # exp(-|v|) in (0, 1]: never overflows
        delta = tl.maximum(v, 0.0) + _log1p(w, LIBDEVICE)
        sig = _sigmoid(v, LIBDEVICE)
    else:
        delta = v
        sig = tl.full(v.shape, 1.0, v.dtype)
    return delta, sig


@triton.jit
def _load_rows(ptr, s_n, s_d, d1, n3, dstate, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr,
               ACC: tl.constexpr):
    """Gather a (dstate, BD) slab (element (n, d) at ptr + n * s_n + d * s_d) into an (NL, NH, BD) tile.

    Row by row on purpose: a load of >= 32 * num_warps elements is a layout anchor for Triton, and a
    vectorised (NL, NH, BD) load would push its layout (NL split over lanes) into the scan loop;
    (BD,) row loads are not anchors, so the tile keeps the default layout with NL in-thread.
    """
    out = tl.zeros((NL, NH, BD), dtype=ACC)
    for n in range(0, dstate):
        row = tl.load(ptr + n * s_n + d1 * s_d).to(ACC)
        out = tl.where(n3 == n, row[None, None, :], out)
    return out


@triton.jit
def _load_bc(ptr, off, n2, n_ok2, EVEN_N: tl.constexpr):
    """B_t or C_t (at ptr + off) of the program's group as (NL, NH): NL contiguous floats per thread, one
    vector load."""
    if EVEN_N:
        v = tl.load(ptr + (off + n2))
    else:
        v = tl.load(ptr + (off + n2), mask=n_ok2, other=0.0)
    return v


@triton.jit
def _tile_index(pid_d, dstate, group_size, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr):
    """Indices of program pid_d's (NL, NH, BD) tile: channel lanes dl (BD,), channels d1 (BD,), states n2
    (NL, NH) with their mask, the same as (NL, NH, 1) / (1, 1, BD) broadcasts, and the group g of its B, C
    (BD divides group_size, so channels need no mask)."""
    dl = tl.arange(0, BD)
    d1 = pid_d * BD + dl
    n2 = tl.arange(0, NH)[None, :] * NL + tl.arange(0, NL)[:, None]  # (NL, NH) state index
    n_ok2 = n2 < dstate
    return dl, d1, n2, n_ok2, n2[:, :, None], d1[None, None, :], n_ok2[:, :, None], (pid_d * BD) // group_size


@triton.jit
def _toff(t, I64: tl.constexpr):
    # t * stride overflows int32 on long sequences (1M tokens x stride 3072): 64-bit only where
    # the launcher says so; 32-bit offsets save ~30 address instructions per step
    return tl.cast(t, tl.int64) if I64 else t
# Addresses are written base + (offset): the integer offsets add up in 32 bits (64 with I64) and meet the
# 64-bit base once; (base + t * stride) + lane would be two 64-bit pointer adds per access (~2 more
# instructions each, ~25 per backward step). Accesses with the same stride share their offset.


@triton.jit
def _load_step(t, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
               HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr, I64: tl.constexpr,
               SKIP_C: tl.constexpr):
    """Raw inputs of step t: x, dt, z (BD,), B, C (NL, NH), seq_idx. Past the segment end tn the index is
    clamped (the step is masked later) so that no load needs a predicate or a zero-filled register.
    With SKIP_C (the state-only pass) C is not loaded (B stands in, unused)."""
    to = _toff(tl.minimum(t, tn - 1), I64)
    x = tl.load(x_b + to * s_t + d1)
    dt = tl.load(dt_b + to * s_t + d1)
    z = tl.load(z_b + to * s_zt + d1) if HAS_Z else x
    # the forward keeps (base + t * stride) + lane here: the base + (offset) form compiled to more SASS in this
    # loop (710 -> 741 instructions per iteration), unlike its y stores and the backward
    Bv = _load_bc(B_b + to * s_Bt, 0, n2, n_ok2, EVEN_N)
    Cv = Bv if SKIP_C else _load_bc(C_b + to * s_Bt, 0, n2, n_ok2, EVEN_N)
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
    delta, _ = _delta(dt.to(ACC), bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
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
            y = y * zf * _sigmoid(zf, LIBDEVICE)
    return h, y, restart


@fast_launch
@triton.jit
def _scan_fwd_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr, seq_ptr,
    y_ptr, hlast_ptr, hck_ptr, sdt_ptr, keep_ptr,
    seqlen, seg_len, nseg, dim, dstate, group_size, nchunks,
    s_b, s_t, s_zb, s_zt, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_h0b, s_h0c,
    CHUNK: tl.constexpr, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_LAST: tl.constexpr, SAVE_CK: tl.constexpr,
    STATE_ONLY: tl.constexpr, EVEN_N: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
):
    """Forward over time segment pid_c = [pid_c * seg_len, +seg_len) of one batch row (the whole sequence
    when nseg == 1); seg_len is a multiple of CHUNK, so checkpoints keep their whole-sequence indices.

    Full pass: starts from h0 (HAS_H0; at h0_ptr + b * s_h0b + c * s_h0c, i.e. the segment start states
    of the combine pass when nseg > 1), writes y, the checkpoints, and the final state (last segment).
    STATE_ONLY (pass 1 of the time-parallel forward): starts from zero, writes only the segment's end
    state into hlast_ptr (B, nseg, D, N), sum of dt' (B, nseg, D) into sdt_ptr and, with seq_idx,
    keep = 0 if the state restarts anywhere in the segment (its first step included) into keep_ptr.
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    t0 = pid_c * seg_len
    tn = tl.minimum(t0 + seg_len, seqlen)
    dl, d1, n2, n_ok2, n3, d3, n_ok3, g = _tile_index(pid_d, dstate, group_size, NL, NH, BD)
    # exp(dt' A) = exp2(dt' * A log2 e): one MUFU op per (channel, state, step)
    A2 = _load_rows(A_ptr, s_An, s_Ad, d1, n3, dstate, NL, NH, BD, ACC) * 1.4426950408889634
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
        h = _load_rows(h0_ptr + pid_b * s_h0b + pid_c * s_h0c, 1, dstate, d1, n3, dstate, NL, NH, BD, ACC)
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
    s_prev = tl.load(seq_b + _toff(tl.maximum(t0 - 1, 0), I64) * s_st) if HAS_SEQ else P0[5]
    for t in range(t0, tn, 4):
        Q0 = _load_step(t + 2, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
        Q1 = _load_step(t + 3, tn, x_b, dt_b, z_b, B_b, C_b, seq_b, s_t, s_zt, s_Bt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64, STATE_ONLY)
        if SAVE_CK:
            if t % CHUNK == 0:  # state before step t = start of chunk t // CHUNK (CHUNK % 4 == 0)
                tl.store(hck_ptr + ck_off + tl.cast(t // CHUNK, tl.int64) * dim * dstate, h, mask=n_ok3)
        yo = _toff(t, I64) * s_t + d1
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
def _seg_combine_kernel(hloc_ptr, sdt_ptr, keep_ptr, A_ptr, h0_ptr, hstart_ptr, nseg, dim, dstate, s_Ad, s_An,
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
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=ok, other=0.0).to(ACC) * 1.4426950408889634
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


@triton.jit
def _bwd_block_inputs(j, t0, tn, x_b, B_b, seq_b, scr_b, stash_b, C_b, z_b, dy_b, s_t, s_zt, s_Bt, s_yt, s_st,
                      d1, dl, n2, n_ok2, scr_off, BD: tl.constexpr, BN: tl.constexpr, U: tl.constexpr,
                      HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, EVEN_N: tl.constexpr,
                      I64: tl.constexpr, ACC: tl.constexpr):
    """Everything pass B reads for micro-block j before its first store: the state entering the
    block, x / B / dt' of its U steps, seq_idx, and the reverse inputs of its last step."""
    tb = t0 + j * U
    h = tl.load(scr_b + (j * (BD * BN) + scr_off))
    s_prev = tl.load(seq_b + _toff(tl.maximum(tb - 1, 0), I64) * s_st) if HAS_SEQ else 0
    steps = ()
    for u in tl.static_range(U):
        to = _toff(tl.minimum(tb + u, tn - 1), I64)
        x = tl.load(x_b + (to * s_t + d1)).to(ACC)
        Bv = _load_bc(B_b, to * s_Bt, n2, n_ok2, EVEN_N).to(ACC)
        delta = tl.load(stash_b + (((j * U + u) * 2) * BD + dl))  # 0 on padded steps (pass A wrote it)
        s = tl.load(seq_b + to * s_st) if HAS_SEQ else 0
        steps = steps + ((x, Bv, delta, s),)
    last = _bwd_reverse_inputs(tb + U - 1, tn, (j * U + U - 1) * 2 + 1, C_b, z_b, dy_b, stash_b, s_zt, s_Bt,
                               s_yt, d1, dl, n2, n_ok2, BD, HAS_Z, SOFTPLUS, EVEN_N, I64, ACC)
    return h, s_prev, steps, last


@triton.jit
def _bwd_reverse_inputs(t, tn, sig_row, C_b, z_b, dy_b, stash_b, s_zt, s_Bt, s_yt, d1, dl, n2, n_ok2,
                        BD: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, EVEN_N: tl.constexpr,
                        I64: tl.constexpr, ACC: tl.constexpr):
    """C_t, the upstream dy_t (zero on padded steps), z_t and sigmoid(dt_t + bias) for the adjoint step."""
    to = _toff(tl.minimum(t, tn - 1), I64)
    Cv = _load_bc(C_b, to * s_Bt, n2, n_ok2, EVEN_N).to(ACC)
    dout = tl.where(t < tn, tl.load(dy_b + (to * s_yt + d1)).to(ACC), 0.0)
    zf = tl.load(z_b + (to * s_zt + d1)).to(ACC) if HAS_Z else dout
    sig = tl.load(stash_b + (sig_row * BD + dl)) if SOFTPLUS else dout
    return Cv, dout, zf, sig


@triton.jit
def _lane_group_sum(v, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr, RED_CH: tl.constexpr):
    """(NL, NH, BD) -> the same shape, each channel holding the sum over its group of RED_CH channels."""
    if RED_CH == 1:
        return v
    elif RED_CH == BD:
        return tl.sum(v, axis=2, keep_dims=True)
    else:
        v4 = tl.sum(tl.reshape(v, (NL, NH, BD // RED_CH, RED_CH)), axis=3, keep_dims=True)
        return tl.reshape(tl.broadcast_to(v4, (NL, NH, BD // RED_CH, RED_CH)), (NL, NH, BD))


@triton.jit
def _bwd_step_reverse(carry, dA_acc, dD_acc, dbias_acc, t, tn, h_t, h_p, a, x, delta, Bv, rev,
                      A, Dv, s_gn, d1, dl, n2, n_ok2, dx_b, ddt_b, dz_b, dB_l, dC_l, s_t,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, I64: tl.constexpr,
                      LIBDEVICE: tl.constexpr, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr,
                      RED_CH: tl.constexpr):
    """Adjoint of step t: takes g_{t+1} a_{t+1} (`carry`), returns a_t g_t and the updated sums."""
    Cv, dout, zf, sig = rev
    # t < tn as a (BD,) vector, not a scalar: Triton 3.9's interpreter rejects a broadcast scalar
    # comparison as a store / atomic mask (the compiled predicate is the same)
    valid = dl * 0 + t < tn  # (BD,)
    Cv = Cv[:, :, None]
    xo = _toff(t, I64) * s_t + d1  # x / dx / ddt / dz offset of step t
    y = tl.sum(tl.sum(h_t * Cv, axis=0), axis=0)  # pre-gate output, recomputed (not stored by the forward)
    if HAS_D:
        y += Dv * x
    if HAS_Z:
        sz = _sigmoid(zf, LIBDEVICE)
        tl.store(dz_b + xo, (dout * y * sz * (1.0 + zf * (1.0 - sz))).to(dz_b.dtype.element_ty),
                 mask=valid)
        dy = dout * zf * sz
    else:
        dy = dout
    gt = Cv * dy[None, None, :] + carry  # dL/dh_t
    S1 = tl.sum(tl.sum(gt * Bv[:, :, None], axis=0), axis=0)  # sum_n g B: for dx and ddt'
    q = gt * a * h_p  # dL/da_t * a_t
    S2 = tl.sum(tl.sum(q * A, axis=0), axis=0)
    dA_acc += q * delta[None, None, :]
    # dB_t, dC_t: sums over channels, first over groups of RED_CH channel lanes (shuffles), then over the
    # groups and programs through float32 atomics, each group into its own replica (`rep_off`). A group's
    # sum is broadcast back over its lanes and added by its first lane only: the atomic then keeps the
    # loop's layout (a (NL, NH) atomic would go through shared memory and two barriers). RED_CH = 1 needs
    # no shuffle at all and issues as many atomic instructions (one per warp), moving 8x the bytes.
    # dB_l / dC_l: (BD,) pointers to row (b, 0, g) of each lane's replica; s_gn = ngroups * dstate
    row = (_toff(t, I64) * s_gn + n2)[:, :, None]
    one = n_ok2[:, :, None] & ((dl % RED_CH) == 0)[None, None, :] & valid[None, None, :]
    tl.atomic_add(dB_l[None, None, :] + row, _lane_group_sum(gt * (delta * x)[None, None, :], NL, NH, BD, RED_CH),
                  mask=one, sem="relaxed")
    tl.atomic_add(dC_l[None, None, :] + row, _lane_group_sum(h_t * dy[None, None, :], NL, NH, BD, RED_CH),
                  mask=one, sem="relaxed")
    dx = delta * S1
    if HAS_D:
        dx += Dv * dy
        dD_acc += dy * x
    tl.store(dx_b + xo, dx.to(dx_b.dtype.element_ty), mask=valid)
    ddt = x * S1 + S2
    if SOFTPLUS:
        ddt = ddt * sig
    ddt = tl.where(valid, ddt, 0.0)  # a padded step still sees the carry: keep it out of the sums
    tl.store(ddt_b + xo, ddt.to(ddt_b.dtype.element_ty), mask=valid)
    dbias_acc += ddt
    return a * gt, dA_acc, dD_acc, dbias_acc


@triton.jit
def _pass_a_inputs(tb, tn, x_b, dt_b, B_b, seq_b, s_t, s_Bt, s_st, d1, n2, n_ok2, U: tl.constexpr,
                   HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr, I64: tl.constexpr, ACC: tl.constexpr):
    """x, dt, B, seq_idx of the U steps from tb (clamped at the chunk end)."""
    steps = ()
    for u in tl.static_range(U):
        to = _toff(tl.minimum(tb + u, tn - 1), I64)
        xo = to * s_t + d1
        x = tl.load(x_b + xo).to(ACC)
        dtv = tl.load(dt_b + xo).to(ACC)
        Bv = _load_bc(B_b, to * s_Bt, n2, n_ok2, EVEN_N).to(ACC)
        s = tl.load(seq_b + to * s_st) if HAS_SEQ else 0
        steps = steps + ((x, dtv, Bv, s),)
    return steps


@triton.jit
def _carry_inputs(t, dt_b, z_b, C_b, dy_b, seq_b, s_t, s_zt, s_Bt, s_yt, s_st, d1, n2, n_ok2,
                  HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr, I64: tl.constexpr):
    """dt, z, dy (BD,), C (NL, NH) and seq_idx[t] vs seq_idx[t - 1] of step t (t >= 1) for the adjoint pass."""
    to = _toff(t, I64)
    dtv = tl.load(dt_b + (to * s_t + d1))
    dout = tl.load(dy_b + (to * s_yt + d1))
    zf = tl.load(z_b + (to * s_zt + d1)) if HAS_Z else dout
    Cv = _load_bc(C_b, to * s_Bt, n2, n_ok2, EVEN_N)
    if HAS_SEQ:
        restart = tl.load(seq_b + to * s_st) != tl.load(seq_b + (to - 1) * s_st)
    else:
        restart = False
    return dtv, zf, dout, Cv, restart


@fast_launch
@triton.jit
def _scan_bwd_carry_kernel(
    dt_ptr, z_ptr, C_ptr, A_ptr, bias_ptr, seq_ptr, dy_ptr, cl_ptr, sdt_ptr, keep_ptr,
    seqlen, seg_len, nseg, dim, dstate, group_size,
    s_b, s_zb, s_zt, s_t, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_yb, s_yt,
    NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr,
    LIBDEVICE: tl.constexpr, I64: tl.constexpr,
):
    """Pass 1 of the time-parallel backward: the adjoint alone over segment s = pid_c + 1 = [p, q).

    The adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} needs no forward state (dy_t = dout_t z_t sigmoid(z_t)
    with the gate), so each segment but the first runs it from a zero carry at its end and writes the carry
    it hands on, a_p g_p, into cl (B, nseg, D, N) at the reversed index r = nseg - 1 - s; sum of dt' over the
    segment into sdt (B, nseg, D); and with seq_idx keep (B, nseg) = 0 if a document starts anywhere in
    [p, q) (a_t = 0 there, p included). The forward's segment combine then chains the true carries:
    carry_in(s - 1) = local(s) + keep_s exp(A sum_s dt') carry_in(s), from carry_in(last) = dL/dh_final.
    These segments (seg_len steps, any length) may be finer than the backward's: this pass is cheap per step
    and wants many programs; its tile is the forward's (NL states in-thread, A gathered row by row).
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2) + 1
    p = seg * seg_len
    q = tl.minimum(p + seg_len, seqlen)
    dl, d1, n2, n_ok2, n3, d3, n_ok3, g = _tile_index(pid_d, dstate, group_size, NL, NH, BD)
    A2 = _load_rows(A_ptr, s_An, s_Ad, d1, n3, dstate, NL, NH, BD, ACC) * 1.4426950408889634
    bias = tl.load(bias_ptr + d1).to(ACC) if HAS_BIAS else 0.0
    dt_b = dt_ptr + pid_b * s_b
    z_b = z_ptr + pid_b * s_zb
    dy_b = dy_ptr + pid_b * s_yb
    C_b = C_ptr + pid_b * s_Bb + g * s_Bg
    seq_b = seq_ptr + pid_b * s_sb
    carry = tl.zeros((NL, NH, BD), dtype=ACC)
    sdt = tl.zeros((BD,), dtype=ACC)
    restarted = dl < 0  # (BD,) False
    nxt = _carry_inputs(q - 1, dt_b, z_b, C_b, dy_b, seq_b, s_t, s_zt, s_Bt, s_yt, s_st, d1, n2, n_ok2,
                        HAS_Z, HAS_SEQ, EVEN_N, I64)
    for i in range(0, q - p):
        t = q - 1 - i
        dtv, zf, dout, Cv, restart = nxt
        # the next (earlier) step's inputs, one step ahead, clamped at p >= 1 (seq_idx[t - 1] stays in bounds)
        nxt = _carry_inputs(tl.maximum(t - 1, p), dt_b, z_b, C_b, dy_b, seq_b, s_t, s_zt, s_Bt, s_yt, s_st, d1, n2,
                            n_ok2, HAS_Z, HAS_SEQ, EVEN_N, I64)
        delta, _ = _delta(dtv.to(ACC), bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
        dy = dout.to(ACC)
        if HAS_Z:
            zz = zf.to(ACC)
            dy = dy * zz * _sigmoid(zz, LIBDEVICE)
        a = tl.exp2(delta[None, None, :] * A2)
        if HAS_SEQ:
            a = tl.where(restart, 0.0, a)
            restarted = restarted | restart
        carry = a * (Cv.to(ACC)[:, :, None] * dy[None, None, :] + carry)
        sdt += delta
    r = pid_b * nseg + (nseg - 1 - seg)
    tl.store(cl_ptr + (r * dim + d3) * dstate + n3, carry, mask=n_ok3)
    tl.store(sdt_ptr + r * dim + d1, sdt)
    if HAS_SEQ:
        keep = tl.where(restarted, 0.0, 1.0)  # (BD,): the restart flags are per step, equal over channels
        tl.store(keep_ptr + r + d1 * 0, keep, mask=d1 == 0)


@fast_launch
@triton.jit
def _scan_bwd_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, seq_ptr, hck_ptr, dy_ptr, dhlast_ptr, cin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr, scr_ptr, stash_ptr,
    seqlen, dim, dstate, group_size, nchunks, seg_len, nseg, cin_n, cin_k, rep_stride,
    s_b, s_t, s_zb, s_zt, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_yb, s_yt,
    NREP: tl.constexpr, RED_CH: tl.constexpr, CHUNK: tl.constexpr, U: tl.constexpr, NL: tl.constexpr,
    NH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DHLAST: tl.constexpr,
    WANT_DH0: tl.constexpr, EVEN_N: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
    SEGMENTED: tl.constexpr,
):
    """Backward over time segment pid_c = chunks [pid_c * seg_len / CHUNK, ...) of one batch row (the whole
    sequence when nseg == 1), chunks in reverse. SEGMENTED: the carry entering the segment's last step comes
    from cin (B, cin_n, D, N) (`_scan_bwd_carry_kernel` + the segment combine, cin_k carry segments per one);
    otherwise from dL/dh_final (HAS_DHLAST) or zero."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    prog = (pid_b * nseg + pid_c) * tl.num_programs(0) + pid_d
    dl, d1, n2, n_ok2, n3, d3, n_ok3, g = _tile_index(pid_d, dstate, group_size, NL, NH, BD)
    ngroups = dim // group_size
    # (D, N) and (B, *, D, N) tiles load as NL contiguous floats per thread: with NL <= 4 that vector
    # load has exactly the scan loop's layout (NL in-thread), so these anchors cost no conversion
    A = tl.load(A_ptr + d3 * s_Ad + n3 * s_An, mask=n_ok3, other=0.0).to(ACC)
    A2 = A * 1.4426950408889634
    Dv = tl.load(D_ptr + d1).to(ACC) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d1).to(ACC) if HAS_BIAS else 0.0
    x_b = x_ptr + pid_b * s_b
    dt_b = dt_ptr + pid_b * s_b
    dx_b = dx_ptr + pid_b * s_b
    ddt_b = ddt_ptr + pid_b * s_b
    dz_b = dz_ptr + pid_b * s_b
    z_b = z_ptr + pid_b * s_zb
    dy_b = dy_ptr + pid_b * s_yb
    # programs step through t in near lockstep, so their dB_t / dC_t atomics would all hit one row at
    # once: channel group k (RED_CH channels) of program pid_d adds into replica (pid_d * BD / RED_CH + k)
    # % NREP (the replicas are summed afterwards): NREP x less contention
    rep_off = ((pid_d * (BD // RED_CH) + dl // RED_CH) % NREP).to(tl.int64) * rep_stride  # (BD,)
    row0 = (pid_b * seqlen * ngroups + g) * dstate  # (b, t=0, g) of a replica: (NREP, B, L, G, N)
    dB_l = dB_ptr + (rep_off + row0)
    dC_l = dC_ptr + (rep_off + row0)
    B_b = B_ptr + pid_b * s_Bb + g * s_Bg
    C_b = C_ptr + pid_b * s_Bb + g * s_Bg
    seq_b = seq_ptr + pid_b * s_sb
    BN: tl.constexpr = NL * NH
    scr_b = scr_ptr + prog * (CHUNK // U) * BD * BN  # h every U steps of the current chunk
    scr_off = dl[None, None, :] * BN + n3
    stash_b = stash_ptr + prog * CHUNK * 2 * BD  # dt' and sigmoid(dt + bias) of each step of the chunk
    st_off = (pid_b * dim + d3) * dstate + n3
    if SEGMENTED:
        # carry segments are cin_k times finer (reversed order): the one entering this segment's last step
        # is the carry-in of sub-segment (pid_c + 1) cin_k - 1, stored at cin_n - (pid_c + 1) cin_k (0: last)
        r = tl.maximum(cin_n - (pid_c + 1) * cin_k, 0)
        cin_off = ((pid_b * cin_n + r) * dim + d3) * dstate + n3
        carry = tl.load(cin_ptr + cin_off, mask=n_ok3, other=0.0).to(ACC)
    elif HAS_DHLAST:
        carry = tl.load(dhlast_ptr + st_off, mask=n_ok3, other=0.0).to(ACC)
    else:
        carry = tl.zeros((NL, NH, BD), dtype=ACC)
    dA_acc = tl.zeros((NL, NH, BD), dtype=ACC)
    dD_acc = tl.zeros((BD,), dtype=ACC)
    dbias_acc = tl.zeros((BD,), dtype=ACC)
    c_lo = pid_c * (seg_len // CHUNK)
    c_hi = tl.minimum(c_lo + seg_len // CHUNK, nchunks)
    for ci in range(0, c_hi - c_lo):
        c = c_hi - 1 - ci
        t0 = c * CHUNK
        tn = tl.minimum(t0 + CHUNK, seqlen)
        nblk = (tn - t0 + U - 1) // U
        # pass A: forward over the chunk from its checkpoint, keeping h every U steps, dt' and sigma.
        # Each block's inputs are loaded one block ahead, before the stores that would order them.
        h = tl.load(hck_ptr + ((pid_b * nchunks + c) * dim + d3) * dstate + n3, mask=n_ok3, other=0.0)
        s_prev = tl.load(seq_b + _toff(tl.maximum(t0 - 1, 0), I64) * s_st) if HAS_SEQ else 0
        nxt = _pass_a_inputs(t0, tn, x_b, dt_b, B_b, seq_b, s_t, s_Bt, s_st, d1, n2, n_ok2, U, HAS_SEQ, EVEN_N,
                             I64, ACC)
        for j in range(0, nblk):
            cur = nxt
            nxt = _pass_a_inputs(t0 + (j + 1) * U, tn, x_b, dt_b, B_b, seq_b, s_t, s_Bt, s_st, d1, n2, n_ok2, U,
                                 HAS_SEQ, EVEN_N, I64, ACC)
            tl.store(scr_b + (j * (BD * BN) + scr_off), h)
            for u in tl.static_range(U):
                x, dtv, Bv, s = cur[u]
                valid = t0 + j * U + u < tn
                delta, sig = _delta(dtv, bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
                delta = tl.where(valid, delta, 0.0)
                tl.store(stash_b + (((j * U + u) * 2) * BD + dl), delta)
                if SOFTPLUS:
                    tl.store(stash_b + (((j * U + u) * 2 + 1) * BD + dl), sig)
                a = tl.exp2(delta[None, None, :] * A2)
                if HAS_SEQ:
                    a = tl.where((s == s_prev) | (~valid), a, 0.0)
                    s_prev = s
                h = a * h + (delta * x)[None, None, :] * Bv[:, :, None]
        tl.debug_barrier()  # scratch written by some lanes is read by others
        # pass B: U-step blocks in reverse; each re-derives its U states in registers, then runs the
        # adjoint through them. Block inputs come one block ahead, reverse inputs one step ahead.
        nxt_b = _bwd_block_inputs(nblk - 1, t0, tn, x_b, B_b, seq_b, scr_b, stash_b, C_b, z_b, dy_b, s_t, s_zt,
                                  s_Bt, s_yt, s_st, d1, dl, n2, n_ok2, scr_off, BD, BN, U, HAS_Z, HAS_SEQ, SOFTPLUS,
                                  EVEN_N, I64, ACC)
        for jj in range(0, nblk):
            j = nblk - 1 - jj
            tb = t0 + j * U
            h_in, s_prev, steps, rev = nxt_b
            nxt_b = _bwd_block_inputs(tl.maximum(j - 1, 0), t0, tn, x_b, B_b, seq_b, scr_b, stash_b, C_b, z_b,
                                      dy_b, s_t, s_zt, s_Bt, s_yt, s_st, d1, dl, n2, n_ok2, scr_off, BD, BN, U,
                                      HAS_Z, HAS_SEQ, SOFTPLUS, EVEN_N, I64, ACC)
            hs = (h_in,)
            a_s = ()
            for u in tl.static_range(U):
                x, Bv, delta, s = steps[u]
                a = tl.exp2(delta[None, None, :] * A2)
                if HAS_SEQ:
                    a = tl.where((s == s_prev) | (tb + u >= tn), a, 0.0)
                    s_prev = s
                hs = hs + (a * hs[u] + (delta * x)[None, None, :] * Bv[:, :, None],)
                a_s = a_s + (a,)
            for u1 in tl.static_range(U, 0, -1):  # step tb + u1 - 1 (indices stay constexpr inline)
                cur_rev = rev
                if u1 > 1:
                    rev = _bwd_reverse_inputs(tb + u1 - 2, tn, (j * U + u1 - 2) * 2 + 1, C_b, z_b, dy_b, stash_b,
                                              s_zt, s_Bt, s_yt, d1, dl, n2, n_ok2, BD, HAS_Z, SOFTPLUS, EVEN_N,
                                              I64, ACC)
                carry, dA_acc, dD_acc, dbias_acc = _bwd_step_reverse(
                    carry, dA_acc, dD_acc, dbias_acc, tb + u1 - 1, tn, hs[u1], hs[u1 - 1],
                    a_s[u1 - 1], steps[u1 - 1][0], steps[u1 - 1][2], steps[u1 - 1][1], cur_rev,
                    A, Dv, ngroups * dstate, d1, dl, n2, n_ok2, dx_b, ddt_b, dz_b, dB_l, dC_l, s_t, HAS_D, HAS_Z,
                    SOFTPLUS, I64, LIBDEVICE,
                    NL, NH, BD, RED_CH)
        tl.debug_barrier()  # the next chunk's pass A overwrites the scratch this pass read
    if WANT_DH0:
        tl.store(dh0_ptr + st_off, carry, mask=n_ok3 & (d3 * 0 + pid_c == 0))
    # full-shape mask: Triton's interpreter drops all but the first element of an all-ones-shape mask
    tl.atomic_add(dA_ptr + d3 * dstate + n3, dA_acc, mask=n_ok3 & (d3 >= 0), sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + d1, dD_acc, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d1, dbias_acc, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanConfig:
    """Tiling knobs (defaults are chosen from the shape; tests and benchmarks override them).

    fwd_nl / bwd_nl: states held per thread (NL); the rest of dstate spreads over NH lanes.
    bwd_channels: channels per warp in the backward (more: fewer dB/dC atomics, more shuffles).
    chunk: steps between forward checkpoints (multiple of 4 and of block_u).
    block_u: backward micro-block, the U states re-derived in registers per scratch checkpoint (None: 2 when
        the backward launch has the warps to use the extra occupancy, else 4).
    time_chunks: time segments the forward scans in parallel (see `default_time_chunks`); None picks
        from the shape, 1 is the plain sequential forward. Segments hold a whole number of checkpoint
        chunks, so fewer segments than asked are used when seqlen / chunk is small.
    bwd_reduce_channels: channels whose dB_t / dC_t are summed with warp shuffles before the float32
        atomic (a power of two; capped at the program's channels). None: DEFAULT_REDUCE_CHANNELS. 1: no
        shuffles, every channel lane adds its own value (more atomic bytes, fewer instructions).
    bwd_replicas: copies of dB / dC the atomics spread over (summed afterwards; memory 2 x replicas x
        batch x seqlen x ngroups x dstate floats).
    bwd_maxnreg: register cap per thread for the backward kernel (None: the compiler's choice), to fit
        more warps per SM.
    bwd_time_chunks: time segments the backward runs in parallel (see `default_bwd_time_chunks`); None
        picks from the shape, 1 is one program per (row, channels) walking the whole sequence.
    bwd_carry_split: carry segments per backward segment in the adjoint-only pass of a time-parallel
        backward (None: as many in all as the forward's time segments).
    """

    fwd_nl: int | None = None
    bwd_nl: int | None = None
    bwd_channels: int | None = None
    chunk: int = DEFAULT_CHUNK
    block_u: int | None = None
    time_chunks: int | None = None
    bwd_reduce_channels: int | None = None
    bwd_replicas: int = DEFAULT_REPLICAS
    bwd_maxnreg: int | None = None
    bwd_time_chunks: int | None = None
    bwd_carry_split: int | None = None

    def as_ints(self) -> list[int]:
        """The fields as ints (None -> -1): how the config crosses the custom op's schema."""
        return [-1 if v is None else int(v) for v in dataclasses.astuple(self)]

    @classmethod
    def from_ints(cls, values: list[int]) -> "ScanConfig":
        return cls(*(None if v == -1 else v for v in values))


@dataclass(frozen=True)
class _Tiles:
    NL: int
    NH: int
    BD: int
    num_warps: int


def _tiles(nl: int, dstate: int, group_size: int, channels: int | None = None) -> _Tiles:
    """(NL, NH, BD) for one program: NL states per thread, NH lanes on states, BD channels (a power
    of two dividing the group size, so a program reads one group's B, C); lanes fill BD first."""
    bn = next_power_of_2(dstate)
    nl = min(nl, bn)
    nh = bn // nl
    lanes_bd = max(1, 32 // nh) if channels is None else channels
    bd = min(lanes_bd, group_size & -group_size)  # largest power of two dividing group_size
    num_warps = max(1, min(8, nh * bd // 32))
    return _Tiles(nl, nh, bd, num_warps)


def _fwd_nl(rows: int, dim: int, dstate: int, device: torch.device) -> int:
    """States per thread in the forward: as many as possible (no replicated per-channel math)
    while the launch still has ~3 warps per SM to keep every scheduler issuing. `rows` counts the
    independent (batch row, time segment) scans."""
    bn = next_power_of_2(dstate)
    sms = sm_count(device, 132)
    nl = min(bn, 16)
    while nl > 4 and rows * dim * (bn // nl) < 3 * sms * 32:
        nl //= 2
    return nl


# Time-parallel forward (see default_time_chunks). H100 probe, batch x seqlen at equal tokens (dim 4096,
# dstate 16, one sequential forward each): 2x2048 (512 warps) 0.718 ms, 4x1024 (512 warps of NL=16)
# 0.320, 8x512 (1024 warps, 7.8 per SM) 0.187, 16x256 (2048 warps) 0.189: flat from ~8 warps per SM.
FWD_MIN_WARPS_PER_SM = 15  # split until the full pass has this many one-program warps per SM (H100 sweep, BENCHMARKS.md)
MIN_SEGMENT = 256  # shortest time segment worth a split (pass 1 + 2 are per-segment overheads)
MAX_TIME_CHUNKS = 64


def _fwd_warps(rows: int, dim: int, dstate: int, group_size: int, nl: int) -> int:
    tiles = _tiles(nl, dstate, group_size)
    return rows * (dim // tiles.BD) * tiles.num_warps


def default_time_chunks(batch: int, seqlen: int, dim: int, dstate: int, ngroups: int = 1,
                        config: ScanConfig | None = None, device: torch.device | str = "cuda") -> int:
    """Time segments of the forward for this shape: 1 unless the launch lacks parallelism.

    The sequential forward runs one one-warp program per (batch row, BD channels) walking the whole
    sequence: with few programs it is latency-bound (~1 warp per scheduler at batch 2 x dim 4096 on an
    H100; the probe above). Splitting time into nc segments multiplies the programs by nc but adds a
    state-only pass over (nc - 1) / nc of the sequence (static SASS: 0.58 of the full pass's loop
    instructions at NL=16, 0.92 at NL=8, where per-channel softplus dominates; it skips C, z, D, y and
    checkpoints, not the exps) and a tiny combine pass. So: the smallest power of two nc that brings
    the full pass to FWD_MIN_WARPS_PER_SM warps per SM (NL re-chosen for batch x nc rows), keeping
    segments of at least MIN_SEGMENT steps and whole checkpoint chunks, at most MAX_TIME_CHUNKS.
    The threshold comes from the H100 sweep (batch 2 x dim 4096, BENCHMARKS.md): forward at seqlen 2048
    0.707 / 0.501 / 0.334 / 0.343 ms for nc = 1 / 4 / 8 / 16, flat beyond 8 at 8192 and 32768 too.
    Examples on 132 SMs, dstate 16: batch 2 x dim 4096: 8 from seqlen 2048, 4 at 1024, 2 at 512;
    batch 4: 4; batch 8: 2; batch 16: 1; batch 1 x dim 1536, 1M tokens: 64 (16K-step segments).
    `config.time_chunks` overrides (tests, benchmarks).
    """
    cfg = config or ScanConfig()
    if cfg.time_chunks is not None:
        return max(1, cfg.time_chunks)
    device = torch.device(device)
    target = FWD_MIN_WARPS_PER_SM * sm_count(device, 132)
    group_size = dim // ngroups
    min_seg = max(MIN_SEGMENT, cfg.chunk)
    return _split_until(seqlen, min_seg, target, lambda nc: _fwd_warps(
        batch * nc, dim, dstate, group_size, cfg.fwd_nl or _fwd_nl(batch * nc, dim, dstate, device)))


def _split_until(seqlen: int, min_seg: int, target: int, warps) -> int:
    """The smallest power of two nc with warps(nc) >= target, keeping segments of at least min_seg steps
    (seqlen >= nc * min_seg) and nc <= MAX_TIME_CHUNKS."""
    nc = 1
    while nc * 2 <= MAX_TIME_CHUNKS and seqlen >= 2 * nc * min_seg and warps(nc) < target:
        nc *= 2
    return nc


def default_bwd_time_chunks(batch: int, seqlen: int, dim: int, dstate: int, ngroups: int = 1,
                            config: ScanConfig | None = None, device: torch.device | str = "cuda") -> int:
    """Time segments the backward runs in parallel for this shape (1: no split).

    The backward is one one-warp program per (batch row, BD channels, segment) walking its chunks in reverse;
    with few programs the SMs hold too few warps to hide the dependent chain of each step (the H100 sweep
    at batch 2 x dim 4096: fwd+bwd 1.76 ms in one segment, 1.64 in 4 with U = 2). A split costs an
    adjoint-only pass over all but the first segment (~10% of the backward) and a tiny combine. So: the
    smallest power of two nc giving BWD_MIN_WARPS_PER_SM warps per SM, with segments of at least MIN_SEGMENT
    steps and whole checkpoint chunks, at most MAX_TIME_CHUNKS. `config.bwd_time_chunks` overrides.
    Examples on 132 SMs, dstate 16: batch 2 x dim 4096: 4 from seqlen 2048; batch 4: 2; batch >= 8: 1.
    """
    cfg = config or ScanConfig()
    if cfg.bwd_time_chunks is not None:
        return max(1, cfg.bwd_time_chunks)
    tiles = _tiles(4, dstate, dim // ngroups, cfg.bwd_channels)
    target = BWD_MIN_WARPS_PER_SM * sm_count(torch.device(device), 132)
    min_seg = max(MIN_SEGMENT, cfg.chunk)
    return _split_until(seqlen, min_seg, target, lambda nc: batch * nc * (dim // tiles.BD) * tiles.num_warps)


def _segments(seqlen: int, chunk: int, nc: int) -> tuple[int, int]:
    """(segment length, number of segments) for nc requested segments: whole checkpoint chunks each."""
    seg_len = chunk * max(1, cdiv(cdiv(seqlen, chunk), max(1, nc)))
    return seg_len, max(1, cdiv(seqlen, seg_len))


def _needs_i64(seqlen: int, *strides: int) -> bool:
    return (seqlen + 4) * max(abs(s) for s in strides) >= 2**31


def _acc_dtype(x: torch.Tensor):
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _lastdim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _chain_segments(local, sdt, keep, A, first, has_seq: bool, acc_tl) -> torch.Tensor:
    """`_seg_combine_kernel` over segments: (B, nseg, D, N) start values from each segment's local result
    `local` (B, nseg, D, N), sum of dt' `sdt` (B, nseg, D), restart flags `keep` (B, nseg) (read with has_seq)
    and the first segment's start `first` (B, D, N) or None (zeros). The forward's states and, with reversed
    segments, the backward's carries."""
    batch, nseg, dim, dstate = local.shape
    start = torch.empty_like(local)
    block = 256
    _seg_combine_kernel[(cdiv(dim * dstate, block), batch)](
        local, sdt, keep, A, first if first is not None else local, start, nseg, dim, dstate, A.stride(0),
        A.stride(1), BLOCK=block, HAS_H0=first is not None, HAS_SEQ=has_seq, ACC=acc_tl, num_warps=4,
    )
    return start


def _scan_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx, save_final, save_chunks,
              config: ScanConfig):
    """Launch the forward. Returns y (B, L, D) in x's dtype, final state or None, checkpoints or None.

    With nseg > 1 time segments (`default_time_chunks`): pass 1 (state-only kernel) gives each segment
    but the last its end state from a zero start and its sum of dt'; pass 2 chains them into every
    segment's true start state; pass 3 (the full kernel) scans all segments from those, writing y, the
    whole-sequence checkpoints (the backward's layout, unchanged) and the final state.
    """
    batch, seqlen, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    acc_t, acc_tl = _acc_dtype(x)
    x, dt = x.contiguous(), dt.contiguous()  # x, dt, y share one set of strides
    z = _lastdim_contiguous(z)
    D, dt_bias = _contiguous(D), _contiguous(dt_bias)  # read as dense (dim,) vectors
    # B, C in the accumulation dtype (a tiny copy): saves two conversions per state per step
    B = B.to(acc_t).contiguous()
    C = C.to(acc_t).contiguous()
    y = torch.empty_like(x)
    chunk = config.chunk
    nchunks = cdiv(seqlen, chunk)
    seg_len, nseg = _segments(seqlen, chunk, default_time_chunks(batch, seqlen, dim, dstate, ngroups, config,
                                                                 x.device))
    nl = config.fwd_nl or _fwd_nl(batch * nseg, dim, dstate, x.device)
    tiles = _tiles(nl, dstate, dim // ngroups)
    hlast = torch.empty(batch, dim, dstate, device=x.device, dtype=acc_t) if save_final else None
    hck = torch.empty(batch, nchunks, dim, dstate, device=x.device, dtype=acc_t) if save_chunks else None
    h0 = initial_state.to(acc_t).contiguous() if initial_state is not None else None
    if seqlen == 0:  # nothing to scan (the kernel's clamped loads need one step)
        if hlast is not None:
            hlast.copy_(h0 if h0 is not None else torch.zeros_like(hlast))
        return y, hlast, hck
    zs = z.stride() if z is not None else (0, 0, 1)
    ss = seq_idx.stride() if seq_idx is not None else (0, 0)
    dummy = y
    common = dict(
        CHUNK=chunk, NL=tiles.NL, NH=tiles.NH, BD=tiles.BD, ACC=acc_tl, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, HAS_SEQ=seq_idx is not None, EVEN_N=dstate == tiles.NL * tiles.NH,
        LIBDEVICE=not triton_interpret(), I64=_needs_i64(seqlen, x.stride(1), zs[1], B.stride(1), ss[1]),
        num_warps=tiles.num_warps,
    )
    strides = (x.stride(0), x.stride(1), zs[0], zs[1], B.stride(0), B.stride(1), B.stride(2), ss[0], ss[1],
               A.stride(0), A.stride(1))
    z_arg = z if z is not None else dummy
    seq_arg = seq_idx if seq_idx is not None else dummy
    bias_arg = dt_bias if dt_bias is not None else dummy
    if nseg == 1:
        start, s_start = h0, (dim * dstate, 0)
    else:
        # pass 1: end state from zero, sum of dt' and restart flag of every segment but the last
        hloc = torch.empty(batch, nseg, dim, dstate, device=x.device, dtype=acc_t)
        sdt = torch.empty(batch, nseg, dim, device=x.device, dtype=acc_t)
        keep = torch.empty(batch, nseg, device=x.device, dtype=acc_t) if seq_idx is not None else sdt
        _scan_fwd_kernel[(dim // tiles.BD, batch, nseg - 1)](
            x, dt, dummy, B, C, A, dummy, bias_arg, dummy, seq_arg, dummy, hloc, dummy, sdt, keep,
            seqlen, seg_len, nseg, dim, dstate, dim // ngroups, nchunks, *strides, 0, 0,
            HAS_D=False, HAS_Z=False, HAS_H0=False, SAVE_LAST=False, SAVE_CK=False, STATE_ONLY=True, **common,
        )
        # pass 2: start state of every segment, chained over the segments (elementwise over (D, N))
        start = _chain_segments(hloc, sdt, keep, A, h0, seq_idx is not None, acc_tl)
        s_start = (nseg * dim * dstate, dim * dstate)
    # pass 3 (the only pass when nseg == 1): the full forward of every segment from its start state
    _scan_fwd_kernel[(dim // tiles.BD, batch, nseg)](
        x, dt, z_arg, B, C, A, D if D is not None else dummy, bias_arg, start if start is not None else dummy,
        seq_arg, y, hlast if hlast is not None else dummy, hck if hck is not None else dummy, dummy, dummy,
        seqlen, seg_len, nseg, dim, dstate, dim // ngroups, nchunks, *strides, *s_start,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=start is not None, SAVE_LAST=save_final,
        SAVE_CK=save_chunks, STATE_ONLY=False, **common,
    )
    return y, hlast, hck


def _scan_bwd(dy, dhlast, x, dt, A, B, C, D, z, dt_bias, dt_softplus, seq_idx, hck, want_dh0, config: ScanConfig):
    """Launch the backward. Returns dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state."""
    batch, seqlen, dim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    acc_t, acc_tl = _acc_dtype(x)
    x, dt = x.contiguous(), dt.contiguous()
    z = _lastdim_contiguous(z)
    dy = _lastdim_contiguous(dy)
    D, dt_bias = _contiguous(D), _contiguous(dt_bias)
    B32 = B.to(acc_t).contiguous()
    C32 = C.to(acc_t).contiguous()
    # the vectorised (B, *, D, N) anchors of the backward are in-thread only up to 128-bit vectors
    bwd_nl = config.bwd_nl or (4 if acc_t == torch.float32 else 2)
    tiles = _tiles(bwd_nl, dstate, dim // ngroups, config.bwd_channels)
    chunk = config.chunk
    nchunks = hck.shape[1]
    seg_len, nseg = _segments(seqlen, chunk, default_bwd_time_chunks(batch, seqlen, dim, dstate, ngroups, config,
                                                                     x.device))
    warps = batch * nseg * (dim // tiles.BD) * tiles.num_warps
    block_u = config.block_u or (2 if warps >= BWD_U2_MIN_WARPS_PER_SM * sm_count(x.device, 132) else 4)
    nprog = (dim // tiles.BD) * batch * nseg
    bn = tiles.NL * tiles.NH
    scratch = torch.empty(nprog, chunk // block_u, tiles.BD, bn, device=x.device, dtype=acc_t)
    stash = torch.empty(nprog, chunk, 2, tiles.BD, device=x.device, dtype=acc_t)
    dx = torch.empty_like(x)
    ddt = torch.empty_like(dt)
    dz = torch.empty(z.shape, device=x.device, dtype=z.dtype) if z is not None else None
    red_ch = min(config.bwd_reduce_channels or DEFAULT_REDUCE_CHANNELS, tiles.BD)
    nrep = min(config.bwd_replicas, dim // red_ch)  # replicas of dB, dC for the atomics (see the kernel)
    dB = torch.zeros(nrep, batch, seqlen, ngroups, dstate, device=x.device, dtype=acc_t)
    dC = torch.zeros_like(dB)
    dA = torch.zeros(dim, dstate, device=x.device, dtype=acc_t)
    dD = torch.zeros(dim, device=x.device, dtype=acc_t) if D is not None else None
    dbias = torch.zeros(dim, device=x.device, dtype=acc_t) if dt_bias is not None else None
    dh0 = torch.empty(batch, dim, dstate, device=x.device, dtype=acc_t) if want_dh0 else None
    dhl = dhlast.to(acc_t).contiguous() if dhlast is not None else None
    zs = z.stride() if z is not None else (0, 0, 1)
    ss = seq_idx.stride() if seq_idx is not None else (0, 0)
    dummy = dx
    i64 = _needs_i64(seqlen, x.stride(1), zs[1], B32.stride(1), ss[1], dy.stride(1))
    cin, cin_n, cin_k = None, 1, 1
    if nseg > 1:
        # pass 1: the adjoint alone over every carry segment but the first, from a zero carry at its end (carry
        # segments: cin_k per backward segment, as many as the forward's time segments when that is more);
        # pass 2: the forward's segment combine, run over the reversed carry segments, chains them into the
        # carry entering every one (dL/dh_final for the last)
        if config.bwd_carry_split is not None:
            cin_k = max(1, min(config.bwd_carry_split, seg_len))
        else:
            nc_fwd = default_time_chunks(batch, seqlen, dim, dstate, ngroups, ScanConfig(chunk=chunk), x.device)
            cin_k = max(1, min(nc_fwd // nseg, seg_len // 16))
        while seg_len % cin_k:  # carry segments must tile each backward segment exactly
            cin_k -= 1
        sub_len = seg_len // cin_k
        cin_n = cdiv(seqlen, sub_len)
        ctiles = _tiles(_fwd_nl(batch * cin_n, dim, dstate, x.device), dstate, dim // ngroups)
        cl = torch.empty(batch, cin_n, dim, dstate, device=x.device, dtype=acc_t)
        sdt = torch.empty(batch, cin_n, dim, device=x.device, dtype=acc_t)
        keep = torch.empty(batch, cin_n, device=x.device, dtype=acc_t) if seq_idx is not None else sdt
        _scan_bwd_carry_kernel[(dim // ctiles.BD, batch, cin_n - 1)](
            dt, z if z is not None else dummy, C32, A, dt_bias if dt_bias is not None else dummy,
            seq_idx if seq_idx is not None else dummy, dy, cl, sdt, keep,
            seqlen, sub_len, cin_n, dim, dstate, dim // ngroups,
            x.stride(0), zs[0], zs[1], x.stride(1), B32.stride(0), B32.stride(1), B32.stride(2), ss[0], ss[1],
            A.stride(0), A.stride(1), dy.stride(0), dy.stride(1),
            NL=ctiles.NL, NH=ctiles.NH, BD=ctiles.BD, ACC=acc_tl, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
            SOFTPLUS=dt_softplus, HAS_SEQ=seq_idx is not None, EVEN_N=dstate == ctiles.NL * ctiles.NH,
            LIBDEVICE=not triton_interpret(), I64=i64, num_warps=ctiles.num_warps,
        )
        cin = _chain_segments(cl, sdt, keep, A, dhl, seq_idx is not None, acc_tl)
    grid = (dim // tiles.BD, batch, nseg)
    _scan_bwd_kernel[grid](
        x, dt, z if z is not None else dummy, B32, C32, A, D if D is not None else dummy,
        dt_bias if dt_bias is not None else dummy, seq_idx if seq_idx is not None else dummy, hck, dy,
        dhl if dhl is not None else dummy, cin if cin is not None else dummy,
        dx, ddt, dz if dz is not None else dummy, dB, dC, dA, dD if dD is not None else dummy,
        dbias if dbias is not None else dummy, dh0 if dh0 is not None else dummy, scratch, stash,
        seqlen, dim, dstate, dim // ngroups, nchunks, seg_len, nseg, cin_n, cin_k, dB.stride(0),
        x.stride(0), x.stride(1), zs[0], zs[1], B32.stride(0), B32.stride(1), B32.stride(2), ss[0], ss[1],
        A.stride(0), A.stride(1), dy.stride(0), dy.stride(1),
        NREP=nrep, RED_CH=red_ch, CHUNK=chunk, U=block_u, NL=tiles.NL, NH=tiles.NH, BD=tiles.BD, ACC=acc_tl,
        HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_SEQ=seq_idx is not None,
        HAS_DHLAST=dhl is not None, WANT_DH0=want_dh0, EVEN_N=dstate == tiles.NL * tiles.NH,
        LIBDEVICE=not triton_interpret(),
        I64=i64, SEGMENTED=nseg > 1,
        num_warps=tiles.num_warps, **({} if config.bwd_maxnreg is None else {"maxnreg": config.bwd_maxnreg}),
    )
    dB, dC = dB.sum(0), dC.sum(0)
    return (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), None if dD is None else dD.to(D.dtype),
            dz, None if dbias is None else dbias.to(dt_bias.dtype), dh0)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


# One custom op pair (torch.library): the forward returns y, the final state and the checkpoints the backward
# reads; autograd is registered on it, so torch.compile, autocast and FSDP see one op with fake tensors instead
# of launcher code. Optional outputs come back as empty tensors (a schema cannot return None).


@torch.library.custom_op("mambakit::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                 initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, dt_softplus: bool,
                 return_final_state: bool, save_chunks: bool,
                 config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, hlast, hck = _scan_fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx,
                              save_final=return_final_state, save_chunks=save_chunks,
                              config=ScanConfig.from_ints(config))
    acc = _acc_dtype(x)[0]
    return y, x.new_empty(0, dtype=acc) if hlast is None else hlast, x.new_empty(0, dtype=acc) if hck is None else hck


@_scan_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, return_final_state, save_chunks, config):
    batch, seqlen, dim = x.shape
    acc = _acc_dtype(x)[0]
    hlast = x.new_empty((batch, dim, A.shape[1]) if return_final_state else (0,), dtype=acc)
    nchunks = cdiv(seqlen, ScanConfig.from_ints(config).chunk)
    hck = x.new_empty((batch, nchunks, dim, A.shape[1]) if save_chunks else (0,), dtype=acc)
    return torch.empty_like(x), hlast, hck


@torch.library.custom_op("mambakit::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: torch.Tensor, dhlast: torch.Tensor | None, x: torch.Tensor, dt: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                 dt_bias: torch.Tensor | None, seq_idx: torch.Tensor | None, hck: torch.Tensor,
                 dt_softplus: bool, want_dh0: bool, config: list[int]) -> list[torch.Tensor]:
    *grads, dh0 = _scan_bwd(dy, dhlast, x, dt, A, B, C, D, z, dt_bias, dt_softplus, seq_idx, hck, want_dh0,
                            ScanConfig.from_ints(config))
    # dx, ddt, dA, dB, dC, dD, dz, dbias, then dh0 (float32, or float64 for float64 inputs)
    return pack_grads(grads, (x, dt, A, B, C, D, z, dt_bias)) + [x.new_empty(0) if dh0 is None else dh0]


@_scan_bwd_op.register_fake
def _(dy, dhlast, x, dt, A, B, C, D, z, dt_bias, seq_idx, hck, dt_softplus, want_dh0, config):
    dh0 = hck.new_empty((x.shape[0], x.shape[2], A.shape[1])) if want_dh0 else x.new_empty(0)
    return fake_grads((x, dt, A, B, C, D, z, dt_bias), [True] * 8) + [dh0]


def _scan_setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, return_final_state, save_chunks, config = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, output[2])
    ctx.dt_softplus, ctx.config, ctx.return_final_state = dt_softplus, config, return_final_state
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype


def _scan_backward(ctx, dy, dhlast, _dhck):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, hck = ctx.saved_tensors
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(x)
    want_dh0 = ctx.h0_dtype is not None and ctx.needs_input_grad[8]
    grads = _scan_bwd_op(dy, dhlast if ctx.return_final_state else None, x, dt, A, B, C, D, z, dt_bias, seq_idx, hck,
                         ctx.dt_softplus, want_dh0, ctx.config)
    present = (True, True, True, True, True, D is not None, z is not None, dt_bias is not None, want_dh0)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = unpack_grads(grads, present)
    if dh0 is not None:
        dh0 = dh0.to(ctx.h0_dtype)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0, None, None, None, None, None


torch.library.register_autograd("mambakit::selective_scan_fwd", _scan_backward, setup_context=_scan_setup_context)


def selective_scan_triton(
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
    config: ScanConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton selective scan; arguments as in `mambakit.ops.selective_scan` (inputs already checked).

    Args:
        x, dt, z: (batch, seqlen, dim).   A: (dim, dstate) real.   B, C: (batch, seqlen, ngroups, dstate).
        D, dt_bias: (dim,).   initial_state: (batch, dim, dstate).   seq_idx: (batch, seqlen) int.
        config: tiling override (benchmarks, tests); None picks from the shape.
    Returns:
        y (batch, seqlen, dim) in x's dtype, and the (batch, dim, dstate) float32 final state when asked
        (float64 for float64 inputs, which run the kernels in float64).

    Example:
        >>> y = selective_scan_triton(x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    """
    if A.is_complex():
        raise ValueError("selective_scan_triton: complex A is not supported; use backend 'reference' or 'torch'")
    cfg = config or ScanConfig()
    if cfg.chunk % 4 or (cfg.block_u is not None and cfg.chunk % cfg.block_u):
        raise ValueError(f"selective_scan_triton: chunk={cfg.chunk} must be a multiple of 4 and of "
                         f"block_u={cfg.block_u}")
    if cfg.time_chunks is not None and cfg.time_chunks < 1:
        raise ValueError(f"selective_scan_triton: time_chunks={cfg.time_chunks} must be >= 1 (or None)")
    red = cfg.bwd_reduce_channels
    if red is not None and (red < 1 or red & (red - 1)):
        raise ValueError(f"selective_scan_triton: bwd_reduce_channels={red} must be a power of two (or None)")
    if cfg.bwd_time_chunks is not None and cfg.bwd_time_chunks < 1:
        raise ValueError(f"selective_scan_triton: bwd_time_chunks={cfg.bwd_time_chunks} must be >= 1 (or None)")
    if cfg.bwd_replicas < 1:
        raise ValueError(f"selective_scan_triton: bwd_replicas={cfg.bwd_replicas} must be >= 1")
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_state)
    save_chunks = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, hlast, _ = _scan_fwd_op(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus, return_final_state,
                               save_chunks, cfg.as_ints())
    return (y, hlast) if return_final_state else y
