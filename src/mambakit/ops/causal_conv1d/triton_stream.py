"""Streaming Triton kernels of the depthwise causal convolution (variant "stream"): each program walks rows.

Shapes (legend): B batch, L seqlen, D dim (channels), W width, BD the channel block, CHUNK rows per program,
ROWS rows per loop step (unrolled).

A program owns CHUNK consecutive rows of BD channels and walks them one row at a time: every row of x and dy
is one coalesced (BD,) load, read from memory once, and the sliding windows the conv needs (the last W-1 inputs
and, in the backward, the last W-1 du) are tuples of (BD,) vectors in registers, shifted by renaming. The tile
kernels of `triton_conv.py` instead take the W (forward) or 2W-1 (backward) shifted rows as overlapping
(BL, BD) loads and recompute u at W shifts in the backward (W sigmoids per element); here each element
costs one load, one sigmoid and ~3W FMAs. Chunk borders cost a halo of W-1 rows on each side (L2 hits).
Loads of a step's ROWS rows are issued before its arithmetic; with PREFETCH the next step's rows are loaded
(in their storage dtype, few registers) before this step's arithmetic, so 2 x ROWS rows per thread are in flight.

    forward, row t:   u_t = bias + sum_k w_k * xpad_{t-(W-1)+k} * m_k(t),   y_t = act(u_t)
    backward, row t:  du_t = dy_t * act'(u_t)
                      dxpad_s = sum_j w_{W-1-j} du_{s+j} [seq(s) == seq(s+j)]   at s = t - (W-1)
                      dw_k += du_t * xpad_{t-(W-1)+k} * m_k(t),   db += du_t     (t inside the chunk)

The backward emits dx for row s = t-(W-1) once du_t is known, so its loop runs W-1 rows past the chunk
(without weight gradients) and the first W-1 rows it emits belong to the previous chunk (not stored), except
in the first chunk, where they are the initial state's slots (du = 0 before row 0 makes them exact).
Weight and bias gradients are (BD,) sums per program, summed over programs by torch (no atomics).
seq_idx is read per row as a scalar at clamp(p, 0, L-1): the initial state's slots take the first document.
Row and batch strides are passed divided by ALIGN (see `triton_conv.row_align`) so that the compiler knows
that each row starts 16-byte aligned and vectorises the loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton_launch import fast_launch
from ..triton_math import sigmoid, silu


@triton.jit
def _row_xpad(x_ptr, init_ptr, p, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_id, stride_iw,
              W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """(BD,) row of xpad at position p: x for 0 <= p < L, the initial state's slot p + W-1 for p < 0, else 0."""
    r = tl.load(x_ptr + tl.cast(p, tl.int64) * stride_xl + offs_d * stride_xd, mask=mask_d & (p >= 0) & (p < seqlen),
                other=0.0).to(ACC)
    if HAS_INIT:
        r += tl.load(init_ptr + (p + W - 1) * stride_iw + offs_d * stride_id, mask=mask_d & (p < 0) & (p >= 1 - W),
                     other=0.0).to(ACC)
    return r


@triton.jit
def _row_seq(seq_ptr, p, seqlen, stride_sl, HAS_SEQ: tl.constexpr):
    """seq(p) at clamp(p, 0, L-1) with seq_idx, else p itself (a placeholder of the same int type, unused)."""
    if HAS_SEQ:
        r = tl.load(seq_ptr + tl.minimum(tl.maximum(p, 0), seqlen - 1) * stride_sl).to(tl.int64)
    else:
        r = tl.cast(p, tl.int64)
    return r


@triton.jit
def _load_rows(ptr, seq_ptr, t0, offs_d, mask_d, seqlen, stride_l, stride_d, stride_sl,
               NROWS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """NROWS rows t0 .. t0+NROWS-1 as they are stored (zeros from row L on), and their seq values."""
    rows = ()
    seqs = ()
    for r in tl.static_range(NROWS):
        t = t0 + r
        rows = rows + (tl.load(ptr + tl.cast(t, tl.int64) * stride_l + offs_d * stride_d, mask=mask_d & (t < seqlen),
                               other=0.0),)
        seqs = seqs + (_row_seq(seq_ptr, t, seqlen, stride_sl, HAS_SEQ),)
    return rows, seqs


@triton.jit
def _store_final_window(x_ptr, init_ptr, seq_ptr, final_ptr, offs_d, mask_d, seqlen, stride_xl, stride_xd,
                        stride_id, stride_iw, stride_sl, stride_fd, stride_fw,
                        W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, ACC: tl.constexpr):
    """The window after the last token, positions L-(W-1) .. L-1, zero where an earlier document's."""
    if HAS_SEQ:
        last_doc = tl.load(seq_ptr + (seqlen - 1) * stride_sl)
    for j in tl.static_range(W - 1):
        p = tl.cast(seqlen - (W - 1) + j, tl.int32)  # seqlen may be a constexpr 1
        r = _row_xpad(x_ptr, init_ptr, p, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_id, stride_iw, W,
                      HAS_INIT, ACC)
        if HAS_SEQ:
            r = tl.where(tl.load(seq_ptr + tl.maximum(p, 0) * stride_sl) == last_doc, r, 0.0)
        tl.store(final_ptr + j * stride_fw + offs_d * stride_fd, r.to(final_ptr.dtype.element_ty), mask=mask_d)


# ALIGN carries what the compiler needs of the row strides (16-byte rows): not specialising them, nor the
# length, keeps one compile for Mamba-1's and Mamba-2's layouts and every seqlen
@fast_launch
@triton.jit(do_not_specialize=["seqlen", "stride_xb", "stride_xl", "stride_yb", "stride_yl"])
def _causal_conv1d_fwd_stream_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, y_ptr, final_ptr,
    seqlen, dim,
    stride_xb, stride_xl, stride_xd,
    stride_wd, stride_ww,
    stride_ib, stride_id, stride_iw,
    stride_sb, stride_sl,
    stride_yb, stride_yl, stride_yd,
    stride_fb, stride_fd, stride_fw,
    W: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WRITE_FINAL: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements
    stride_xb, stride_xl = stride_xb * ALIGN, stride_xl * ALIGN
    stride_yb, stride_yl = stride_yb * ALIGN, stride_yl * ALIGN
    x_ptr += pid_b * stride_xb
    init_ptr += pid_b * stride_ib
    seq_ptr += pid_b * stride_sb
    y_ptr += pid_b * stride_yb
    final_ptr += pid_b * stride_fb

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    w = ()
    for k in tl.static_range(W):
        w = w + (tl.load(w_ptr + offs_d * stride_wd + k * stride_ww, mask=mask_d, other=0.0).to(ACC),)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)

    c0 = pid_c * CHUNK
    # the window before the chunk's first row: xpad (and seq) at c0-(W-1) .. c0-1
    xw = ()
    seqw = ()
    for k in tl.static_range(W - 1):
        p = c0 - (W - 1) + k
        xw = xw + (_row_xpad(x_ptr, init_ptr, p, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_id, stride_iw,
                             W, HAS_INIT, ACC),)
        seqw = seqw + (_row_seq(seq_ptr, p, seqlen, stride_sl, HAS_SEQ),)

    if PREFETCH:
        xs, seqs = _load_rows(x_ptr, seq_ptr, c0, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_sl, ROWS,
                              HAS_SEQ)
    for it in range(CHUNK // ROWS):
        t0 = c0 + it * ROWS
        if PREFETCH:
            # the next step's rows in flight while this step computes (the last step's are past the chunk)
            nxt_xs, nxt_seqs = _load_rows(x_ptr, seq_ptr, t0 + ROWS, offs_d, mask_d, seqlen, stride_xl, stride_xd,
                                          stride_sl, ROWS, HAS_SEQ)
        else:
            xs, seqs = _load_rows(x_ptr, seq_ptr, t0, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_sl, ROWS,
                                  HAS_SEQ)
        for r in tl.static_range(ROWS):
            t = t0 + r
            x_t = xs[r].to(ACC)
            u = bias + w[W - 1] * x_t
            for k in tl.static_range(W - 1):
                tap = xw[k]
                if HAS_SEQ:
                    tap = tl.where(seqw[k] == seqs[r], tap, 0.0)
                u += w[k] * tap
            if SILU:
                u = silu(u)
            tl.store(y_ptr + t.to(tl.int64) * stride_yl + offs_d * stride_yd, u.to(y_ptr.dtype.element_ty),
                     mask=mask_d & (t < seqlen))
            new_xw = ()
            new_seqw = ()
            for k in tl.static_range(1, W - 1):
                new_xw = new_xw + (xw[k],)
                new_seqw = new_seqw + (seqw[k],)
            xw = new_xw + (x_t,)
            seqw = new_seqw + (seqs[r],)
        if PREFETCH:
            xs, seqs = nxt_xs, nxt_seqs

    if WRITE_FINAL:
        if pid_c == tl.num_programs(0) - 1:
            _store_final_window(x_ptr, init_ptr, seq_ptr, final_ptr, offs_d, mask_d, seqlen, stride_xl, stride_xd,
                                stride_id, stride_iw, stride_sl, stride_fd, stride_fw, W, HAS_INIT, HAS_SEQ, ACC)


@triton.jit
def _bwd_stream_rows(
    dx_ptr, dinit_ptr, dfinal_ptr,
    t0, c0, seqlen, last_doc, offs_d, mask_d,
    stride_fd, stride_fw, stride_dxl, stride_dxd, stride_did, stride_diw,
    w, bias, xs, dys, seqs, xw, duw, seqw, dw, db,
    NROWS: tl.constexpr, W: tl.constexpr, ACC_DW: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, WRITE_DINIT: tl.constexpr, ACC: tl.constexpr,
):
    """NROWS rows t0 .. t0+NROWS-1 of the backward walk: returns the shifted windows and the gradient sums.

    xs, dys, seqs: those rows of x and dy as loaded (`_load_rows`) and their seq values. xw, duw, seqw: x, du and seq at the W-1 rows before t0 (oldest first); dw (W vectors), db: running sums,
    updated only when ACC_DW (rows inside the chunk).
    """
    for r in tl.static_range(NROWS):
        t = t0 + r
        seq_t = seqs[r]
        x_t = xs[r].to(ACC)
        du = dys[r].to(ACC)
        if SILU:
            # u_t again from the window (never stored by the forward)
            u = bias + w[W - 1] * x_t
            for k in tl.static_range(W - 1):
                tap = xw[k]
                if HAS_SEQ:
                    tap = tl.where(seqw[k] == seq_t, tap, 0.0)
                u += w[k] * tap
            sig = sigmoid(u)
            du = du * sig * (1.0 + u * (1.0 - sig))

        # dxpad at s = t-(W-1): du at s .. t, where du_{s+j} = duw[j] (j < W-1) and du_t
        s = t - (W - 1)
        dxs = w[W - 1] * duw[0]
        for j in tl.static_range(1, W - 1):
            c = w[W - 1 - j] * duw[j]
            if HAS_SEQ:
                c = tl.where(seqw[0] == seqw[j], c, 0.0)
            dxs += c
        c = w[0] * du
        if HAS_SEQ:
            c = tl.where(seqw[0] == seq_t, c, 0.0)
        dxs += c
        if HAS_DFINAL:
            # the final window read positions L-(W-1) .. L-1 of the last document
            slot = s - (seqlen - (W - 1))
            g = tl.load(dfinal_ptr + slot * stride_fw + offs_d * stride_fd, mask=mask_d & (slot >= 0) & (slot < W - 1),
                        other=0.0).to(ACC)
            if HAS_SEQ:
                g = tl.where(seqw[0] == last_doc, g, 0.0)
            dxs += g
        tl.store(dx_ptr + s.to(tl.int64) * stride_dxl + offs_d * stride_dxd, dxs.to(dx_ptr.dtype.element_ty),
                 mask=mask_d & (s >= c0) & (s < seqlen))
        if WRITE_DINIT:
            # s < 0 happens only in the first chunk: the initial state's slots
            tl.store(dinit_ptr + (s + W - 1) * stride_diw + offs_d * stride_did, dxs.to(dinit_ptr.dtype.element_ty),
                     mask=mask_d & (s < 0))

        if ACC_DW:
            new_dw = ()
            for k in tl.static_range(W - 1):
                tap = xw[k]
                if HAS_SEQ:
                    tap = tl.where(seqw[k] == seq_t, tap, 0.0)
                new_dw = new_dw + (dw[k] + du * tap,)
            dw = new_dw + (dw[W - 1] + du * x_t,)
            db += du

        new_xw = ()
        new_duw = ()
        new_seqw = ()
        for k in tl.static_range(1, W - 1):
            new_xw = new_xw + (xw[k],)
            new_duw = new_duw + (duw[k],)
            new_seqw = new_seqw + (seqw[k],)
        xw = new_xw + (x_t,)
        duw = new_duw + (du,)
        seqw = new_seqw + (seq_t,)
    return xw, duw, seqw, dw, db


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "stride_xb", "stride_xl", "stride_dyb", "stride_dyl", "stride_dxb",
                               "stride_dxl"])
def _causal_conv1d_bwd_stream_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dy_ptr, dfinal_ptr,
    dx_ptr, dinit_ptr, part_ptr,
    seqlen, dim,
    stride_xb, stride_xl, stride_xd,
    stride_wd, stride_ww,
    stride_ib, stride_id, stride_iw,
    stride_sb, stride_sl,
    stride_dyb, stride_dyl, stride_dyd,
    stride_fb, stride_fd, stride_fw,
    stride_dxb, stride_dxl, stride_dxd,
    stride_dib, stride_did, stride_diw,
    stride_pp, stride_pw, stride_pd,
    W: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    PREFETCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, WRITE_DINIT: tl.constexpr, ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    stride_xb, stride_xl = stride_xb * ALIGN, stride_xl * ALIGN
    stride_dyb, stride_dyl = stride_dyb * ALIGN, stride_dyl * ALIGN
    stride_dxb, stride_dxl = stride_dxb * ALIGN, stride_dxl * ALIGN
    x_ptr += b64 * stride_xb
    init_ptr += b64 * stride_ib
    seq_ptr += b64 * stride_sb
    dy_ptr += b64 * stride_dyb
    dfinal_ptr += b64 * stride_fb
    dx_ptr += b64 * stride_dxb
    dinit_ptr += b64 * stride_dib

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    w = ()
    for k in tl.static_range(W):
        w = w + (tl.load(w_ptr + offs_d * stride_wd + k * stride_ww, mask=mask_d, other=0.0).to(ACC),)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_SEQ:
        last_doc = tl.load(seq_ptr + (seqlen - 1) * stride_sl).to(tl.int64)
    else:
        last_doc = 0

    c0 = pid_c * CHUNK
    xw = ()
    duw = ()
    seqw = ()
    for k in tl.static_range(W - 1):
        p = c0 - (W - 1) + k
        xw = xw + (_row_xpad(x_ptr, init_ptr, p, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_id, stride_iw,
                             W, HAS_INIT, ACC),)
        # du before the chunk: only the dx rows of the previous chunk read it (not stored), or row < 0 (du = 0)
        duw = duw + (tl.zeros((BLOCK_D,), dtype=ACC),)
        seqw = seqw + (_row_seq(seq_ptr, p, seqlen, stride_sl, HAS_SEQ),)
    dw = ()
    for k in tl.static_range(W):
        dw = dw + (tl.zeros((BLOCK_D,), dtype=ACC),)
    db = tl.zeros((BLOCK_D,), dtype=ACC)

    if PREFETCH:
        xs, seqs = _load_rows(x_ptr, seq_ptr, c0, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_sl, ROWS,
                              HAS_SEQ)
        dys, _ = _load_rows(dy_ptr, seq_ptr, c0, offs_d, mask_d, seqlen, stride_dyl, stride_dyd, stride_sl, ROWS,
                            False)
    for it in range(CHUNK // ROWS):
        t0 = c0 + it * ROWS
        if PREFETCH:
            # the next step's rows in flight while this step computes (the last step's are the tail's first)
            nxt_xs, nxt_seqs = _load_rows(x_ptr, seq_ptr, t0 + ROWS, offs_d, mask_d, seqlen, stride_xl, stride_xd,
                                          stride_sl, ROWS, HAS_SEQ)
            nxt_dys, _ = _load_rows(dy_ptr, seq_ptr, t0 + ROWS, offs_d, mask_d, seqlen, stride_dyl, stride_dyd,
                                    stride_sl, ROWS, False)
        else:
            xs, seqs = _load_rows(x_ptr, seq_ptr, t0, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_sl, ROWS,
                                  HAS_SEQ)
            dys, _ = _load_rows(dy_ptr, seq_ptr, t0, offs_d, mask_d, seqlen, stride_dyl, stride_dyd, stride_sl, ROWS,
                                False)
        xw, duw, seqw, dw, db = _bwd_stream_rows(
            dx_ptr, dinit_ptr, dfinal_ptr, t0, c0, seqlen, last_doc, offs_d, mask_d, stride_fd, stride_fw,
            stride_dxl, stride_dxd, stride_did, stride_diw, w, bias, xs, dys, seqs, xw, duw, seqw, dw, db,
            ROWS, W, True, HAS_SEQ, SILU, HAS_DFINAL, WRITE_DINIT, ACC)
        if PREFETCH:
            xs, dys, seqs = nxt_xs, nxt_dys, nxt_seqs
    # W-1 rows past the chunk give du for the dx of its last W-1 rows (their weight gradients are the next chunk's)
    xs, seqs = _load_rows(x_ptr, seq_ptr, c0 + CHUNK, offs_d, mask_d, seqlen, stride_xl, stride_xd, stride_sl, W - 1,
                          HAS_SEQ)
    dys, _ = _load_rows(dy_ptr, seq_ptr, c0 + CHUNK, offs_d, mask_d, seqlen, stride_dyl, stride_dyd, stride_sl,
                        W - 1, False)
    xw, duw, seqw, dw, db = _bwd_stream_rows(
        dx_ptr, dinit_ptr, dfinal_ptr, c0 + CHUNK, c0, seqlen, last_doc, offs_d, mask_d, stride_fd, stride_fw,
        stride_dxl, stride_dxd, stride_did, stride_diw, w, bias, xs, dys, seqs, xw, duw, seqw, dw, db,
        W - 1, W, False, HAS_SEQ, SILU, HAS_DFINAL, WRITE_DINIT, ACC)

    # partial sums (programs, W + 1, D): rows 0..W-1 the weight taps, row W the bias
    part_ptrs = part_ptr + (pid_b * tl.num_programs(0) + pid_c) * stride_pp + offs_d * stride_pd
    for k in tl.static_range(W):
        tl.store(part_ptrs + k * stride_pw, dw[k], mask=mask_d)
    if HAS_BIAS:
        tl.store(part_ptrs + W * stride_pw, db, mask=mask_d)
