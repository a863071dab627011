"""Backward of the SSD chunk output and chunk states: dCB, dB and dC per group, dx / ddt / dz per head.

Shapes (legend): b batch, L seqlen, H nheads, P headdim, G ngroups, R = H / G, N dstate, c chunks,
T chunk_size, BM the row block, nblk = T / BM. Within a chunk (one head), with dY = dy * silu(z),
Xd_j = dt'_j x_j, M[i, j] = CB[i, j] exp(cs_i - cs_j) (causal, same document), dH the gradient of the
chunk-end state (`chunk_state_bwd`), h the incoming state:

    dXd_j  = sum_{i >= j} M[i, j] dY_i + exp(cs_end - cs_j) dH B_j          -> dx = dt' dXd + D dY
    dCB    = sum_heads (dY Xd^T) o exp(cs_i - cs_j)                        -> dC += dCB B, dB += dCB^T C
    dC_i  += sum_heads exp(cs_i) dY_i h ;   dB_j += sum_heads exp(cs_end - cs_j) Xd_j dH

The log-decay cumsum cs enters y through differences only, which gives its gradient cheaply:

    dcs_i = dY_i . y_ssm_i - Xd_i . dXd_i + [i = T - 1] <dH, h_end>

Its terms are large and cancel (and the reverse cumsum da_j = sum_{i >= j} dcs_i, weighted by the running sum
of dt' in dA, amplifies what is left), so each cancelling pair is taken from one set of fp32 numbers:

  * intra-chunk: with the fp32 tile S[i, j] = (dY_i . Xd_j) M[i, j] (`_chunk_dcb_kernel`, decay applied after
    the dot), dY_i . y_diag_i = sum_j S[i, j] and Xd_j . dXd_diag_j = sum_i S[i, j]: row sums minus column
    sums of S. (The dx kernel's dXd dot rounds the decayed C B^T tile to bf16 first; it serves dx and ddt,
    not dcs.)
  * inter-chunk: dY_i . y_off_i = C_i . dC_off_i (`_chunk_dbc_kernel`); <dH, h_end> = exp(cs_end) <dH, h_in>
    (`chunk_state_bwd`) + <dH, S_c>, and <dH, S_c> = sum_i Xd_i . dXo_i (dXo = exp(cs_end - cs_i) dH B_i, dXd's
    inter-chunk part) is summed by the dx kernel from the very row terms it subtracts:

    da_j = sum_{i >= j} (rowsum_i S - colsum_i S + C_i . dC_off_i) + exp(cs_end) <dH, h_in>
           + sum_{i < j} Xd_i . dXo_i

The row parts go through `rowp` (b, H, c, nslot, T), slots 0..nblk-1 from the dcb kernel (its tile (i, j), i > j,
writes its row sums to slot j at rows of block i and minus its column sums to slot i at rows of block j; the
diagonal tile both, to slot i: every slot of every row is written once) and slots nblk.. from the dbc kernel (one
per N block). The dx kernel sums them, runs the cumsums and the chain rule through dt' = clamp(softplus(dt +
bias)) and a = dt' A, so the cumulative-decay stage needs no kernel of its own.

Kernels: `_chunk_dcb_kernel` (one (i, j) tile per program, heads of a group summed in registers),
`_chunk_dbc_kernel` (one row block per program: dC and dB of the group, finished), `_chunk_dx_kernel`
(one (b, c, h) per program, row blocks from the first to the last, da at the block's first row a carry).
Nothing here reads a per-head copy of B or C, and dB, dC are written once, already summed over heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import LOG2E, dt_transform_grad, silu, silu_grad
from .triton_common import kernel_flags, mm, to_dtype

__all__ = ["chunk_dcb_bwd", "chunk_dbc_bwd", "chunk_dx_bwd", "bwd_config"]


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_dcb_kernel(
    x_ptr, dy_ptr, z_ptr, dtp_ptr, cs_ptr, seq_ptr, cb_ptr, dcb_ptr, rowp_ptr,
    seqlen, nheads, nchunks, headdim, hpg, ngroups, nslot,
    s_x_b, s_x_l, s_x_h, s_dy_b, s_dy_l, s_dy_h, s_z_b, s_z_l, s_z_h, s_seq_b,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j > pid_i:
        return
    pid_bcg = tl.program_id(2)
    g = pid_bcg % ngroups
    c = (pid_bcg // ngroups) % nchunks
    b = tl.cast(pid_bcg // (ngroups * nchunks), tl.int64)
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = c * T + rows < seqlen
    cmask = c * T + cols < seqlen
    chunk0 = tl.cast(c * T, tl.int64)
    keep = rows[:, None] >= cols[None, :]
    if HAS_SEQ:
        seq_r = tl.load(seq_ptr + b * s_seq_b + c * T + rows, mask=rmask, other=0)
        seq_c = tl.load(seq_ptr + b * s_seq_b + c * T + cols, mask=cmask, other=0)
        keep &= seq_r[:, None] == seq_c[None, :]
    tile = ((b * nchunks + c) * ngroups + g) * T * T + rows[:, None] * T + cols[None, :]
    cb = tl.load(cb_ptr + tile)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for r in range(hpg):
        h = g * hpg + r
        dc_ptr = ((b * nheads + h) * nchunks + c) * T
        cs2_r = tl.load(cs_ptr + dc_ptr + rows) * LOG2E  # exp(a - b) = exp2(a log2(e) - b log2(e))
        cs2_c = tl.load(cs_ptr + dc_ptr + cols) * LOG2E
        dtp_c = tl.load(dtp_ptr + dc_ptr + cols)
        dM = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for p0 in range(0, headdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < headdim
            m_r = rmask[:, None] & pmask[None, :]
            dy_r = tl.load(dy_ptr + b * s_dy_b + h * s_dy_h + (chunk0 + rows[:, None]) * s_dy_l + offs_p[None, :],
                           mask=m_r, other=0.0).to(tl.float32)
            if HAS_Z:
                dy_r *= silu(tl.load(z_ptr + b * s_z_b + h * s_z_h + (chunk0 + rows[:, None]) * s_z_l
                                     + offs_p[None, :], mask=m_r, other=0.0).to(tl.float32))
            xT = tl.load(x_ptr + b * s_x_b + h * s_x_h + (chunk0 + cols[None, :]) * s_x_l + offs_p[:, None],
                         mask=pmask[:, None] & cmask[None, :], other=0.0)  # (BP, BM)
            dM = mm(dy_r, xT, dM, OP, EMULATE)
        seg = tl.where(keep, cs2_r[:, None] - cs2_c[None, :], float("-inf"))  # <= 0 where kept
        dG = dM * tl.exp2(seg) * dtp_c[None, :]
        acc += dG
        # intra-chunk part of dcs from this one fp32 tile S[i, j] = (dY_i . Xd_j) M[i, j]: + its row sums at rows i
        # (dY_i . y_diag_i), - its column sums at rows j (dt'_j x_j . dXd_diag_j), so that the two cancel exactly
        # as they should. Slot pid_j takes the rows of block pid_i, slot pid_i the columns of block pid_j (the
        # diagonal tile: both, one store); every slot < nblk of every row is written by exactly one tile.
        S = dG * cb
        slots = ((b * nheads + h) * nchunks + c) * nslot
        if pid_i == pid_j:
            tl.store(rowp_ptr + (slots + pid_j) * T + rows, tl.sum(S, axis=1) - tl.sum(S, axis=0))
        else:
            tl.store(rowp_ptr + (slots + pid_j) * T + rows, tl.sum(S, axis=1))
            tl.store(rowp_ptr + (slots + pid_i) * T + cols, -tl.sum(S, axis=0))
    tl.store(dcb_ptr + tile, acc)


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_dbc_kernel(
    x_ptr, dy_ptr, z_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, seq_ptr, states_ptr, dH_ptr, dcb_ptr, rowp_ptr,
    dB_ptr, dC_ptr,
    seqlen, nheads, nchunks, headdim, dstate, hpg, ngroups, nslot,
    s_x_b, s_x_l, s_x_h, s_dy_b, s_dy_l, s_dy_h, s_z_b, s_z_l, s_z_h,
    s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g, s_seq_b,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bcg = tl.program_id(2)
    nblk = T // BLOCK_M
    g = pid_bcg % ngroups
    c = (pid_bcg // ngroups) % nchunks
    b = tl.cast(pid_bcg // (ngroups * nchunks), tl.int64)
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < dstate
    rmask = c * T + rows < seqlen
    rn_mask = rmask[:, None] & nmask[None, :]
    chunk0 = tl.cast(c * T, tl.int64)
    C_base = C_ptr + b * s_C_b + g * s_C_g + chunk0 * s_C_l + offs_n[None, :]
    B_base = B_ptr + b * s_B_b + g * s_B_g + chunk0 * s_B_l + offs_n[None, :]
    C_r = tl.load(C_base + rows[:, None] * s_C_l, mask=rn_mask, other=0.0).to(tl.float32)
    if HAS_SEQ:
        seq_r = tl.load(seq_ptr + b * s_seq_b + c * T + rows, mask=rmask, other=0)
        seq_prev = tl.load(seq_ptr + b * s_seq_b + tl.maximum(c * T - 1, 0))
        seq_end = tl.load(seq_ptr + b * s_seq_b + tl.minimum(c * T + T - 1, seqlen - 1))
    PN = headdim * dstate
    accC = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    accB = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # incoming-state and chunk-end-state paths: a reduction over the R heads of the group (K = R * P)
    for r in range(hpg):
        h = g * hpg + r
        dc_ptr = ((b * nheads + h) * nchunks + c) * T
        cs_r = tl.load(cs_ptr + dc_ptr + rows)
        dtp_r = tl.load(dtp_ptr + dc_ptr + rows)
        cs_end = tl.load(cs_ptr + dc_ptr + T - 1)
        w_in = tl.exp(cs_r)  # exponents <= 0
        w_out = tl.exp(cs_end - cs_r) * dtp_r
        if HAS_SEQ:
            w_in = tl.where(seq_r == seq_prev, w_in, 0.0)
            w_out = tl.where(seq_r == seq_end, w_out, 0.0)
        st_base = ((b * (nchunks + 1) + c) * nheads + h) * PN + offs_n[None, :]
        dH_base = ((b * nchunks + c) * nheads + h) * PN + offs_n[None, :]
        dCo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p0 in range(0, headdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < headdim
            m_r = rmask[:, None] & pmask[None, :]
            m_pn = pmask[:, None] & nmask[None, :]
            dy_r = tl.load(dy_ptr + b * s_dy_b + h * s_dy_h + (chunk0 + rows[:, None]) * s_dy_l + offs_p[None, :],
                           mask=m_r, other=0.0).to(tl.float32)
            if HAS_Z:
                dy_r *= silu(tl.load(z_ptr + b * s_z_b + h * s_z_h + (chunk0 + rows[:, None]) * s_z_l
                                     + offs_p[None, :], mask=m_r, other=0.0).to(tl.float32))
            x_r = tl.load(x_ptr + b * s_x_b + h * s_x_h + (chunk0 + rows[:, None]) * s_x_l + offs_p[None, :],
                          mask=m_r, other=0.0).to(tl.float32)
            h_in = tl.load(states_ptr + st_base + offs_p[:, None] * dstate, mask=m_pn, other=0.0)  # (BP, BN)
            dH = tl.load(dH_ptr + dH_base + offs_p[:, None] * dstate, mask=m_pn, other=0.0)
            dCo = mm(dy_r, h_in, dCo, OP, EMULATE)
            accB = mm(x_r * w_out[:, None], dH, accB, OP, EMULATE)
        dCo = dCo * w_in[:, None]
        accC += dCo
        # this head's dY_i . y_off_i = C_i . dC_off_i (partial over this program's N block)
        tl.store(rowp_ptr + (((b * nheads + h) * nchunks + c) * nslot + nblk + pid_n) * T + rows,
                 tl.sum(dCo * C_r, axis=1))
    # intra-chunk path: dC_i += sum_{j <= i} dCB[i, j] B_j ; dB_i += sum_{k >= i} dCB[k, i]^T C_k
    dcb_base = dcb_ptr + ((b * nchunks + c) * ngroups + g) * T * T
    for j in range(0, pid_r + 1):
        cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
        dcb = tl.load(dcb_base + rows[:, None] * T + cols[None, :])
        B_j = tl.load(B_base + cols[:, None] * s_B_l, mask=(c * T + cols < seqlen)[:, None] & nmask[None, :],
                      other=0.0)
        accC = mm(dcb, B_j, accC, OP, EMULATE)
    for k in range(pid_r, nblk):
        rows_k = k * BLOCK_M + tl.arange(0, BLOCK_M)
        dcbT = tl.load(dcb_base + rows_k[None, :] * T + rows[:, None])  # (BM rows of B, BM rows of C)
        C_k = tl.load(C_base + rows_k[:, None] * s_C_l, mask=(c * T + rows_k < seqlen)[:, None] & nmask[None, :],
                      other=0.0)
        accB = mm(dcbT, C_k, accB, OP, EMULATE)
    out = ((b * seqlen + chunk0 + rows[:, None]) * ngroups + g) * dstate + offs_n[None, :]
    tl.store(dC_ptr + out, to_dtype(accC, dC_ptr.dtype.element_ty, EMULATE), mask=rn_mask)
    tl.store(dB_ptr + out, to_dtype(accB, dB_ptr.dtype.element_ty, EMULATE), mask=rn_mask)


@triton.jit
def _dxd_tile(cb_base, cs_row, dy_base, z_base, ib, rows, cs2_j, offs_p, pmask, chunk0, seqlen, s_dy_l, s_z_l, acc,
              T: tl.constexpr, BLOCK_M: tl.constexpr, DIAG: tl.constexpr, HAS_Z: tl.constexpr, OP: tl.constexpr,
              EMULATE: tl.constexpr):
    """acc + M[i, j]^T dY_i over the rows i of block ib, for the rows j (`rows`) of the dx kernel's block:
    M[i, j] = CB[i, j] exp(cs_i - cs_j), as exp2 of log2(e)-scaled cumsums (cs2_j: the rows' own). DIAG: the
    tile on the diagonal, masked to i >= j (above that the exponent is > 0: it may overflow, and inf times CB's
    zero there is NaN); below the diagonal every i > j and cs_i <= cs_j, so no mask and no exponent > 0."""
    rows_i = ib * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = (chunk0 + rows_i < seqlen)[:, None] & pmask[None, :]
    cbT = tl.load(cb_base + rows_i[None, :] * T + rows[:, None])  # (BM j, BM i) = CB[i, j]^T
    seg = tl.load(cs_row + rows_i)[None, :] * LOG2E - cs2_j[:, None]
    if DIAG:
        seg = tl.where(rows_i[None, :] >= rows[:, None], seg, float("-inf"))
    dy_i = tl.load(dy_base + rows_i[:, None] * s_dy_l + offs_p[None, :], mask=m_i, other=0.0)
    if HAS_Z:
        dy_i = dy_i.to(tl.float32) * silu(tl.load(z_base + rows_i[:, None] * s_z_l + offs_p[None, :],
                                                   mask=m_i, other=0.0).to(tl.float32))
    return mm(cbT * tl.exp2(seg), dy_i, acc, OP, EMULATE)


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_dx_kernel(
    x_ptr, dt_ptr, dy_ptr, z_ptr, ypre_ptr, A_ptr, bias_ptr, D_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, cb_ptr,
    dH_ptr, rowp_ptr, ddend_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dbias_ptr, dD_ptr,
    seqlen, nheads, nchunks, headdim, dstate, hpg, ngroups, nslot, n_pn, lo, hi,
    s_x_b, s_x_l, s_x_h, s_dt_b, s_dt_l, s_dt_h, s_dy_b, s_dy_l, s_dy_h, s_z_b, s_z_l, s_z_h,
    s_B_b, s_B_l, s_B_g, s_seq_b, s_dx_l,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_PN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_D: tl.constexpr,
    D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    OP: tl.constexpr, EMULATE: tl.constexpr,
):
    h = tl.program_id(0)
    pid_bc = tl.program_id(1)
    nblk = T // BLOCK_M
    g = h // hpg
    c = pid_bc % nchunks
    b = tl.cast(pid_bc // nchunks, tl.int64)
    chunk0 = tl.cast(c * T, tl.int64)
    bhc = (b * nheads + h) * nchunks + c
    dc_ptr = bhc * T
    cs_end = tl.load(cs_ptr + dc_ptr + T - 1)
    A = tl.load(A_ptr + h)
    offs_pn = tl.arange(0, BLOCK_PN)
    dd_in = tl.sum(tl.load(ddend_ptr + bhc * n_pn + offs_pn, mask=offs_pn < n_pn, other=0.0))
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h)
    if HAS_SEQ:
        seq_end = tl.load(seq_ptr + b * s_seq_b + tl.minimum(c * T + T - 1, seqlen - 1))
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < dstate
    PN = headdim * dstate
    dH_base = dH_ptr + ((b * nchunks + c) * nheads + h) * PN + offs_n[:, None]
    cb_base = cb_ptr + ((b * nchunks + c) * ngroups + g) * T * T
    x_base = x_ptr + b * s_x_b + h * s_x_h + chunk0 * s_x_l
    dy_base = dy_ptr + b * s_dy_b + h * s_dy_h + chunk0 * s_dy_l
    z_base = z_ptr + b * s_z_b + h * s_z_h + chunk0 * s_z_l
    out_base = (b * seqlen + chunk0) * nheads * headdim + h * headdim  # contiguous dz, y_pre
    dx_base = (b * seqlen + chunk0) * s_dx_l + h * headdim  # dx: rows s_dx_l apart (a slice of a wider buffer)

    # da_j = sum_{i >= j} dcs_i with dcs_i = rowp_i - dt'_i x_i . dXo_i + [i = T - 1] (dd_in + <dH, S>), and
    # <dH, S> = sum_i dt'_i x_i . dXo_i (dXo: dXd's inter-chunk part), so
    #     da_j = sum_{i >= j} rowp_i + dd_in + sum_{i < j} dt'_i x_i . dXo_i :
    # the chunk state's two terms cancel exactly (a prefix sum of the row terms, not <dH, h_end> from the
    # bf16 states minus them). Row blocks from the first; carry = da at the current block's first row.
    offs_t = tl.arange(0, T)
    carry = dd_in
    for s in range(0, nslot):
        carry += tl.sum(tl.load(rowp_ptr + (bhc * nslot + s) * T + offs_t))
    dA_acc = 0.0
    dbias_acc = 0.0
    for jb in range(nblk):
        rows = jb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = c * T + rows < seqlen
        cs_j = tl.load(cs_ptr + dc_ptr + rows)
        cs2_j = cs_j * LOG2E
        dtp_j = tl.load(dtp_ptr + dc_ptr + rows)
        w_out = tl.exp(cs_end - cs_j)  # exponent <= 0
        if HAS_SEQ:
            seq_j = tl.load(seq_ptr + b * s_seq_b + c * T + rows, mask=rmask, other=0)
            w_out = tl.where(seq_j == seq_end, w_out, 0.0)
        B_j = tl.load(B_ptr + b * s_B_b + g * s_B_g + (chunk0 + rows[:, None]) * s_B_l + offs_n[None, :],
                      mask=rmask[:, None] & nmask[None, :], other=0.0)
        xdx = tl.zeros((BLOCK_M,), dtype=tl.float32)  # x_j . dXd_j (ddt)
        xdo = tl.zeros((BLOCK_M,), dtype=tl.float32)  # x_j . (its inter-chunk part) (dcs)
        for p0 in range(0, headdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < headdim
            dXd = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
            if HAS_Z:  # one masked loop: peeled like the branch below, the gated kernel spilled 616 bytes a thread
                # for sm_90 (184 as one loop)
                for ib in range(jb, nblk):
                    dXd = _dxd_tile(cb_base, cs_ptr + dc_ptr, dy_base, z_base, ib, rows, cs2_j, offs_p, pmask, c * T,
                                    seqlen, s_dy_l, s_z_l, dXd, T, BLOCK_M, True, HAS_Z, OP, EMULATE)
            else:  # the diagonal tile (causal mask), then the tiles below it (no mask: every i > every j there)
                dXd = _dxd_tile(cb_base, cs_ptr + dc_ptr, dy_base, z_base, jb, rows, cs2_j, offs_p, pmask, c * T,
                                seqlen, s_dy_l, s_z_l, dXd, T, BLOCK_M, True, HAS_Z, OP, EMULATE)
                for ib in range(jb + 1, nblk):
                    dXd = _dxd_tile(cb_base, cs_ptr + dc_ptr, dy_base, z_base, ib, rows, cs2_j, offs_p, pmask, c * T,
                                    seqlen, s_dy_l, s_z_l, dXd, T, BLOCK_M, False, HAS_Z, OP, EMULATE)
            # the inter-chunk part after the loop, not as its accumulator: its own tile is live only until xdo
            dHT = tl.load(dH_base + offs_p[None, :] * dstate, mask=nmask[:, None] & pmask[None, :], other=0.0)
            dXo = mm(B_j, dHT, tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), OP, EMULATE) * w_out[:, None]
            dXd += dXo
            m_j = rmask[:, None] & pmask[None, :]
            x_j = tl.load(x_base + rows[:, None] * s_x_l + offs_p[None, :], mask=m_j, other=0.0).to(tl.float32)
            xdo += tl.sum(dXo * x_j, axis=1)
            dyraw_j = tl.load(dy_base + rows[:, None] * s_dy_l + offs_p[None, :], mask=m_j, other=0.0).to(tl.float32)
            dy_j = dyraw_j
            if HAS_Z:
                z_j = tl.load(z_base + rows[:, None] * s_z_l + offs_p[None, :], mask=m_j, other=0.0).to(tl.float32)
                dy_j = dyraw_j * silu(z_j)
                y_pre = tl.load(ypre_ptr + out_base + rows[:, None] * nheads * headdim + offs_p[None, :],
                                mask=m_j, other=0.0).to(tl.float32)
                tl.store(dz_ptr + out_base + rows[:, None] * nheads * headdim + offs_p[None, :],
                         to_dtype(dyraw_j * y_pre * silu_grad(z_j), dz_ptr.dtype.element_ty, EMULATE), mask=m_j)
            dx = dXd * dtp_j[:, None]
            if HAS_D:
                if D_PER_CHANNEL:
                    dx += tl.load(D_ptr + h * headdim + offs_p, mask=pmask, other=0.0)[None, :] * dy_j
                else:
                    dx += tl.load(D_ptr + h) * dy_j
                # per-channel partial of dD, one row of (b, c, nblk, H, P)
                tl.store(dD_ptr + (((b * nchunks + c) * nblk + jb) * nheads + h) * headdim + offs_p,
                         tl.sum(dy_j * x_j, axis=0), mask=pmask)
            tl.store(dx_ptr + dx_base + rows[:, None] * s_dx_l + offs_p[None, :],
                     to_dtype(dx, dx_ptr.dtype.element_ty, EMULATE), mask=m_j)
            xdx += tl.sum(dXd * x_j, axis=1)
        # dcs_j = dY_j . y_ssm_j - Xd_j . dXd_j but the chunk-end term: the slots hold the intra-chunk part (dcb:
        # row sums - column sums of one fp32 tile) and dY_j . y_off_j (dbc). The bf16 dot above (dXd - dXo) is
        # not used for dcs: its intra-chunk part would not cancel the dcb kernel's row sums (ddt takes it).
        rowp = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s in range(0, nslot):
            rowp += tl.load(rowp_ptr + (bhc * nslot + s) * T + rows)
        dcs = rowp - dtp_j * xdo
        da = carry - (tl.cumsum(dcs, axis=0) - dcs)
        carry -= tl.sum(dcs)
        ddtp = xdx + A * da
        v = tl.load(dt_ptr + b * s_dt_b + (c * T + rows) * s_dt_l + h * s_dt_h, mask=rmask, other=0.0)
        v = v.to(tl.float32)
        if HAS_BIAS:
            v += bias
        ddt = tl.where(rmask, ddtp * dt_transform_grad(v, lo, hi, SOFTPLUS, HAS_LIMIT), 0.0)
        tl.store(ddt_ptr + (b * seqlen + c * T + rows) * nheads + h, to_dtype(ddt, ddt_ptr.dtype.element_ty, EMULATE),
                 mask=rmask)
        dA_acc += tl.sum(dtp_j * da)
        dbias_acc += tl.sum(ddt)
    tl.store(dA_ptr + (b * nchunks + c) * nheads + h, dA_acc)
    tl.store(dbias_ptr + (b * nchunks + c) * nheads + h, dbias_acc)


def _cfg(cfg: dict | None, T: int, P: int, **defaults) -> dict:
    cfg = dict(cfg or {})
    cfg.setdefault("BLOCK_M", min(T, 64))
    cfg.setdefault("BLOCK_P", min(64, max(16, next_power_of_2(P))))
    for k, v in defaults.items():
        cfg.setdefault(k, v)
    return cfg


def chunk_dcb_bwd(x: torch.Tensor, dy: torch.Tensor, z: torch.Tensor | None, dtp: torch.Tensor, cs: torch.Tensor,
                  seq_idx: torch.Tensor | None, cb: torch.Tensor, ngroups: int, nslot: int, chunk_size: int,
                  cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dCB per group (summed over its heads) and, per head, the intra-chunk part of dcs: the row sums minus the
    column sums of the fp32 tile S = (dY Xd^T) o M, tile by tile.

    Args:
        x, dy, z: (b, L, H, P).  dtp, cs: (b, H, c, T).  cb: (b, c, G, T, T) from `chunk_cb_fwd`.
        nslot: slots of the row-part buffer (nblk tile slots + the dbc kernel's N blocks).
    Returns:
        dcb: (b, c, G, T, T) float32 (lower tiles).
        rowp: (b, H, c, nslot, T) float32; slots < nblk filled here (tile (i, j): its row sums in slot j at the
            rows of block i, minus its column sums in slot i at the rows of block j; their sum over slots is
            dY_t . y_diag_t - dt'_t x_t . dXd_diag_t), slots >= nblk left to `chunk_dbc_bwd`.

    Example:
        >>> dcb, rowp = chunk_dcb_bwd(x, dy, None, dtp, cs, None, cb, 1, 6, 256)
    """
    b, L, H, P = x.shape
    T = chunk_size
    nc = dtp.shape[2]
    cfg = _cfg(cfg, T, P, num_warps=4, num_stages=2)
    nblk = T // cfg["BLOCK_M"]
    dcb = torch.empty_like(cb)
    rowp = torch.empty(b, H, nc, nslot, T, device=x.device, dtype=torch.float32)
    zz = z if z is not None else dy
    _chunk_dcb_kernel[(nblk, nblk, b * nc * ngroups)](
        x, dy, zz, dtp, cs, seq_idx if seq_idx is not None else cs, cb, dcb, rowp,
        L, H, nc, P, H // ngroups, ngroups, nslot,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2), seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, **kernel_flags(x.dtype), **cfg,
    )
    return dcb, rowp


def chunk_dbc_bwd(x: torch.Tensor, dy: torch.Tensor, z: torch.Tensor | None, B: torch.Tensor, C: torch.Tensor,
                  dtp: torch.Tensor, cs: torch.Tensor, seq_idx: torch.Tensor | None, states: torch.Tensor,
                  dH: torch.Tensor, dcb: torch.Tensor, rowp: torch.Tensor, chunk_size: int,
                  cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dB and dC, summed over the heads of each group; fills the row-part slots >= nblk of `rowp` (dY_t . y_off_t,
    one partial per N block).

    Args:
        B, C: (b, L, G, N).  states: (b, c + 1, H, P, N).  dH: (b, c, H, P, N).  dcb, rowp: from `chunk_dcb_bwd`.
    Returns:
        dB, dC: (b, L, G, N) in B's and C's dtypes.

    Example:
        >>> dB, dC = chunk_dbc_bwd(x, dy, None, B, C, dtp, cs, None, states, dH, dcb, rowp, 256)
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    T = chunk_size
    nc = dtp.shape[2]
    cfg = _cfg(cfg, T, P, num_warps=4, num_stages=2)
    cfg.setdefault("BLOCK_N", dbc_block_n(N))
    nslot = rowp.shape[3]
    assert nslot == T // cfg["BLOCK_M"] + cdiv(N, cfg["BLOCK_N"]), "rowp slots do not match the blocks"
    dB = torch.empty(b, L, G, N, device=x.device, dtype=B.dtype)
    dC = torch.empty(b, L, G, N, device=x.device, dtype=C.dtype)
    zz = z if z is not None else dy
    grid = (T // cfg["BLOCK_M"], cdiv(N, cfg["BLOCK_N"]), b * nc * G)
    _chunk_dbc_kernel[grid](
        x, dy, zz, B, C, dtp, cs, seq_idx if seq_idx is not None else cs, states, dH, dcb, rowp, dB, dC,
        L, H, nc, P, N, H // G, G, nslot,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, **kernel_flags(x.dtype), **cfg,
    )
    return dB, dC


def dbc_block_n(N: int) -> int:
    """Default N block of the dB/dC kernel (it sets how many row-part slots that kernel fills)."""
    return min(64, max(16, next_power_of_2(N)))


def bwd_config(dstate: int, chunk_size: int) -> tuple[dict, dict, dict, int]:
    """Fixed configs of the three kernels above, chosen from the shape (no autotuning, no seqlen key).

    The row block is shared (it lays out the row-part slots). The dCB and dx kernels run unpipelined
    (num_stages 1): their loops are short chains of dependent tiles at 2 programs per SM, and a second
    stage did not pay. On an H100 (session 37, batch 2 x 64 heads x 64, dstate 128, chunk 256,
    bf16, `benchmarks/gpu_ssd.py --sweep`) dCB took 0.174 / 0.477 / 1.571 ms at seqlen 2048 / 8192 / 32768
    against 0.197 / 0.558 / 1.825 with 2 stages, dx 0.861 / 3.181 at 8192 / 32768 against 0.947 / 3.631.
    The dB/dC kernel takes N in blocks of 64 with 4 warps at every length: the whole dstate of 128 per
    program with 8 warps (each head's dY, x tiles loaded once, not once per N block), taken before from
    two programs per SM on, ran 1.280 ms at 32768 against 1.145 (the same call).
    Returns (dcb cfg, dbc cfg, dx cfg, nslot).
    """
    bm = min(chunk_size, 64)
    nblk = chunk_size // bm
    dbc = dict(BLOCK_M=bm, BLOCK_N=dbc_block_n(dstate), num_warps=4)
    nslot = nblk + cdiv(dstate, dbc["BLOCK_N"])
    return dict(BLOCK_M=bm, num_stages=1), dbc, dict(BLOCK_M=bm, num_stages=1), nslot


def chunk_dx_bwd(x: torch.Tensor, dt: torch.Tensor, dy: torch.Tensor, z: torch.Tensor | None,
                 y_pre: torch.Tensor | None, A: torch.Tensor, dt_bias: torch.Tensor | None, D: torch.Tensor | None,
                 B: torch.Tensor, dtp: torch.Tensor, cs: torch.Tensor, seq_idx: torch.Tensor | None,
                 cb: torch.Tensor, dH: torch.Tensor, rowp: torch.Tensor, ddend: torch.Tensor,
                 dt_softplus: bool, dt_limit: tuple[float, float], chunk_size: int, cfg: dict | None = None,
                 dx_out: torch.Tensor | None = None):
    """dx, ddt, dz, and per-chunk partials of dA, ddt_bias and dD.

    Args:
        x, dy, z, y_pre: (b, L, H, P).  dt: (b, L, H).  A, dt_bias: (H,) float32.  D: (H,) / (H, P) float32.
        B: (b, L, G, N).  cb: (b, c, G, T, T).  dH: (b, c, H, P, N).
        rowp: (b, H, c, nslot, T) from `chunk_dcb_bwd` and `chunk_dbc_bwd` (every slot filled).
        ddend: (b, H, c, n_pn) from `chunk_state_bwd` (the incoming state's share of the chunk-end term; the
            kernel adds the chunk state's share from its own row terms).
        dx_out: where dx goes, (b, L, H, P) of x's dtype with contiguous (H, P) and a batch stride of L rows (a
            channel slice of a (b, L, wider) buffer: Mamba-2's gradient of x || B || C); None: a new tensor.
    Returns:
        dx (b, L, H, P) x.dtype, ddt (b, L, H) dt.dtype, dz (like z) or None,
        dA_part, dbias_part: (b, c, H) float32, dD_part: (b, c, nblk, H, P) float32 or None.

    Example:
        >>> dx, ddt, dz, dA_p, dbias_p, dD_p = chunk_dx_bwd(x, dt, dy, None, None, A, None, D, B, dtp, cs,
        ...                                                None, cb, dH, rowp, ddend, False, (0.0, inf), 256)
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    T = chunk_size
    nc = dtp.shape[2]
    cfg = _cfg(cfg, T, P, num_warps=4, num_stages=2)
    nblk = T // cfg["BLOCK_M"]
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_limit = lo > 0.0 or hi < float("inf")
    if dx_out is None:
        dx = torch.empty(b, L, H, P, device=x.device, dtype=x.dtype)
    else:
        dx = dx_out
        if (dx.shape != x.shape or dx.dtype != x.dtype or dx.stride(3) != 1 or dx.stride(2) != P
                or dx.stride(0) != L * dx.stride(1)):
            raise ValueError(f"chunk_dx_bwd: dx_out must be (b, L, H, P) {tuple(x.shape)} of {x.dtype} with contiguous "
                             f"(H, P) rows, got {tuple(dx.shape)} {dx.dtype} strides {dx.stride()}")
    ddt = torch.empty(b, L, H, device=x.device, dtype=dt.dtype)
    dz = torch.empty(b, L, H, P, device=x.device, dtype=z.dtype) if z is not None else None
    dA_part = torch.empty(b, nc, H, device=x.device, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part)
    dD_part = torch.empty(b, nc, nblk, H, P, device=x.device, dtype=torch.float32) if D is not None else None
    zz = z if z is not None else dy
    n_pn = ddend.shape[3]
    _chunk_dx_kernel[(H, b * nc)](
        x, dt, dy, zz, y_pre if y_pre is not None else dy, A, dt_bias if dt_bias is not None else A,
        D if D is not None else A, B, dtp, cs, seq_idx if seq_idx is not None else cs, cb, dH, rowp, ddend,
        dx, ddt, dz if dz is not None else dx, dA_part, dbias_part, dD_part if dD_part is not None else dA_part,
        L, H, nc, P, N, H // G, G, rowp.shape[3], n_pn, lo, hi if has_limit else 0.0,
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        B.stride(0), B.stride(1), B.stride(2), seq_idx.stride(0) if seq_idx is not None else 0, dx.stride(1),
        T=T, BLOCK_N=max(16, next_power_of_2(N)), BLOCK_PN=max(2, next_power_of_2(n_pn)),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit, HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None,
        **kernel_flags(x.dtype), **cfg,
    )
    return dx, ddt, dz, dA_part, dbias_part, dD_part
