"""Triton kernels of the selective scan's backward (Mamba-1 "S6"), with recomputation.

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate, K = L / CHUNK checkpoints.
Tiles: see triton_scan_tile.py (NL <= 4 float32 states per thread here: one 128-bit vector load).

Per program, checkpoint intervals in reverse (`scan_bwd_kernel`):
    pass A  re-walks the interval forward from its checkpoint, keeping h every U steps in a per-program
            scratch buffer (L2 sized) and dt', sigma(v) of each step in a per-program stash;
    pass B  walks the interval's U-step blocks in reverse: re-derives the block's U states in registers
            from the scratch, then runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} through
            them, emitting dx, ddt, dz per step, dB_t / dC_t (summed over the program's channels, then
            atomically added across programs), and accumulating dA, dD, ddt_bias in registers.
A time-parallel backward first runs the adjoint alone over its carry segments (`scan_bwd_carry_kernel`),
chained by the forward's `seg_combine_kernel` into the carry entering each backward segment.
All math is float32 (float64 for float64 inputs); exponentials are exp2 with A pre-scaled by log2(e).
Each block's inputs are loaded one block ahead, before the stores that could alias them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_launch import fast_launch
from ..triton_math import LOG2E, dt_softplus_sigmoid, fast_sigmoid, prefetch_l2
from .triton_scan_tile import (entering_carry_index, load_bc, load_rows, load_tile_rows, store_tile_rows,
                               tile_index, time_offset)

__all__ = ["scan_bwd_carry_kernel", "scan_bwd_kernel"]

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _bwd_block_inputs(j, t0, tn, x_b, B_b, seq_b, scr_b, stash_b, C_b, z_b, dy_b, s_t, s_zt, s_Bt, s_yt, s_st,
                      d1, dl, n2, n_ok2, scr_off, BD: tl.constexpr, BN: tl.constexpr, U: tl.constexpr,
                      HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr, EVEN_N: tl.constexpr,
                      I64: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, NL: tl.constexpr, NH: tl.constexpr):
    """Everything pass B reads for micro-block j before its first store: the state entering the
    block, x / B / dt' of its U steps, seq_idx, and the reverse inputs of its last step."""
    tb = t0 + j * U
    if ROWS:  # scratch as (state, channel) rows
        h = load_tile_rows(scr_b + j * (BD * BN), BD, 1, dl, BN, NL, NH, BD, ACC)
    else:
        h = tl.load(scr_b + (j * (BD * BN) + scr_off))
    s_prev = tl.load(seq_b + time_offset(tl.maximum(tb - 1, 0), I64) * s_st) if HAS_SEQ else 0
    steps = ()
    for u in tl.static_range(U):
        to = time_offset(tl.minimum(tb + u, tn - 1), I64)
        x = tl.load(x_b + (to * s_t + d1)).to(ACC)
        Bv = load_bc(B_b, to * s_Bt, n2, n_ok2, EVEN_N).to(ACC)
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
    to = time_offset(tl.minimum(t, tn - 1), I64)
    Cv = load_bc(C_b, to * s_Bt, n2, n_ok2, EVEN_N).to(ACC)
    dout = tl.where(t < tn, tl.load(dy_b + (to * s_yt + d1)).to(ACC), 0.0)
    zo = to * s_zt + d1
    zf = tl.load(z_b + zo).to(ACC) if HAS_Z else dout
    sig = tl.load(stash_b + (sig_row * BD + dl)) if SOFTPLUS else dout
    return Cv, dout, zf, sig, zo


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
                      A, Dv, s_gn, d1, dl, n2, n_ok2, dx_b, ddt_b, dz_b, dB_l, dC_l, s_t, s_dzt,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, I64: tl.constexpr,
                      LIBDEVICE: tl.constexpr, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr,
                      RED_CH: tl.constexpr, ROWS: tl.constexpr, DZ_AT: tl.constexpr):
    """Adjoint of step t: takes g_{t+1} a_{t+1} (`carry`), returns a_t g_t and the updated sums."""
    Cv, dout, zf, sig, zo = rev
    # t < tn as a (BD,) vector, not a scalar: Triton 3.9's interpreter rejects a broadcast scalar
    # comparison as a store / atomic mask (the compiled predicate is the same)
    valid = dl * 0 + t < tn  # (BD,)
    Cv = Cv[:, :, None]
    xo = time_offset(t, I64) * s_t + d1  # x / dx / ddt offset of step t
    y = tl.sum(tl.sum(h_t * Cv, axis=0), axis=0)  # pre-gate output, recomputed (not stored by the forward)
    if HAS_D:
        y += Dv * x
    if HAS_Z:
        sz = fast_sigmoid(zf, LIBDEVICE)
        # dz at x's offsets (DZ_AT 0), z's (1: the z half of the fused op's d xz) or strides of its own (2)
        dzo = xo if DZ_AT == 0 else zo if DZ_AT == 1 else time_offset(t, I64) * s_dzt + d1
        tl.store(dz_b + dzo, (dout * y * sz * (1.0 + zf * (1.0 - sz))).to(dz_b.dtype.element_ty), mask=valid)
        dy = dout * zf * sz
    else:
        dy = dout
    gt = Cv * dy[None, None, :] + carry  # dL/dh_t
    S1 = tl.sum(tl.sum(gt * Bv[:, :, None], axis=0), axis=0)  # sum_n g B: for dx and ddt'
    q = gt * a * h_p  # dL/da_t * a_t
    S2 = tl.sum(tl.sum(q * A, axis=0), axis=0)
    if ROWS:  # A is A log2(e) here (one (NL, NH, BD) tile of registers fewer): back to natural units
        S2 = S2 * LN2
    dA_acc += q * delta[None, None, :]
    # dB_t, dC_t: sums over channels, first over groups of RED_CH channel lanes (shuffles), then over the
    # groups and programs through float32 atomics, each group into its own replica (`rep_off`). A group's
    # sum is broadcast back over its lanes and added by its first lane only: the atomic then keeps the
    # loop's layout (a (NL, NH) atomic would go through shared memory and two barriers). RED_CH = 1 needs
    # no shuffle at all and issues as many atomic instructions (one per warp), moving 8x the bytes.
    # dB_l / dC_l: (BD,) pointers to row (b, 0, g) of each lane's replica; s_gn = ngroups * dstate
    row = (time_offset(t, I64) * s_gn + n2)[:, :, None]
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
        to = time_offset(tl.minimum(tb + u, tn - 1), I64)
        xo = to * s_t + d1
        x = tl.load(x_b + xo).to(ACC)
        dtv = tl.load(dt_b + xo).to(ACC)
        Bv = load_bc(B_b, to * s_Bt, n2, n_ok2, EVEN_N).to(ACC)
        s = tl.load(seq_b + to * s_st) if HAS_SEQ else 0
        steps = steps + ((x, dtv, Bv, s),)
    return steps


@triton.jit
def _carry_inputs(t, dt_b, z_b, C_b, dy_b, seq_b, s_t, s_zt, s_Bt, s_yt, s_st, d1, n2, n_ok2,
                  HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr, I64: tl.constexpr):
    """dt, z, dy (BD,), C (NL, NH) and seq_idx[t] vs seq_idx[t - 1] of step t (t >= 1) for the adjoint pass."""
    to = time_offset(t, I64)
    dtv = tl.load(dt_b + (to * s_t + d1))
    dout = tl.load(dy_b + (to * s_yt + d1))
    zf = tl.load(z_b + (to * s_zt + d1)) if HAS_Z else dout
    Cv = load_bc(C_b, to * s_Bt, n2, n_ok2, EVEN_N)
    if HAS_SEQ:
        restart = tl.load(seq_b + to * s_st) != tl.load(seq_b + (to - 1) * s_st)
    else:
        restart = False
    return dtv, zf, dout, Cv, restart


@fast_launch
@triton.jit
def scan_bwd_carry_kernel(
    dt_ptr, z_ptr, C_ptr, A_ptr, bias_ptr, seq_ptr, dy_ptr, cl_ptr, sdt_ptr, keep_ptr,
    seqlen, seg_len, nseg, dim, dstate, group_size,
    s_b, s_zb, s_zt, s_t, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_yb, s_yt,
    NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, EVEN_N: tl.constexpr,
    LIBDEVICE: tl.constexpr, I64: tl.constexpr, PREFETCH: tl.constexpr,
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
    PREFETCH > 0 (`ScanConfig.carry_prefetch`): each step asks the L2 for the dt / dy / z rows PREFETCH steps
    earlier, which the loop reaches later (it walks back in time).
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2) + 1
    p = seg * seg_len
    q = tl.minimum(p + seg_len, seqlen)
    dl, d1, n2, n_ok2, n3, d3, n_ok3, g = tile_index(pid_d, dstate, group_size, NL, NH, BD)
    A2 = load_rows(A_ptr, s_An, s_Ad, d1, n3, dstate, NL, NH, BD, ACC) * LOG2E
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
        if PREFETCH > 0:
            ahead = time_offset(tl.maximum(t - PREFETCH, p), I64)
            prefetch_l2(dt_b + (ahead * s_t + d1))
            prefetch_l2(dy_b + (ahead * s_yt + d1))
            if HAS_Z:
                prefetch_l2(z_b + (ahead * s_zt + d1))
        delta, _ = dt_softplus_sigmoid(dtv.to(ACC), bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
        dy = dout.to(ACC)
        if HAS_Z:
            zz = zf.to(ACC)
            dy = dy * zz * fast_sigmoid(zz, LIBDEVICE)
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
def scan_bwd_kernel(
    x_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, seq_ptr, hck_ptr, dy_ptr, dhlast_ptr, cin_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr, scr_ptr, stash_ptr,
    seqlen, dim, dstate, group_size, nchunks, seg_len, nseg, cin_n, cin_k, rep_stride,
    s_b, s_t, s_zb, s_zt, s_Bb, s_Bt, s_Bg, s_sb, s_st, s_Ad, s_An, s_yb, s_yt, s_dzb, s_dzt,
    NREP: tl.constexpr, RED_CH: tl.constexpr, CHUNK: tl.constexpr, U: tl.constexpr, NL: tl.constexpr,
    NH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DHLAST: tl.constexpr,
    WANT_DH0: tl.constexpr, EVEN_N: tl.constexpr, LIBDEVICE: tl.constexpr, I64: tl.constexpr,
    SEGMENTED: tl.constexpr, ROWS: tl.constexpr, DZ_AT: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Backward over time segment pid_c = chunks [pid_c * seg_len / CHUNK, ...) of one batch row (the whole
    sequence when nseg == 1), chunks in reverse. SEGMENTED: the carry entering the segment's last step comes
    from cin (B, cin_n, D, N) (`scan_bwd_carry_kernel` + the segment combine, cin_k carry segments per one);
    otherwise from dL/dh_final (HAS_DHLAST) or zero.

    ROWS (the "wide" variants, NL > 4 states per thread, see scan_policy.BWD_VARIANTS): the (D, N)-shaped tiles
    (A, checkpoints, entering carry, the per-program scratch) move one in-thread state row at a time instead of
    as NL-float vectors, so that no load anchors a layout with fewer states per thread than the loop's; the
    scratch is then laid out (block, state, channel) so that each row is one coalesced access.

    PREFETCH > 0 (`ScanConfig.bwd_prefetch`; off by default: on an H100 it made the scan alone 1-2% faster and the
    training step slower): pass A asks the L2 for the x / dt rows PREFETCH steps ahead and for the dy / z rows of its
    own steps, which pass B reads next (Nsight Compute, session 35: the kernel's top stalls wait on those loads)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    prog = (pid_b * nseg + pid_c) * tl.num_programs(0) + pid_d
    dl, d1, n2, n_ok2, n3, d3, n_ok3, g = tile_index(pid_d, dstate, group_size, NL, NH, BD)
    ngroups = dim // group_size
    # (D, N) and (B, *, D, N) tiles load as NL contiguous floats per thread: with NL <= 4 that vector
    # load has exactly the scan loop's layout (NL in-thread), so these anchors cost no conversion
    if ROWS:
        A = load_tile_rows(A_ptr, s_An, s_Ad, d1, dstate, NL, NH, BD, ACC)
    else:
        A = tl.load(A_ptr + d3 * s_Ad + n3 * s_An, mask=n_ok3, other=0.0).to(ACC)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + d1).to(ACC) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d1).to(ACC) if HAS_BIAS else 0.0
    x_b = x_ptr + pid_b * s_b
    dt_b = dt_ptr + pid_b * s_b
    dx_b = dx_ptr + pid_b * s_b
    ddt_b = ddt_ptr + pid_b * s_b
    dz_b = dz_ptr + pid_b * s_dzb
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
    # ROWS with U = 1: the scratch holds the state entering every step plus the one after the last, so pass B takes
    # each step's resulting state from the step after it instead of re-deriving it (2 instructions per element)
    KEEP_ALL: tl.constexpr = ROWS and U == 1
    scr_b = scr_ptr + prog * (CHUNK // U + (1 if ROWS and U == 1 else 0)) * BD * BN  # h every U steps of the chunk
    scr_off = dl[None, None, :] * BN + n3
    stash_b = stash_ptr + prog * CHUNK * 2 * BD  # dt' and sigmoid(dt + bias) of each step of the chunk
    st_off = (pid_b * dim + d3) * dstate + n3
    if SEGMENTED:
        r = entering_carry_index(pid_c, cin_n, cin_k)
        if ROWS:
            carry = load_tile_rows(cin_ptr + (pid_b * cin_n + r) * dim * dstate, 1, dstate, d1, dstate, NL, NH, BD,
                                   ACC)
        else:
            cin_off = ((pid_b * cin_n + r) * dim + d3) * dstate + n3
            carry = tl.load(cin_ptr + cin_off, mask=n_ok3, other=0.0).to(ACC)
    elif HAS_DHLAST:
        if ROWS:
            carry = load_tile_rows(dhlast_ptr + pid_b * dim * dstate, 1, dstate, d1, dstate, NL, NH, BD, ACC)
        else:
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
        if ROWS:
            h = load_tile_rows(hck_ptr + (pid_b * nchunks + c) * dim * dstate, 1, dstate, d1, dstate, NL, NH, BD, ACC)
        else:
            h = tl.load(hck_ptr + ((pid_b * nchunks + c) * dim + d3) * dstate + n3, mask=n_ok3, other=0.0)
        s_prev = tl.load(seq_b + time_offset(tl.maximum(t0 - 1, 0), I64) * s_st) if HAS_SEQ else 0
        nxt = _pass_a_inputs(t0, tn, x_b, dt_b, B_b, seq_b, s_t, s_Bt, s_st, d1, n2, n_ok2, U, HAS_SEQ, EVEN_N,
                             I64, ACC)
        for j in range(0, nblk):
            cur = nxt
            nxt = _pass_a_inputs(t0 + (j + 1) * U, tn, x_b, dt_b, B_b, seq_b, s_t, s_Bt, s_st, d1, n2, n_ok2, U,
                                 HAS_SEQ, EVEN_N, I64, ACC)
            if PREFETCH > 0:
                for u in tl.static_range(U):
                    ahead = time_offset(tl.minimum(t0 + j * U + PREFETCH + u, tn - 1), I64) * s_t + d1
                    prefetch_l2(x_b + ahead)
                    prefetch_l2(dt_b + ahead)
                    own = time_offset(tl.minimum(t0 + j * U + u, tn - 1), I64)
                    prefetch_l2(dy_b + (own * s_yt + d1))
                    if HAS_Z:
                        prefetch_l2(z_b + (own * s_zt + d1))
            if ROWS:
                store_tile_rows(scr_b + j * (BD * BN), h, BD, 1, dl, BN, NL, NH, BD)
            else:
                tl.store(scr_b + (j * (BD * BN) + scr_off), h)
            for u in tl.static_range(U):
                x, dtv, Bv, s = cur[u]
                valid = t0 + j * U + u < tn
                delta, sig = dt_softplus_sigmoid(dtv, bias, HAS_BIAS, SOFTPLUS, LIBDEVICE)
                delta = tl.where(valid, delta, 0.0)
                tl.store(stash_b + (((j * U + u) * 2) * BD + dl), delta)
                if SOFTPLUS:
                    tl.store(stash_b + (((j * U + u) * 2 + 1) * BD + dl), sig)
                a = tl.exp2(delta[None, None, :] * A2)
                if HAS_SEQ:
                    a = tl.where((s == s_prev) | (~valid), a, 0.0)
                    s_prev = s
                h = a * h + (delta * x)[None, None, :] * Bv[:, :, None]
        if KEEP_ALL:  # the state after the interval's last step, for pass B's first (last) step
            store_tile_rows(scr_b + nblk * (BD * BN), h, BD, 1, dl, BN, NL, NH, BD)
        tl.debug_barrier()  # scratch written by some lanes is read by others
        # pass B: U-step blocks in reverse; each re-derives its U states in registers, then runs the
        # adjoint through them. Block inputs come one block ahead, reverse inputs one step ahead.
        nxt_b = _bwd_block_inputs(nblk - 1, t0, tn, x_b, B_b, seq_b, scr_b, stash_b, C_b, z_b, dy_b, s_t, s_zt,
                                  s_Bt, s_yt, s_st, d1, dl, n2, n_ok2, scr_off, BD, BN, U, HAS_Z, HAS_SEQ, SOFTPLUS,
                                  EVEN_N, I64, ACC, ROWS, NL, NH)
        if KEEP_ALL:
            h_after = load_tile_rows(scr_b + nblk * (BD * BN), BD, 1, dl, BN, NL, NH, BD, ACC)
        else:
            h_after = carry  # unused
        for jj in range(0, nblk):
            j = nblk - 1 - jj
            tb = t0 + j * U
            h_in, s_prev, steps, rev = nxt_b
            nxt_b = _bwd_block_inputs(tl.maximum(j - 1, 0), t0, tn, x_b, B_b, seq_b, scr_b, stash_b, C_b, z_b,
                                      dy_b, s_t, s_zt, s_Bt, s_yt, s_st, d1, dl, n2, n_ok2, scr_off, BD, BN, U,
                                      HAS_Z, HAS_SEQ, SOFTPLUS, EVEN_N, I64, ACC, ROWS, NL, NH)
            hs = (h_in,)
            a_s = ()
            for u in tl.static_range(U):
                x, Bv, delta, s = steps[u]
                a = tl.exp2(delta[None, None, :] * A2)
                if HAS_SEQ:
                    a = tl.where((s == s_prev) | (tb + u >= tn), a, 0.0)
                    s_prev = s
                if KEEP_ALL:  # the state after this step is the one entering the next: loaded a step ago
                    hs = hs + (h_after,)
                else:
                    hs = hs + (a * hs[u] + (delta * x)[None, None, :] * Bv[:, :, None],)
                a_s = a_s + (a,)
            if KEEP_ALL:
                h_after = h_in
            for u1 in tl.static_range(U, 0, -1):  # step tb + u1 - 1 (indices stay constexpr inline)
                cur_rev = rev
                if u1 > 1:
                    rev = _bwd_reverse_inputs(tb + u1 - 2, tn, (j * U + u1 - 2) * 2 + 1, C_b, z_b, dy_b, stash_b,
                                              s_zt, s_Bt, s_yt, d1, dl, n2, n_ok2, BD, HAS_Z, SOFTPLUS, EVEN_N,
                                              I64, ACC)
                carry, dA_acc, dD_acc, dbias_acc = _bwd_step_reverse(
                    carry, dA_acc, dD_acc, dbias_acc, tb + u1 - 1, tn, hs[u1], hs[u1 - 1],
                    a_s[u1 - 1], steps[u1 - 1][0], steps[u1 - 1][2], steps[u1 - 1][1], cur_rev,
                    A2 if ROWS else A, Dv, ngroups * dstate, d1, dl, n2, n_ok2, dx_b, ddt_b, dz_b, dB_l, dC_l, s_t,
                    s_dzt,
                    HAS_D, HAS_Z,
                    SOFTPLUS, I64, LIBDEVICE,
                    NL, NH, BD, RED_CH, ROWS, DZ_AT)
        tl.debug_barrier()  # the next chunk's pass A overwrites the scratch this pass read
    if WANT_DH0:
        tl.store(dh0_ptr + st_off, carry, mask=n_ok3 & (d3 * 0 + pid_c == 0))
    # full-shape mask: Triton's interpreter drops all but the first element of an all-ones-shape mask
    tl.atomic_add(dA_ptr + d3 * dstate + n3, dA_acc, mask=n_ok3 & (d3 >= 0), sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + d1, dD_acc, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d1, dbias_acc, sem="relaxed")

