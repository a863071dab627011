"""SSD chunk primitive 4: the chunk output (diagonal blocks plus the incoming state), and C B^T per group.

Shapes (legend): b batch, L seqlen, H nheads, P headdim, G ngroups, N dstate, c chunks, T chunk_size,
R = H / G heads per group, BM the row block.

    CB[i, j]  = C_i . B_j  for j <= i in the same document, else 0     (b, c, G, T, T) fp32, once per group
    y_i       = exp(cs_i) C_i h_c^T                                      state -> output ("off-diagonal")
              + sum_{j <= i} CB[i, j] exp(cs_i - cs_j) dt'_j x_j         intra-chunk ("diagonal")
              + D x_i ;  y_i *= silu(z_i)

C B^T is shared by the R heads of a group: computing it once per group instead of once per head saves
R - 1 of R of the largest matmul (T x T x N); the output kernel then streams its (BM x BM) tiles from L2.
Only the lower-triangular tiles are computed and stored; the causal and document masks are folded in.
The output kernel runs the heaviest row blocks first (the last rows see the most tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import cdiv, fast_launch, next_power_of_2
from ..triton_math import silu
from .triton_common import kernel_flags, mm, to_dtype

__all__ = ["chunk_cb_fwd", "chunk_scan_fwd"]


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_cb_kernel(
    C_ptr, B_ptr, seq_ptr, cb_ptr,
    seqlen, nchunks, ngroups, dstate,
    s_C_b, s_C_l, s_C_g, s_B_b, s_B_l, s_B_g, s_seq_b,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, OP: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid_k > pid_m:  # upper tiles are never read
        return
    pid_bcg = tl.program_id(2)
    g = pid_bcg % ngroups
    c = (pid_bcg // ngroups) % nchunks
    b = tl.cast(pid_bcg // (ngroups * nchunks), tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = c * T + rows < seqlen
    cmask = c * T + cols < seqlen
    chunk0 = tl.cast(c * T, tl.int64)
    C_base = C_ptr + b * s_C_b + g * s_C_g + (chunk0 + rows[:, None]) * s_C_l
    B_base = B_ptr + b * s_B_b + g * s_B_g + (chunk0 + cols[None, :]) * s_B_l
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < dstate
        Ct = tl.load(C_base + offs_n[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)  # (BM, BN)
        BT = tl.load(B_base + offs_n[:, None], mask=nmask[:, None] & cmask[None, :], other=0.0)  # (BN, BM)
        acc = mm(Ct, BT, acc, OP, EMULATE)
    keep = rows[:, None] >= cols[None, :]
    if HAS_SEQ:
        seq_r = tl.load(seq_ptr + b * s_seq_b + c * T + rows, mask=rmask, other=0)
        seq_c = tl.load(seq_ptr + b * s_seq_b + c * T + cols, mask=cmask, other=0)
        keep &= seq_r[:, None] == seq_c[None, :]
    acc = tl.where(keep, acc, 0.0)
    cb_base = cb_ptr + ((b * nchunks + c) * ngroups + g) * T * T
    tl.store(cb_base + rows[:, None] * T + cols[None, :], acc)


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _chunk_scan_fwd_kernel(
    x_ptr, z_ptr, D_ptr, C_ptr, cb_ptr, states_ptr, dtp_ptr, cs_ptr, seq_ptr, y_ptr, ypre_ptr, xsum_ptr,
    seqlen, nheads, nchunks, headdim, dstate, hpg, ngroups,
    s_x_b, s_x_l, s_x_h, s_z_b, s_z_l, s_z_h, s_C_b, s_C_l, s_C_g, s_seq_b,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    OP: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest row blocks first
    pid_hp = tl.program_id(1)
    pid_bc = tl.program_id(2)
    n_pblk = tl.cdiv(headdim, BLOCK_P)
    h = pid_hp // n_pblk
    pid_p = pid_hp % n_pblk
    g = h // hpg
    c = pid_bc % nchunks
    b = tl.cast(pid_bc // nchunks, tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    rmask = c * T + rows < seqlen
    chunk0 = tl.cast(c * T, tl.int64)
    dc_ptr = ((b * nheads + h) * nchunks + c) * T
    cs_m = tl.load(cs_ptr + dc_ptr + rows)

    # state -> output: (BM, N) @ (N, BP), scaled per row by the decay since the chunk start
    C_t = tl.load(C_ptr + b * s_C_b + g * s_C_g + (chunk0 + rows[:, None]) * s_C_l + offs_n[None, :],
                  mask=rmask[:, None] & nmask[None, :], other=0.0)
    PN = headdim * dstate
    hT = tl.load(states_ptr + ((b * (nchunks + 1) + c) * nheads + h) * PN + offs_p[None, :] * dstate
                 + offs_n[:, None], mask=nmask[:, None] & pmask[None, :], other=0.0)  # (BN, BP)
    scale = tl.exp(cs_m)  # exponent <= 0
    if HAS_SEQ:
        seq_m = tl.load(seq_ptr + b * s_seq_b + c * T + rows, mask=rmask, other=0)
        seq_prev = tl.load(seq_ptr + b * s_seq_b + tl.maximum(c * T - 1, 0))
        scale = tl.where(seq_m == seq_prev, scale, 0.0)
    acc = mm(C_t, hT, tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), OP, EMULATE) * scale[:, None]

    # diagonal block: causal tiles of C B^T, decayed and weighted by dt'. Non-finite values must stay causal
    # (a NaN or inf at token j reaches rows i >= j only, as in the recurrence), but a dot multiplies the
    # zeros above the diagonal too, and 0 * NaN = NaN: so w is selected to exactly 0 there (whatever dt'_j),
    # and when x holds a non-finite entry anywhere (its float32 sum, `xsum_ptr`, is then non-finite) the dot
    # reads x with its non-finite entries zeroed, and those entries are added back as a sum over j <= i
    # (0 up to the first non-finite x_j of a column, non-finite from it on): over whole tiles left of the
    # diagonal, as a cumulative sum within the diagonal tile. That repair costs ~60% of this kernel's time,
    # so it runs only behind the runtime flag (one uniform branch per program; see BENCHMARKS.md, SSD).
    all_finite = tl.abs(tl.load(xsum_ptr)) < float("inf")  # False for NaN too
    cb_base = cb_ptr + ((b * nchunks + c) * ngroups + g) * T * T + rows[:, None] * T
    x_base = x_ptr + b * s_x_b + h * s_x_h + chunk0 * s_x_l + offs_p[None, :]
    x_bad = tl.zeros((BLOCK_P,), dtype=tl.float32)  # sum of the non-finite x over the tiles left of the diagonal
    for k in range(0, pid_m + 1):
        cols = k * BLOCK_M + tl.arange(0, BLOCK_M)
        cb = tl.load(cb_base + cols[None, :])
        cs_k = tl.load(cs_ptr + dc_ptr + cols)
        dtp_k = tl.load(dtp_ptr + dc_ptr + cols)
        # above the diagonal the exponent is > 0 (it may overflow): selected away with the rest
        w = tl.where(rows[:, None] >= cols[None, :], cb * tl.exp(cs_m[:, None] - cs_k[None, :]) * dtp_k[None, :],
                     0.0)
        x_k = tl.load(x_base + cols[:, None] * s_x_l, mask=(c * T + cols < seqlen)[:, None] & pmask[None, :],
                      other=0.0)
        if all_finite:
            acc = mm(w, x_k, acc, OP, EMULATE)
        else:
            finite = tl.abs(x_k) < float("inf")  # False for NaN too
            acc = mm(w, tl.where(finite, x_k, 0.0), acc, OP, EMULATE)
            bad = tl.where(finite, 0.0, x_k.to(tl.float32))
            if k < pid_m:
                x_bad += tl.sum(bad, axis=0)
            else:
                acc += tl.cumsum(bad, axis=0)  # the diagonal tile: its rows are its columns
    acc += x_bad[None, :]

    io_mask = rmask[:, None] & pmask[None, :]
    x_m = tl.load(x_base + rows[:, None] * s_x_l, mask=io_mask, other=0.0).to(tl.float32)
    if HAS_D:
        if D_PER_CHANNEL:
            Dv = tl.load(D_ptr + h * headdim + offs_p, mask=pmask, other=0.0)
            acc += Dv[None, :] * x_m
        else:
            acc += tl.load(D_ptr + h) * x_m
    y_offs = (b * seqlen + chunk0 + rows[:, None]) * nheads * headdim + h * headdim + offs_p[None, :]
    if HAS_Z:
        tl.store(ypre_ptr + y_offs, to_dtype(acc, ypre_ptr.dtype.element_ty, EMULATE), mask=io_mask)
        z_m = tl.load(z_ptr + b * s_z_b + h * s_z_h + (chunk0 + rows[:, None]) * s_z_l + offs_p[None, :],
                      mask=io_mask, other=0.0).to(tl.float32)
        acc *= silu(z_m)
    tl.store(y_ptr + y_offs, to_dtype(acc, y_ptr.dtype.element_ty, EMULATE), mask=io_mask)


def chunk_cb_fwd(C: torch.Tensor, B: torch.Tensor, seq_idx: torch.Tensor | None, chunk_size: int,
                 x_dtype: torch.dtype, cfg: dict | None = None) -> torch.Tensor:
    """C B^T per chunk and group, causal and document masks folded in (lower tiles only are written).

    Args:
        C, B: (b, L, G, N).  seq_idx: (b, L) int32 or None.  x_dtype: sets the dot-operand precision.
    Returns:
        cb: (b, c, G, T, T) float32; tiles above the diagonal are uninitialised and never read.

    Example:
        >>> cb = chunk_cb_fwd(C, B, None, 256, torch.bfloat16)
    """
    b, L, G, N = C.shape
    T = chunk_size
    nc = cdiv(L, T)
    cfg = dict(cfg or {})
    cfg.setdefault("BLOCK_M", min(T, 64))
    cfg.setdefault("BLOCK_N", min(64, max(16, next_power_of_2(N))))
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    cb = torch.empty(b, nc, G, T, T, device=C.device, dtype=torch.float32)
    nblk = T // cfg["BLOCK_M"]
    _chunk_cb_kernel[(nblk, nblk, b * nc * G)](
        C, B, seq_idx if seq_idx is not None else cb, cb,
        L, nc, G, N,
        C.stride(0), C.stride(1), C.stride(2), B.stride(0), B.stride(1), B.stride(2),
        seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, HAS_SEQ=seq_idx is not None, **kernel_flags(x_dtype), **cfg,
    )
    return cb


def chunk_scan_fwd(x: torch.Tensor, z: torch.Tensor | None, D: torch.Tensor | None, C: torch.Tensor,
                   cb: torch.Tensor, states: torch.Tensor, dtp: torch.Tensor, cs: torch.Tensor,
                   seq_idx: torch.Tensor | None, chunk_size: int, cfg: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The SSD output y, and y before the z gate when z is given (the backward needs it for dz).

    Args:
        x, z: (b, L, H, P).  D: (H,) or (H, P) float32 or None.  C: (b, L, G, N).  cb: from `chunk_cb_fwd`.
        states: (b, c + 1, H, P, N) from `chunk_state_fwd`.  dtp, cs: (b, H, c, T).  seq_idx: (b, L) or None.
    Returns:
        y: (b, L, H, P) in x's dtype, contiguous.   y_pre: same shape, float32, or None without z.

    Example:
        >>> y, _ = chunk_scan_fwd(x, None, D, C, cb, states, dtp, cs, None, 256)
    """
    b, L, H, P = x.shape
    G, N = C.shape[2], C.shape[3]
    T = chunk_size
    nc = dtp.shape[2]
    cfg = dict(cfg or {})
    # Small heads take 32-row tiles. With 64 rows, 4 warps and a P tile of 16 or 32 in bf16, Triton 3.6 on the
    # H200 miscompiled this kernel at dstate 64: y off by 6-10x its scale on contiguous inputs, and in a model's
    # strided layout a read outside shared memory (compute-sanitizer), an illegal memory access. dstate 16 / 256,
    # float32, P >= 64, 32-row tiles, 2 or 8 warps were right (BENCHMARKS.md, the synthetic steps; the GPU tests
    # test_gpu_small_heads_low_precision and test_gpu_small_head_model_under_autocast). Every headdim now takes
    # 32 rows, headdim 64 with 2 warps: on an H100 (session 37, batch 2 x 64 heads, dstate 128, bf16) 0.127 /
    # 0.439 / 1.659 ms at seqlen 2048 / 8192 / 32768 against 0.140 / 0.495 / 1.909 with 64 rows and 4 warps.
    cfg.setdefault("BLOCK_M", min(T, 32))
    cfg.setdefault("BLOCK_P", min(128, max(16, next_power_of_2(P))))
    cfg.setdefault("num_warps", 2 if cfg["BLOCK_P"] == 64 and cfg["BLOCK_M"] == 32 else 4)
    cfg.setdefault("num_stages", 2)
    block_n = max(16, next_power_of_2(N))
    y = torch.empty(b, L, H, P, device=x.device, dtype=x.dtype)
    # y before the gate feeds dz = dy * y_pre * silu'(z) only; fp32 keeps one bf16 rounding out of dz
    y_pre = torch.empty_like(y, dtype=torch.float32) if z is not None else None
    zz = z if z is not None else x
    # non-finite iff some x is (or the finite values overflow float32: then the exact path runs, only slower)
    xsum = torch.sum(x, dtype=torch.float32)
    grid = (T // cfg["BLOCK_M"], H * cdiv(P, cfg["BLOCK_P"]), b * nc)
    _chunk_scan_fwd_kernel[grid](
        x, zz, D if D is not None else dtp, C, cb, states, dtp, cs, seq_idx if seq_idx is not None else dtp,
        y, y_pre if y_pre is not None else y, xsum,
        L, H, nc, P, N, H // G, G,
        x.stride(0), x.stride(1), x.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
        C.stride(0), C.stride(1), C.stride(2), seq_idx.stride(0) if seq_idx is not None else 0,
        T=T, BLOCK_N=block_n, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
        HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, **kernel_flags(x.dtype), **cfg,
    )
    return y, y_pre
