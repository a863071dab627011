"""Tile indexing and address helpers shared by the selective scan's forward and backward kernels.

Shapes (legend): B batch, L seqlen, D dim (channels), G ngroups, N dstate.
A program owns BD channels of one batch row and all N states of them, held as a (NL, NH, BD) register tile:
NL states in each thread (contiguous in memory, so B_t / C_t load as one vector), NH lanes along the states,
BD lanes along the channels. N = NL * NH (padded to a power of two); `scan_policy.pick_tiles` picks them.

Layout: the tile must keep its NL states inside each thread (reductions over the states are then register
adds, B_t / C_t one vector load). Triton lets every load of >= 32 * num_warps elements "anchor" the layout of
what it feeds, with the vectorised layout its coalescing pass picks (at most 128 bits per thread along the
contiguous axis). So the forward gathers its (dstate, BD) tiles (A, initial state) row by row (`load_rows`),
and the backward, whose per-chunk tiles must be real vector loads, holds NL <= 4 float32 states per thread,
exactly one 128-bit vector: those anchors then have the loop's layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_rows", "load_bc", "tile_index", "time_offset", "entering_carry_index", "load_tile_rows",
           "store_tile_rows"]


@triton.jit
def load_rows(ptr, s_n, s_d, d1, n3, dstate, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr,
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
def load_bc(ptr, off, n2, n_ok2, EVEN_N: tl.constexpr):
    """B_t or C_t (at ptr + off) of the program's group as (NL, NH): NL contiguous floats per thread, one
    vector load."""
    if EVEN_N:
        v = tl.load(ptr + (off + n2))
    else:
        v = tl.load(ptr + (off + n2), mask=n_ok2, other=0.0)
    return v


@triton.jit
def tile_index(pid_d, dstate, group_size, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr):
    """Indices of program pid_d's (NL, NH, BD) tile: channel lanes dl (BD,), channels d1 (BD,), states n2
    (NL, NH) with their mask, the same as (NL, NH, 1) / (1, 1, BD) broadcasts, and the group g of its B, C
    (BD divides group_size, so channels need no mask)."""
    dl = tl.arange(0, BD)
    d1 = pid_d * BD + dl
    n2 = tl.arange(0, NH)[None, :] * NL + tl.arange(0, NL)[:, None]  # (NL, NH) state index
    n_ok2 = n2 < dstate
    return dl, d1, n2, n_ok2, n2[:, :, None], d1[None, None, :], n_ok2[:, :, None], (pid_d * BD) // group_size


@triton.jit
def time_offset(t, I64: tl.constexpr):
    # t * stride overflows int32 on long sequences (1M tokens x stride 3072): 64-bit only where
    # the launcher says so; 32-bit offsets save address instructions in every step
    return tl.cast(t, tl.int64) if I64 else t
@triton.jit
def entering_carry_index(pid_c, cin_n, cin_k):
    """Where the carry entering time segment pid_c's last step lies among the adjoint-only pass's (B, cin_n, D, N)
    carries: carry segments are cin_k times finer and stored in reversed order, so it is the carry-in of sub-segment
    (pid_c + 1) cin_k - 1, at cin_n - (pid_c + 1) cin_k (0: dL/dh_final, for the last segment)."""
    return tl.maximum(cin_n - (pid_c + 1) * cin_k, 0)


# Addresses are written base + (offset): the integer offsets add up in 32 bits (64 with I64) and meet the
# 64-bit base once; (base + t * stride) + lane would be two 64-bit pointer adds per access. Accesses with the same stride share their offset.



# Row-gathered tiles (the backward's ROWS variant, NL > 4 states per thread): a vectorised (NL, NH, BD) load
# would anchor a layout with at most 4 float32 states per thread (see the module docstring), so these move one
# in-thread state row i (states i, NL + i, ...: an (NH, BD) slab) per access; i is a compile-time index, so
# the selects below fold away and each row costs one load or store per thread.


@triton.jit
def load_tile_rows(ptr, s_n, s_d, d, dstate, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr,
                   ACC: tl.constexpr):
    """(NL, NH, BD) tile whose element (n, lane) is at ptr + n * s_n + d[lane] * s_d (n >= dstate: 0)."""
    nl3 = tl.arange(0, NL)[:, None, None]
    out = tl.zeros((NL, NH, BD), dtype=ACC)
    for i in tl.static_range(NL):
        n = tl.arange(0, NH)[:, None] * NL + i  # (NH, 1): the states of in-thread row i
        row = tl.load(ptr + (n * s_n + d[None, :] * s_d), mask=(n < dstate) & (d[None, :] >= 0), other=0.0)
        out = tl.where(nl3 == i, row.to(ACC)[None, :, :], out)
    return out


@triton.jit
def store_tile_rows(ptr, tile, s_n, s_d, d, dstate, NL: tl.constexpr, NH: tl.constexpr, BD: tl.constexpr):
    """Store an (NL, NH, BD) tile as load_tile_rows reads it, one in-thread row at a time."""
    nl3 = tl.arange(0, NL)[:, None, None]
    for i in tl.static_range(NL):
        # an in-thread sum of one value and -0.0s: x + -0.0 == x exactly, so the compiler keeps a plain move
        row = tl.sum(tl.where(nl3 == i, tile, -0.0), axis=0)  # (NH, BD)
        n = tl.arange(0, NH)[:, None] * NL + i
        tl.store(ptr + (n * s_n + d[None, :] * s_d), row, mask=(n < dstate) & (d[None, :] >= 0))
