"""SSD state passing: the sequential half of the parallel chunk-state forward.

Shapes (legend): b batch, L seqlen, H nheads, P headdim, N dstate, c chunks, T chunk_size.

Given every chunk's own contribution S_c (computed in parallel over chunks by
`triton_chunk_state.chunk_state_local_fwd`), one program per (b, h, block of the P*N state elements)
walks the chunks in order:

    h_0 = initial_state (or 0),    h_{c+1} = exp(cs_end_c) h_c + S_c

storing every incoming state h_c (c = 0..nchunks, the last one being the final state). The work per
step is elementwise, so each program only streams S (fp32 in) and the states (store dtype out); the
next chunk's S block and decay are loaded one step ahead so that a load is always in flight while the
current step waits on its own.

seq_idx: the carried state survives chunk c only if the chunk's last document is the document of the
token before the chunk (chunk 0: token 0), exactly as in the fused kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_launch import cdiv, fast_launch
from .triton_common import kernel_flags, to_dtype

__all__ = ["state_passing_fwd"]


@triton.jit
def _chunk_end_decay(cs_head_ptr, seq_b_ptr, c, seqlen, T: tl.constexpr, HAS_SEQ: tl.constexpr):
    """exp(cs_end_c), zeroed when a document starts inside chunk c or exactly at its start."""
    decay = tl.exp(tl.load(cs_head_ptr + c * T + T - 1))  # exponent <= 0: cs is a cumsum of dt' A <= 0
    if HAS_SEQ:
        seq_prev = tl.load(seq_b_ptr + tl.maximum(c * T - 1, 0))
        seq_end = tl.load(seq_b_ptr + tl.minimum(c * T + T - 1, seqlen - 1))
        decay = tl.where(seq_end == seq_prev, decay, 0.0)
    return decay


@fast_launch
@triton.jit(do_not_specialize=["seqlen", "nchunks"])  # one compile for every length
def _state_passing_fwd_kernel(
    S_ptr, cs_ptr, seq_ptr, h0_ptr, states_ptr, final_ptr,
    seqlen, nheads, nchunks, PN, s_seq_b,
    T: tl.constexpr, BLOCK: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, EMULATE: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // nheads, tl.int64)
    h = pid_bh % nheads
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    chunk_stride = tl.cast(nheads * PN, tl.int64)  # between consecutive chunks of S and of `states`
    S_base = S_ptr + (b * nchunks * nheads + h) * PN + offs
    st_base = states_ptr + (b * (nchunks + 1) * nheads + h) * PN + offs
    cs_head = cs_ptr + (b * nheads + h) * nchunks * T  # this head's (c, T) rows
    seq_b = seq_ptr + b * s_seq_b

    if HAS_H0:
        state = tl.load(h0_ptr + (b * nheads + h) * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    S_next = tl.load(S_base, mask=mask, other=0.0)
    decay_next = _chunk_end_decay(cs_head, seq_b, 0, seqlen, T, HAS_SEQ)
    for c in range(nchunks):
        tl.store(st_base + c * chunk_stride, to_dtype(state, states_ptr.dtype.element_ty, EMULATE), mask=mask)
        S_c = S_next
        decay = decay_next
        # one step ahead (clamped / masked on the last chunk): these loads do not depend on the state
        # (the chunk test is a vector comparison: Triton 3.9's interpreter rejects a scalar one in a mask)
        S_next = tl.load(S_base + (c + 1) * chunk_stride, mask=mask & (offs * 0 + c + 1 < nchunks), other=0.0)
        decay_next = _chunk_end_decay(cs_head, seq_b, tl.minimum(c + 1, nchunks - 1), seqlen, T, HAS_SEQ)
        state = state * decay + S_c
    tl.store(st_base + nchunks * chunk_stride, to_dtype(state, states_ptr.dtype.element_ty, EMULATE), mask=mask)
    tl.store(final_ptr + (b * nheads + h) * PN + offs, state, mask=mask)


def _pass_config(cfg: dict | None) -> tuple[int, int]:
    """(elements per program, warps): 1024 fp32 in 4 warps is two 16-byte loads per thread per chunk."""
    cfg = cfg or {}
    return cfg.get("PASS_BLOCK", 1024), cfg.get("PASS_WARPS", 4)


def state_passing_fwd(S: torch.Tensor, cs: torch.Tensor, initial_state: torch.Tensor | None,
                      seq_idx: torch.Tensor | None, states_dtype: torch.dtype, chunk_size: int,
                      cfg: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Incoming state of every chunk plus the final state, from the chunks' own contributions.

    Args:
        S: (b, c, H, P, N) float32, S[:, k] = chunk k's contribution to its end state (from zero).
        cs: (b, H, c, T) from `chunk_decay_fwd`.  initial_state: (b, H, P, N) float32 or None.
        seq_idx: (b, L) int32 or None.  states_dtype: dtype of the returned states.
        cfg: optional PASS_BLOCK (state elements per program, a power of two) / PASS_WARPS.
    Returns:
        states: (b, c + 1, H, P, N) in states_dtype, states[:, k] entering chunk k (k = c: final).
        final: (b, H, P, N) float32.

    Example:
        >>> states, final = state_passing_fwd(S, cs, None, None, torch.bfloat16, 256)
    """
    b, nc, H, P, N = S.shape
    block, warps = _pass_config(cfg)
    states = torch.empty(b, nc + 1, H, P, N, device=S.device, dtype=states_dtype)
    final = torch.empty(b, H, P, N, device=S.device, dtype=torch.float32)
    grid = (cdiv(P * N, block), b * H)
    _state_passing_fwd_kernel[grid](
        S, cs, seq_idx if seq_idx is not None else cs, initial_state if initial_state is not None else final,
        states, final,
        seq_idx.shape[1] if seq_idx is not None else 0, H, nc, P * N,
        seq_idx.stride(0) if seq_idx is not None else 0,
        T=chunk_size, BLOCK=block, HAS_H0=initial_state is not None, HAS_SEQ=seq_idx is not None,
        EMULATE=kernel_flags(torch.float32)["EMULATE"], num_warps=warps,
    )
    return states, final
