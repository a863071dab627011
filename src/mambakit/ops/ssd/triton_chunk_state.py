"""SSD chunk primitives 2 and 3: chunk states fused with state passing, and its backward (state gradients).

Shapes (legend): b batch, L seqlen, H nheads, P headdim, G ngroups, N dstate, c chunks, T chunk_size.

Forward, one program per (b, h, P-block, N-block), walking the chunks in order with the state in registers:

    S_c     = sum_t exp(cs_end - cs_t) dt'_t x_t B_t^T        (P, N): one (P x T) @ (T x N) dot per chunk
    h_{c+1} = exp(cs_end) h_c + S_c                         h_0 = initial_state

and stores every incoming state h_c (c = 0..nchunks, the last one being the final state). Fusing the
two stages means the per-chunk states are written once and never read back by a passing kernel; the
loop is sequential over chunks only, and the loads of chunk c+1 do not depend on the state, so they
overlap with chunk c's dot.

Parallel path of the forward, for long sequences on a small grid (few b H programs per SM leave the
fused walk latency-bound): `chunk_state_local_fwd` computes every S_c at once (grid over P/N blocks,
b H and chunks) into an fp32 buffer, and `triton_state_passing.state_passing_fwd` then runs the
recurrence elementwise. Both paths evaluate S_c with the same `_chunk_contrib`, so they agree to fp32
rounding; `use_parallel_chunk_state` is the policy, cfg["PARALLEL"] overrides it.

Backward, the same walk in reverse:

    dH_c   = grad of the state at the end of chunk c        dH_{c-1} = exp(cs_end) dH_c + sum_t exp(cs_t) dY_t^T C_t

plus the incoming state's share of the chunk-end decay's gradient, exp(cs_end) <dH_c, h_c> (one partial per
program, summed by the dx kernel, which adds the chunk state's share <dH_c, S_c> from its own row terms).

seq_idx: tokens only feed the end state of their chunk if they belong to the chunk's last document,
only read the incoming state if they belong to the document of the previous chunk's last token, and
the incoming state survives the chunk only if those two documents are the same (no boundary inside).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import cdiv, fast_launch, next_power_of_2, sm_count
from ..triton_math import silu
from .triton_common import kernel_flags, mm, store_dtype, to_dtype
from .triton_state_passing import state_passing_fwd

__all__ = ["chunk_state_fwd", "chunk_state_local_fwd", "use_parallel_chunk_state", "chunk_state_bwd"]


@triton.jit
def _chunk_contrib(x_c, B_c, cs_c, dtp_c, seq_b, c, cs_end, seq_end, seqlen, offs_p, offs_n, headdim, dstate,
                   s_x_l, s_B_l, T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_T: tl.constexpr, HAS_SEQ: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr):
    """S_c of one (P-block, N-block) from zero: sum over chunk c's tokens of exp(cs_end - cs_t) dt'_t x_t B_t^T.

    Shared by the fused walk and the parallel kernel, so that both paths add exactly the same fp32 terms.
    x_c, B_c: the chunk's first row of this block; cs_c, dtp_c: its (T,) rows; seq_b: this batch row of seq_idx.
    """
    contrib = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        pos = c * T + offs_t
        tmask = pos < seqlen
        cs_t = tl.load(cs_c + offs_t)
        dtp_t = tl.load(dtp_c + offs_t)
        w = tl.exp(cs_end - cs_t) * dtp_t  # exponent <= 0: cs is nonincreasing inside a chunk
        if HAS_SEQ:
            seq_t = tl.load(seq_b + pos, mask=tmask, other=0)
            w = tl.where(seq_t == seq_end, w, 0.0)  # only the chunk's last document reaches its end state
        xT = tl.load(x_c + offs_t[None, :] * s_x_l, mask=(offs_p < headdim)[:, None] & tmask[None, :],
                     other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_T)
        Bt = tl.load(B_c + offs_t[:, None] * s_B_l, mask=tmask[:, None] & (offs_n < dstate)[None, :],
                     other=0.0)  # (BLOCK_T, BLOCK_N)
        contrib = mm(xT * w[None, :], Bt, contrib, OP, EMULATE)
    return contrib


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_state_fwd_kernel(
    x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, h0_ptr, states_ptr, final_ptr,
    seqlen, nheads, nchunks, headdim, dstate, hpg,
    s_x_b, s_x_l, s_x_h, s_B_b, s_B_l, s_B_g, s_seq_b,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_pblk = tl.cdiv(headdim, BLOCK_P)
    pid_p = pid_pn % n_pblk
    pid_n = pid_pn // n_pblk
    b = tl.cast(pid_bh // nheads, tl.int64)
    h = pid_bh % nheads
    g = h // hpg
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pn_mask = (offs_p < headdim)[:, None] & (offs_n < dstate)[None, :]
    pn_offs = offs_p[:, None] * dstate + offs_n[None, :]
    PN = headdim * dstate
    chunk_stride = tl.cast(nheads * PN, tl.int64)  # between consecutive chunks of `states`
    st_ptr = states_ptr + (b * (nchunks + 1) * nheads + h) * PN + pn_offs
    dc_ptr = (b * nheads + h) * nchunks * T  # offset of this head's (c, T) rows in dtp / cs
    x_base = x_ptr + b * s_x_b + h * s_x_h + offs_p[:, None]
    B_base = B_ptr + b * s_B_b + g * s_B_g + offs_n[None, :]

    if HAS_H0:
        state = tl.load(h0_ptr + (b * nheads + h) * PN + pn_offs, mask=pn_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * s_seq_b)
    for c in range(nchunks):
        tl.store(st_ptr + c * chunk_stride, to_dtype(state, states_ptr.dtype.element_ty, EMULATE), mask=pn_mask)
        # int64 chunk offset once per chunk; offsets inside a chunk stay int32
        x_c = x_base + tl.cast(c * T, tl.int64) * s_x_l
        B_c = B_base + tl.cast(c * T, tl.int64) * s_B_l
        cs_end = tl.load(cs_ptr + dc_ptr + c * T + T - 1)
        seq_end = 0
        if HAS_SEQ:
            seq_end = tl.load(seq_ptr + b * s_seq_b + tl.minimum(c * T + T - 1, seqlen - 1))
        contrib = _chunk_contrib(x_c, B_c, cs_ptr + dc_ptr + c * T, dtp_ptr + dc_ptr + c * T, seq_ptr + b * s_seq_b,
                                 c, cs_end, seq_end, seqlen, offs_p, offs_n, headdim, dstate, s_x_l, s_B_l,
                                 T, BLOCK_P, BLOCK_N, BLOCK_T, HAS_SEQ, OP, EMULATE)
        decay = tl.exp(cs_end)
        if HAS_SEQ:
            decay = tl.where(seq_end == seq_prev, decay, 0.0)
            seq_prev = seq_end
        state = state * decay + contrib
    tl.store(st_ptr + nchunks * chunk_stride, to_dtype(state, states_ptr.dtype.element_ty, EMULATE), mask=pn_mask)
    tl.store(final_ptr + (b * nheads + h) * PN + pn_offs, state, mask=pn_mask)


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_state_local_fwd_kernel(
    x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, S_ptr,
    seqlen, nheads, nchunks, headdim, dstate, hpg,
    s_x_b, s_x_l, s_x_h, s_B_b, s_B_l, s_B_g, s_seq_b,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_SEQ: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr,
):
    # grid (P/N blocks, b H, c): the N blocks of one (b, h, c) are neighbours (they share the x tile in L2),
    # then the heads of a chunk (they share B)
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    c = tl.program_id(2)
    n_pblk = tl.cdiv(headdim, BLOCK_P)
    pid_p = pid_pn % n_pblk
    pid_n = pid_pn // n_pblk
    b = tl.cast(pid_bh // nheads, tl.int64)
    h = pid_bh % nheads
    g = h // hpg
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pn_mask = (offs_p < headdim)[:, None] & (offs_n < dstate)[None, :]
    PN = headdim * dstate
    dc_ptr = ((b * nheads + h) * nchunks + c) * T  # this chunk's (T,) row of dtp / cs
    x_c = x_ptr + b * s_x_b + tl.cast(c * T, tl.int64) * s_x_l + h * s_x_h + offs_p[:, None]
    B_c = B_ptr + b * s_B_b + tl.cast(c * T, tl.int64) * s_B_l + g * s_B_g + offs_n[None, :]
    cs_end = tl.load(cs_ptr + dc_ptr + T - 1)
    seq_end = 0
    if HAS_SEQ:
        seq_end = tl.load(seq_ptr + b * s_seq_b + tl.minimum(c * T + T - 1, seqlen - 1))
    contrib = _chunk_contrib(x_c, B_c, cs_ptr + dc_ptr, dtp_ptr + dc_ptr, seq_ptr + b * s_seq_b,
                             c, cs_end, seq_end, seqlen, offs_p, offs_n, headdim, dstate, s_x_l, s_B_l,
                             T, BLOCK_P, BLOCK_N, BLOCK_T, HAS_SEQ, OP, EMULATE)
    S_c = S_ptr + ((b * nchunks + c) * nheads + h) * PN + offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(S_c, contrib, mask=pn_mask)


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_state_bwd_kernel(
    dy_ptr, z_ptr, C_ptr, cs_ptr, seq_ptr, states_ptr, dfinal_ptr, dH_ptr, dh0_ptr, ddend_ptr,
    seqlen, nheads, nchunks, headdim, dstate, hpg,
    s_dy_b, s_dy_l, s_dy_h, s_z_b, s_z_l, s_z_h, s_C_b, s_C_l, s_C_g, s_seq_b,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_DFINAL: tl.constexpr, HAS_DH0: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    OP: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_pn = tl.num_programs(0)
    n_pblk = tl.cdiv(headdim, BLOCK_P)
    pid_p = pid_pn % n_pblk
    pid_n = pid_pn // n_pblk
    b = tl.cast(pid_bh // nheads, tl.int64)
    h = pid_bh % nheads
    g = h // hpg
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    pn_mask = pmask[:, None] & (offs_n < dstate)[None, :]
    pn_offs = offs_p[:, None] * dstate + offs_n[None, :]
    PN = headdim * dstate
    chunk_stride = tl.cast(nheads * PN, tl.int64)
    st_ptr = states_ptr + (b * (nchunks + 1) * nheads + h) * PN + pn_offs
    dH_base = dH_ptr + (b * nchunks * nheads + h) * PN + pn_offs
    dc_ptr = (b * nheads + h) * nchunks * T
    dy_base = dy_ptr + b * s_dy_b + h * s_dy_h + offs_p[:, None]
    z_base = z_ptr + b * s_z_b + h * s_z_h + offs_p[:, None]
    C_base = C_ptr + b * s_C_b + g * s_C_g + offs_n[None, :]

    if HAS_DFINAL:
        dstate_ = tl.load(dfinal_ptr + (b * nheads + h) * PN + pn_offs, mask=pn_mask, other=0.0).to(tl.float32)
    else:
        dstate_ = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        # dstate_ is now the gradient of the state at the end of chunk c
        tl.store(dH_base + c * chunk_stride, to_dtype(dstate_, dH_ptr.dtype.element_ty, EMULATE), mask=pn_mask)
        h_in = tl.load(st_ptr + c * chunk_stride, mask=pn_mask, other=0.0).to(tl.float32)
        dy_c = dy_base + tl.cast(c * T, tl.int64) * s_dy_l
        z_c = z_base + tl.cast(c * T, tl.int64) * s_z_l
        C_c = C_base + tl.cast(c * T, tl.int64) * s_C_l
        cs_end = tl.load(cs_ptr + dc_ptr + c * T + T - 1)
        if HAS_SEQ:
            seq_prev = tl.load(seq_ptr + b * s_seq_b + tl.maximum(c * T - 1, 0))
            seq_end = tl.load(seq_ptr + b * s_seq_b + tl.minimum(c * T + T - 1, seqlen - 1))
        decay = tl.exp(cs_end)
        if HAS_SEQ:
            decay = tl.where(seq_end == seq_prev, decay, 0.0)
        # the incoming state's share of <dH_c, h_end> (d h_end / d cs_end = decay h_in + S_c); the dx kernel
        # adds the chunk state's share <dH_c, S_c> from the very row terms it subtracts, so that they cancel
        tl.store(ddend_ptr + ((b * nheads + h) * nchunks + c) * n_pn + pid_pn, decay * tl.sum(dstate_ * h_in))
        contrib = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            pos = c * T + offs_t
            tmask = pos < seqlen
            w = tl.exp(tl.load(cs_ptr + dc_ptr + c * T + offs_t))  # exponent <= 0
            if HAS_SEQ:
                seq_t = tl.load(seq_ptr + b * s_seq_b + pos, mask=tmask, other=0)
                w = tl.where(seq_t == seq_prev, w, 0.0)
            ptmask = pmask[:, None] & tmask[None, :]
            dyT = tl.load(dy_c + offs_t[None, :] * s_dy_l, mask=ptmask, other=0.0).to(tl.float32)  # (BP, BT)
            if HAS_Z:
                dyT *= silu(tl.load(z_c + offs_t[None, :] * s_z_l, mask=ptmask, other=0.0).to(tl.float32))
            Ct = tl.load(C_c + offs_t[:, None] * s_C_l, mask=tmask[:, None] & (offs_n < dstate)[None, :], other=0.0)
            contrib = mm(dyT * w[None, :], Ct, contrib, OP, EMULATE)
        dstate_ = dstate_ * decay + contrib
    if HAS_DH0:
        tl.store(dh0_ptr + (b * nheads + h) * PN + pn_offs, dstate_, mask=pn_mask)


def _walk_blocks(headdim: int, dstate: int, chunk_size: int, x_dtype: torch.dtype, cfg: dict | None) -> dict:
    """Tiles of the two chunk walks (the fused forward, the backward): 16-bit inputs take 128-token steps with a
    3-stage pipeline. On an H100 (session 37, batch 2 x 64 heads x 64, dstate 128, chunk 256, bf16) the forward
    walk ran 0.045 / 0.143 / 0.530 ms at seqlen 2048 / 8192 / 32768 against 0.062 / 0.209 / 0.792 with 64-token
    steps and 2 stages, the backward 0.058 / 0.192 / 0.720 against 0.072 / 0.254 / 0.980. float32 keeps 64-token
    steps and 2 stages (twice the bytes a stage: not measured)."""
    cfg = dict(cfg or {})
    if x_dtype in (torch.bfloat16, torch.float16):
        cfg.setdefault("BLOCK_T", min(chunk_size, 128))
        cfg.setdefault("num_stages", 3)
    cfg = _blocks(headdim, dstate, cfg)
    cfg.setdefault("BLOCK_T", min(chunk_size, 64))
    return cfg


def _blocks(headdim: int, dstate: int, cfg: dict | None) -> dict:
    cfg = dict(cfg or {})
    cfg.setdefault("BLOCK_P", min(64, max(16, next_power_of_2(headdim))))
    cfg.setdefault("BLOCK_N", min(64, max(16, next_power_of_2(dstate))))
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    return cfg


# Path policy of the forward (see use_parallel_chunk_state). The fused walk runs b H (P/64)(N/64) programs, each
# a chain of dependent chunk steps: with few programs it is latency-bound. The parallel path moves about 2.4x
# the bytes in two streaming launches with many programs, so it wins only when those stream fast enough
# (the H100 reasoning with its figures: docs/design/kernel_figures.md).
# Short sequences keep the fused kernel: the second launch and allocation cost host time that a few
# chunks cannot repay. Since the walk's 128-token, 3-stage tiles (session 37, H100, `benchmarks/gpu_ssd.py`'s
# "state_fwd paths" table) the fused walk wins at 2 programs per SM (batch 2 x 64 heads: 0.143 / 0.530 ms at
# seqlen 8192 / 32768 against the parallel path's 0.185 / 0.686), so only a grid under one program per SM
# takes the parallel path.
PARALLEL_MIN_CHUNKS = 16  # fewer chunks: fused (seqlen 2048 at chunk 256 has 8)
FUSED_MIN_PROGRAMS_PER_SM = 1  # from this many fused programs per SM on, their latency is taken as hidden


def use_parallel_chunk_state(batch: int, nheads: int, nchunks: int, headdim: int, dstate: int, sms: int) -> bool:
    """Whether `chunk_state_fwd` takes the parallel path (local states + state passing) by default.

    Parallel iff nchunks >= PARALLEL_MIN_CHUNKS and the fused kernel's grid (batch * nheads * its
    P/N blocks at the default 64 x 64) gives fewer than FUSED_MIN_PROGRAMS_PER_SM programs per SM
    (and the chunks fit the parallel kernel's grid: at most 65535).
    Examples on 132 SMs, headdim 64, dstate 128 (2 fused programs per head), chunk 256: batch 2 x 64
    heads (256 programs): always fused; batch 1 x 64 heads (128): fused up to seqlen 3840, parallel from
    3841 (16 chunks); batch 1 x 24 heads (a 130M Mamba-2's prefill): the same.

    Example:
        >>> use_parallel_chunk_state(1, 24, 32, 64, 128, 132)
        True
    """
    blocks = _blocks(headdim, dstate, None)
    n_pn = cdiv(headdim, blocks["BLOCK_P"]) * cdiv(dstate, blocks["BLOCK_N"])
    fits_grid = nchunks <= 65535  # the chunks are the parallel kernel's grid axis 2 (CUDA limit 65535)
    return fits_grid and nchunks >= PARALLEL_MIN_CHUNKS and batch * nheads * n_pn < FUSED_MIN_PROGRAMS_PER_SM * sms


def chunk_state_local_fwd(x: torch.Tensor, B: torch.Tensor, dtp: torch.Tensor, cs: torch.Tensor,
                          seq_idx: torch.Tensor | None, chunk_size: int, cfg: dict | None = None) -> torch.Tensor:
    """Every chunk's own contribution to its end state (from a zero state), all chunks in parallel.

    Args:
        x: (b, L, H, P).  B: (b, L, G, N).  dtp, cs: (b, H, c, T) from `chunk_decay_fwd`.
        seq_idx: (b, L) int32 or None (only the tokens of a chunk's last document contribute).
        cfg: optional BLOCK_P / BLOCK_N / BLOCK_T / num_warps / num_stages.
    Returns:
        S: (b, c, H, P, N) float32, S[:, k] = sum over chunk k of exp(cs_end - cs_t) dt'_t x_t B_t^T.

    Example:
        >>> S = chunk_state_local_fwd(x, B, dtp, cs, None, 256)
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    T = chunk_size
    nc = dtp.shape[2]
    cfg = dict(cfg or {})
    # the grid is large (b H c programs per P/N block), so one program takes the whole dstate up to
    # 128: each x tile is then loaded once instead of once per N block
    cfg.setdefault("BLOCK_N", min(128, max(16, next_power_of_2(N))))
    cfg.setdefault("num_stages", 3)
    cfg = _blocks(P, N, cfg)
    cfg.setdefault("BLOCK_T", min(T, 64))
    S = torch.empty(b, nc, H, P, N, device=x.device, dtype=torch.float32)
    grid = (cdiv(P, cfg["BLOCK_P"]) * cdiv(N, cfg["BLOCK_N"]), b * H, nc)
    _chunk_state_local_fwd_kernel[grid](
        x, B, dtp, cs, seq_idx if seq_idx is not None else dtp, S,
        L, H, nc, P, N, H // G,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, HAS_SEQ=seq_idx is not None, **kernel_flags(x.dtype), **cfg,
    )
    return S


def chunk_state_fwd(x: torch.Tensor, B: torch.Tensor, dtp: torch.Tensor, cs: torch.Tensor,
                    initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, chunk_size: int,
                    cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Incoming state of every chunk plus the final state.

    Two paths with the same result (up to fp32 rounding of the same terms): the fused walk (one launch,
    chunks in sequence per program) and the parallel path (`chunk_state_local_fwd` over all chunks at
    once, then `state_passing_fwd`); `use_parallel_chunk_state` picks one from the shape.

    Args:
        x: (b, L, H, P).  B: (b, L, G, N).  dtp, cs: (b, H, c, T) from `chunk_decay_fwd`.
        initial_state: (b, H, P, N) float32 or None.  seq_idx: (b, L) int32 or None.
        cfg: optional (benchmark sweeps, tests): PARALLEL True / False forces a path (None: the policy);
            BLOCK_P / BLOCK_N / BLOCK_T / num_warps / num_stages go to the kernel that computes the chunk
            contributions (fused or parallel); PASS_BLOCK / PASS_WARPS to the state-passing kernel.
    Returns:
        states: (b, c + 1, H, P, N) in `store_dtype(x.dtype)`, states[:, k] entering chunk k (k = c: final).
        final: (b, H, P, N) float32.

    Example:
        >>> states, final = chunk_state_fwd(x, B, dtp, cs, None, None, 256)
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    T = chunk_size
    nc = dtp.shape[2]
    cfg = dict(cfg or {})
    parallel = cfg.pop("PARALLEL", None)
    pass_cfg = {k: cfg.pop(k) for k in ("PASS_BLOCK", "PASS_WARPS") if k in cfg}
    if parallel is None:
        parallel = use_parallel_chunk_state(b, H, nc, P, N, sm_count(x.device, 132))
    if parallel:
        S = chunk_state_local_fwd(x, B, dtp, cs, seq_idx, T, cfg)
        return state_passing_fwd(S, cs, initial_state, seq_idx, store_dtype(x.dtype), T, pass_cfg)
    cfg = _walk_blocks(P, N, T, x.dtype, cfg)
    states = torch.empty(b, nc + 1, H, P, N, device=x.device, dtype=store_dtype(x.dtype))
    final = torch.empty(b, H, P, N, device=x.device, dtype=torch.float32)
    grid = (cdiv(P, cfg["BLOCK_P"]) * cdiv(N, cfg["BLOCK_N"]), b * H)
    _chunk_state_fwd_kernel[grid](
        x, B, dtp, cs, seq_idx if seq_idx is not None else dtp, initial_state if initial_state is not None else final,
        states, final,
        L, H, nc, P, N, H // G,
        x.stride(0), x.stride(1), x.stride(2), B.stride(0), B.stride(1), B.stride(2),
        seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, HAS_H0=initial_state is not None, HAS_SEQ=seq_idx is not None, **kernel_flags(x.dtype), **cfg,
    )
    return states, final


def chunk_state_bwd(dy: torch.Tensor, z: torch.Tensor | None, C: torch.Tensor, cs: torch.Tensor,
                    seq_idx: torch.Tensor | None, states: torch.Tensor, dfinal: torch.Tensor | None,
                    need_dh0: bool, chunk_size: int, cfg: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradients of the chunk-end states, of the initial state, and the chunk-end decay terms.

    Args:
        dy: (b, L, H, P) gradient of y.  z: (b, L, H, P) or None (dY = dy * silu(z)).  C: (b, L, G, N).
        cs: (b, H, c, T).  states: (b, c + 1, H, P, N) from `chunk_state_fwd`.  dfinal: (b, H, P, N) or None.
    Returns:
        dH: (b, c, H, P, N) in states' dtype, dH[:, k] = gradient of the state at the end of chunk k.
        dh0: (b, H, P, N) float32 (or None).
        ddend: (b, H, c, n_pn) float32 partials of exp(cs_end) <dH_k, h_k> (0 where seq_idx lets no state
            through chunk k), summed by the dx kernel: the incoming state's share of <dH_k, h_{k+1}>.

    Example:
        >>> dH, dh0, ddend = chunk_state_bwd(dy, None, C, cs, None, states, None, False, 256)
    """
    b, L, H, P = dy.shape
    G, N = C.shape[2], C.shape[3]
    T = chunk_size
    nc = cs.shape[2]
    cfg = _walk_blocks(P, N, T, dy.dtype, cfg)
    n_pn = cdiv(P, cfg["BLOCK_P"]) * cdiv(N, cfg["BLOCK_N"])
    dH = torch.empty(b, nc, H, P, N, device=dy.device, dtype=states.dtype)
    dh0 = torch.empty(b, H, P, N, device=dy.device, dtype=torch.float32) if need_dh0 else None
    ddend = torch.empty(b, H, nc, n_pn, device=dy.device, dtype=torch.float32)
    zz = z if z is not None else dy
    _chunk_state_bwd_kernel[(n_pn, b * H)](
        dy, zz, C, cs, seq_idx if seq_idx is not None else cs, states,
        dfinal if dfinal is not None else ddend, dH, dh0 if dh0 is not None else ddend, ddend,
        L, H, nc, P, N, H // G,
        dy.stride(0), dy.stride(1), dy.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        C.stride(0), C.stride(1), C.stride(2), seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, HAS_DFINAL=dfinal is not None, HAS_DH0=need_dh0, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None,
        **kernel_flags(dy.dtype), **cfg,
    )
    return dH, dh0, ddend
