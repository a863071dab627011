"""Launch policy of the Triton selective scan, plain Python (no Triton import: tested on CPU).

The kernels (`triton_scan_fwd.py`, `triton_scan_bwd.py`) take their tiling and their time segmentation from
here; `triton_scan.py` launches them. Every choice is a function of the shape, the SM count (132, an H100's,
off the GPU) and a `ScanConfig` override:

    pick_tiles               (NL, NH, BD, num_warps) of one program: states per thread, lanes on states, channels
    fwd_nl                   states per thread of the forward for the launch's number of rows
    default_time_segments      time segments of the forward (1: the sequential forward)
    default_bwd_time_segments  time segments of the backward
    bwd_block_u              the backward's micro-block U (states re-derived in registers per scratch checkpoint)
    carry_split              carry segments per backward segment in the adjoint-only pass
    segments                 (segment length, segment count) in whole checkpoint intervals
    needs_i64                whether time offsets need 64-bit arithmetic

Vocabulary: a *checkpoint interval* (`ScanConfig.checkpoint_interval`) is the steps between the forward's saved states;
a *time segment* is a stretch of whole checkpoint intervals scanned by its own programs. The measurements
behind the thresholds are in BENCHMARKS.md (selective scan sections).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ...deprecation import renamed_argument
from ..common import cdiv, next_power_of_2, sm_count

__all__ = ["ScanConfig", "Tiles", "pick_tiles", "fwd_nl", "default_time_segments", "default_bwd_time_segments",
           "bwd_block_u", "carry_split", "segments", "needs_i64", "BWD_VARIANTS", "variant_params",
           "bwd_variant_config", "bwd_replicas", "chunked_bwd_tiles", "chunked_bwd_rows", "chunked_bwd_time_segments",
           "chunked_bwd_transposed", "bwd_prefetch", "fwd_prefetch", "carry_prefetch", "DEFAULT_CONFIG"]

# steps between forward checkpoints. The backward's per-program scratch (h every U steps of an interval) grows with it:
# at 128 steps its live scratch (16 resident programs per SM) passed the H100's 50 MB L2 and spilled to DRAM
# (Nsight Compute: 2.2 GB of DRAM traffic in a 130M-shape backward that needs ~0.4 GB; 1.9 GB at 64). H100, session
# 35: fwd+bwd 2.420 / 2.400 / 2.346 ms at 128 / 64 / 32 (130M training shape), 1.652 / 6.275 / 25.06 -> 1.639 /
# 6.216 / 24.93 ms at batch 2 x 4096 from 128 to 64, and less peak memory; 32 is unmeasured beyond the first shape
DEFAULT_CHECKPOINT_INTERVAL = 64
MAX_REPLICAS = 32  # copies of dB / dC the backward's atomics spread over, at most (see `bwd_replicas`)
SOURCES_PER_REPLICA = 48  # channel groups adding into one replica's (b, t, g) row (H100 sweep, `bwd_replicas`)
DEFAULT_REDUCE_CHANNELS = 4  # dB / dC: channel lanes summed by shuffles before the atomic (H100 sweep)
# Backward occupancy: U = 2 needs fewer registers than U = 4 (more warps per SM) but issues more instructions per
# step, so it wins once the launch has the warps to fill the SMs, U = 4 below. Time segments are added until the
# launch has BWD_MIN_WARPS_PER_SM warps per SM. Thresholds from the H100 sweeps (figures: BENCHMARKS.md and
# docs/design/kernel_figures.md).
BWD_U2_MIN_WARPS_PER_SM = 13
BWD_MIN_WARPS_PER_SM = 24
# L2 prefetch distances in steps (0: off): the forward's passes (x / dt / z ahead), the backward's adjoint-only carry
# pass (dt / dy / z, back in time) and the backward's pass A (x / dt ahead, dy / z of its own steps). Nsight Compute
# (session 36, H100, 130M training shape): the carry pass spent 51% of its cycles on long-scoreboard waits, the
# forward's passes ~31%. H100 sweeps: forward 0.538 -> 0.449 ms at the training shape, 1.338 -> 1.132 at batch 2 x
# 4096 x 8192 (8 steps: 0.451 / 1.219, 32: 0.453 / 1.135); the carry pass 228 -> 194 us; the graphed 130M Mamba-1
# training step 174.9k / 175.5k -> 178.2k / 178.3k tokens/s (two alternated pairs). The backward's own prefetch made
# the scan alone 1-2% faster but the training step slower (176.1k / 175.7k with it on top): it stays off.
DEFAULT_BWD_PREFETCH = 0
DEFAULT_FWD_PREFETCH = 16
DEFAULT_CARRY_PREFETCH = 8


@dataclass(frozen=True, init=False)
class ScanConfig:
    """Tiling knobs (defaults are chosen from the shape; tests and benchmarks override them).

    fwd_nl / bwd_nl: states held per thread (NL); the rest of dstate spreads over NH lanes.
    bwd_channels: channels per warp in the backward (more: fewer dB/dC atomics, more shuffles).
    checkpoint_interval: steps between forward checkpoints (multiple of 4 and of block_u).
    block_u: backward micro-block, the U states re-derived in registers per scratch checkpoint (None: 2 when
        the backward launch has the warps to use the extra occupancy, else 4); in the chunked backward the steps
        held in registers (`chunked_bwd_rows`).
    time_segments: time segments the forward scans in parallel (see `default_time_segments`); None picks
        from the shape, 1 is the plain sequential forward. Segments hold a whole number of checkpoint
        intervals, so fewer segments than asked are used when seqlen / checkpoint_interval is small.
    bwd_reduce_channels: channels whose dB_t / dC_t are summed with warp shuffles before the float32
        atomic (a power of two; capped at the program's channels). None: DEFAULT_REDUCE_CHANNELS. 1: no
        shuffles, every channel lane adds its own value (more atomic bytes, fewer instructions).
    bwd_replicas: copies of dB / dC the atomics spread over (each zero-filled, then summed afterwards;
        memory 2 x replicas x batch x seqlen x ngroups x dstate floats). None picks from the shape
        (`bwd_replicas`).
    bwd_maxnreg: register cap per thread for the backward kernel (None: the compiler's choice), to fit
        more warps per SM. None by default: the default U = 2 float32 kernel compiles to 128 registers by
        itself (16 one-warp programs per SM; a slow CI test keeps it there). Session 32 capped a kernel that
        wanted 156 at 128; it measured 4-6% slower on an H100 and went, with its cap (BENCHMARKS.md, session 33).
    bwd_time_segments: time segments the backward runs in parallel (see `default_bwd_time_segments`); None
        picks from the shape, 1 is one program per (row, channels) walking the whole sequence.
    bwd_carry_split: carry segments per backward segment in the adjoint-only pass of a time-parallel
        backward (None: twice as many in all as the forward's time segments, `carry_split`).
    bwd_prefetch: steps ahead at which the backward's pass A asks the L2 for the x / dt rows it reads next,
        together with the dy / z rows of its own steps that pass B reads after it (None: the policy's
        DEFAULT_BWD_PREFETCH, off: it made the training step slower; 0: off). GPU only: the interpreter skips it (a
        prefetch changes no value).
    fwd_prefetch / carry_prefetch: the same L2 prefetch in the forward kernel (x / dt / z rows this many steps
        ahead) and in the backward's adjoint-only carry pass (dt / dy / z rows this many steps back). None: the
        policy's default (DEFAULT_FWD_PREFETCH / DEFAULT_CARRY_PREFETCH); 0: off. GPU only, like bwd_prefetch.
    bwd_rows: move the backward's (D, N) tiles (A, checkpoints, carry, scratch) one in-thread state row at a
        time, which allows bwd_nl > 4 (the "wide" variants of BWD_VARIANTS; `bwd_variant_config` sets it).
    bwd_chunked: the "chunked" backward (`triton_scan_bwd_chunked.py`): one warp over bwd_channels channels (a lane
        each) holds block_u steps in registers and loops over the states; bwd_reduce_channels is then the lanes
        summed before each dB / dC atomic (default: the warp's); bwd_nl and bwd_rows do not apply to it.
    bwd_transposed_sums: in the chunked backward, sum a block's block_u rows of dB_t / dC_t over the warp at once (a
        reduce-scatter across the lanes, then one atomic for the block's rows) instead of one warp sum and one atomic
        per row; needs block_u and bwd_channels powers of two with block_u <= bwd_channels (else the per-row sums
        run); bwd_reduce_channels does not apply.
    """

    fwd_nl: int | None = None
    bwd_nl: int | None = None
    bwd_channels: int | None = None
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL
    block_u: int | None = None
    time_segments: int | None = None
    bwd_reduce_channels: int | None = None
    bwd_replicas: int | None = None
    bwd_maxnreg: int | None = None
    bwd_time_segments: int | None = None
    bwd_carry_split: int | None = None
    bwd_rows: bool = False
    bwd_chunked: bool = False
    bwd_prefetch: int | None = None
    fwd_prefetch: int | None = None
    carry_prefetch: int | None = None
    bwd_transposed_sums: bool = False

    def __init__(self, *args, chunk: int | None = None, time_chunks: int | None = None,
                 bwd_time_chunks: int | None = None, **kwargs):
        # the former names (before "chunk" came to mean the SSD block only) still work, with a DeprecationWarning
        for old, new, value in (("chunk", "checkpoint_interval", chunk), ("time_chunks", "time_segments", time_chunks),
                                ("bwd_time_chunks", "bwd_time_segments", bwd_time_chunks)):
            if value is not None:
                kwargs[new] = renamed_argument("ScanConfig", old, new, value, kwargs.get(new))
        names = _SCAN_CONFIG_FIELDS
        if len(args) > len(names):
            raise TypeError(f"ScanConfig takes at most {len(names)} positional arguments, got {len(args)}")
        unknown = sorted(set(kwargs).difference(names))
        if unknown:
            raise TypeError(f"ScanConfig got unexpected arguments {unknown}")
        values = _SCAN_CONFIG_DEFAULTS | dict(zip(names, args)) | kwargs
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: the dataclass's own __init__ does the same

    def as_ints(self) -> list[int]:
        """The fields as ints (None -> -1): how the config crosses the custom op's schema.

        Every scan call makes this round trip (twice with its backward), so both directions are cheap: the fields
        are read directly (`dataclasses.astuple` deep-copied them: ~50 us per call) and `from_ints` memoizes.
        """
        values = [getattr(self, name) for name in _SCAN_CONFIG_FIELDS]  # (torch.compile traces this: plain getattr)
        return [-1 if v is None else int(v) for v in values]

    @classmethod
    def from_ints(cls, values: list[int]) -> "ScanConfig":
        return _scan_config_from_ints(cls, tuple(values))


_SCAN_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ScanConfig))
_SCAN_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ScanConfig)}


# The config of a Triton scan called without one (`selective_scan`, the fused Mamba-1 op): benchmarks set it to A/B a
# backward variant through whole models (`gpu_train.py --scan-variant`), as they set the decode policies
DEFAULT_CONFIG = ScanConfig()


@functools.lru_cache(maxsize=256)
def _scan_config_from_ints(cls: type, values: tuple[int, ...]) -> ScanConfig:
    """One ScanConfig per distinct int list (a frozen dataclass: sharing it is safe)."""
    return cls(*(None if v == -1 else v for v in values))


@dataclass(frozen=True)
class Tiles:
    NL: int
    NH: int
    BD: int
    num_warps: int


def pick_tiles(nl: int, dstate: int, group_size: int, channels: int | None = None) -> Tiles:
    """(NL, NH, BD) for one program: NL states per thread, NH lanes on states, BD channels (a power
    of two dividing the group size, so a program reads one group's B, C); lanes fill BD first."""
    bn = next_power_of_2(dstate)
    nl = min(nl, bn)
    nh = bn // nl
    lanes_bd = max(1, 32 // nh) if channels is None else channels
    bd = min(lanes_bd, group_size & -group_size)  # largest power of two dividing group_size
    num_warps = max(1, min(8, nh * bd // 32))
    return Tiles(nl, nh, bd, num_warps)


def fwd_nl(rows: int, dim: int, dstate: int, device: torch.device) -> int:
    """States per thread in the forward: as many as possible (no replicated per-channel math)
    while the launch still has ~3 warps per SM to keep every scheduler issuing. `rows` counts the
    independent (batch row, time segment) scans."""
    bn = next_power_of_2(dstate)
    sms = sm_count(device, 132)
    nl = min(bn, 16)
    while nl > 4 and rows * dim * (bn // nl) < 3 * sms * 32:
        nl //= 2
    return nl


# Time-parallel forward (see default_time_segments): the sequential forward's time is flat from ~8 warps per SM
# (H100 probe at equal tokens: docs/design/kernel_figures.md).
FWD_MIN_WARPS_PER_SM = 15  # split until the full pass has this many one-program warps per SM (H100 sweep, BENCHMARKS.md)
MIN_SEGMENT = 256  # shortest time segment worth a split (pass 1 + 2 are per-segment overheads)
MAX_TIME_SEGMENTS = 64


def fwd_warps(rows: int, dim: int, dstate: int, group_size: int, nl: int) -> int:
    tiles = pick_tiles(nl, dstate, group_size)
    return rows * (dim // tiles.BD) * tiles.num_warps


def default_time_segments(batch: int, seqlen: int, dim: int, dstate: int, ngroups: int = 1,
                        config: ScanConfig | None = None, device: torch.device | str = "cuda") -> int:
    """Time segments of the forward for this shape: 1 unless the launch lacks parallelism.

    The sequential forward runs one one-warp program per (batch row, BD channels) walking the whole
    sequence: with few programs it is latency-bound (about one warp per scheduler at batch 2 x dim 4096 on
    an H100). Splitting time into nc segments multiplies the programs by nc but adds a state-only pass over
    (nc - 1) / nc of the sequence (cheaper per step than the full pass: it skips C, z, D, y and checkpoints,
    not the exps) and a tiny combine pass. So: the smallest power of two nc that brings
    the full pass to FWD_MIN_WARPS_PER_SM warps per SM (NL re-chosen for batch x nc rows), keeping
    segments of at least MIN_SEGMENT steps and whole checkpoint intervals, at most MAX_TIME_SEGMENTS.
    The threshold comes from the H100 sweep (batch 2 x dim 4096, BENCHMARKS.md): flat beyond 8 segments.
    Examples on 132 SMs, dstate 16: batch 2 x dim 4096: 8 from seqlen 2048, 4 at 1024, 2 at 512;
    batch 4: 4; batch 8: 2; batch 16: 1; batch 1 x dim 1536, 1M tokens: 64 (16K-step segments).
    `config.time_segments` overrides (tests, benchmarks).
    """
    cfg = config or ScanConfig()
    if cfg.time_segments is not None:
        return max(1, cfg.time_segments)
    device = torch.device(device)
    target = FWD_MIN_WARPS_PER_SM * sm_count(device, 132)
    group_size = dim // ngroups
    min_seg = max(MIN_SEGMENT, cfg.checkpoint_interval)
    return split_until(seqlen, min_seg, target, lambda nc: fwd_warps(
        batch * nc, dim, dstate, group_size, cfg.fwd_nl or fwd_nl(batch * nc, dim, dstate, device)))


def split_until(seqlen: int, min_seg: int, target: int, warps) -> int:
    """The smallest power of two nc with warps(nc) >= target, keeping segments of at least min_seg steps
    (seqlen >= nc * min_seg) and nc <= MAX_TIME_SEGMENTS."""
    nc = 1
    while nc * 2 <= MAX_TIME_SEGMENTS and seqlen >= 2 * nc * min_seg and warps(nc) < target:
        nc *= 2
    return nc


def default_bwd_time_segments(batch: int, seqlen: int, dim: int, dstate: int, ngroups: int = 1,
                            config: ScanConfig | None = None, device: torch.device | str = "cuda") -> int:
    """Time segments the backward runs in parallel for this shape (1: no split).

    The backward is one one-warp program per (batch row, BD channels, segment) walking its checkpoint
    intervals in reverse;
    with few programs the SMs hold too few warps to hide the dependent chain of each step (the H100 sweep
    at batch 2 x dim 4096, BENCHMARKS.md). A split costs an adjoint-only pass over all but the first
    segment (a small fraction of the backward) and a tiny combine. So: the
    smallest power of two nc giving BWD_MIN_WARPS_PER_SM warps per SM, with segments of at least MIN_SEGMENT
    steps and whole checkpoint intervals, at most MAX_TIME_SEGMENTS. `config.bwd_time_segments` overrides.
    Examples on 132 SMs, dstate 16: batch 2 x dim 4096: 4 from seqlen 2048; batch 4: 2; batch >= 8: 1.
    """
    cfg = config or ScanConfig()
    if cfg.bwd_time_segments is not None:
        return max(1, cfg.bwd_time_segments)
    tiles = pick_tiles(cfg.bwd_nl or 4, dstate, dim // ngroups, cfg.bwd_channels)
    target = BWD_MIN_WARPS_PER_SM * sm_count(torch.device(device), 132)
    min_seg = max(MIN_SEGMENT, cfg.checkpoint_interval)
    return split_until(seqlen, min_seg, target, lambda nc: batch * nc * (dim // tiles.BD) * tiles.num_warps)


def segments(seqlen: int, interval: int, nc: int) -> tuple[int, int]:
    """(segment length, number of segments) for nc requested segments: whole checkpoint intervals each."""
    seg_len = interval * max(1, cdiv(cdiv(seqlen, interval), max(1, nc)))
    return seg_len, max(1, cdiv(seqlen, seg_len))


def needs_i64(seqlen: int, *strides: int) -> bool:
    return (seqlen + 4) * max(abs(s) for s in strides) >= 2**31



def bwd_replicas(group_size: int, reduce_channels: int, config: ScanConfig) -> int:
    """Copies of dB / dC the backward's atomics spread over: enough that about SOURCES_PER_REPLICA channel
    groups (of `reduce_channels` channels, one atomic each per step) add into each (b, t, g) row of a replica,
    a power of two, at most MAX_REPLICAS and at most the groups there are.

    More replicas mean less contention on each row but more memory to zero-fill and sum afterwards (two
    (replicas, B, L, G, N) float32 tensors). H100 sweep at the 130M training shape (batch 8 x 2048, d_inner
    1536: 384 groups of 4 channels; BENCHMARKS.md, session 35): fwd+bwd 2.419 / 2.434 / 2.463 / 2.525 ms at
    8 / 16 / 32 / 64 replicas, so 8 there (48 groups a replica); d_inner 4096 (1024 groups) keeps the 32 that
    its earlier sweeps were run with. `config.bwd_replicas` overrides."""
    groups = max(1, group_size // reduce_channels)
    if config.bwd_replicas is not None:
        return max(1, min(config.bwd_replicas, groups))
    return min(MAX_REPLICAS, groups, next_power_of_2(cdiv(groups, SOURCES_PER_REPLICA)))


def bwd_prefetch(config: ScanConfig) -> int:
    """Steps ahead of pass A's L2 prefetch in the backward (0: none): `config.bwd_prefetch`, else
    DEFAULT_BWD_PREFETCH."""
    return DEFAULT_BWD_PREFETCH if config.bwd_prefetch is None else config.bwd_prefetch


def fwd_prefetch(config: ScanConfig) -> int:
    """Steps ahead of the forward kernel's L2 prefetch (0: none): `config.fwd_prefetch`, else DEFAULT_FWD_PREFETCH."""
    return DEFAULT_FWD_PREFETCH if config.fwd_prefetch is None else config.fwd_prefetch


def carry_prefetch(config: ScanConfig) -> int:
    """Steps back of the carry pass's L2 prefetch (0: none): `config.carry_prefetch`, else DEFAULT_CARRY_PREFETCH."""
    return DEFAULT_CARRY_PREFETCH if config.carry_prefetch is None else config.carry_prefetch


def bwd_block_u(warps: int, config: ScanConfig, device: torch.device) -> int:
    """The backward's micro-block U for a launch of `warps` one-program warps: 2 once the launch has
    BWD_U2_MIN_WARPS_PER_SM warps per SM (U = 2 needs fewer registers, so more warps fit), else 4.
    `config.block_u` overrides."""
    return config.block_u or (2 if warps >= BWD_U2_MIN_WARPS_PER_SM * sm_count(device, 132) else 4)


# Carry segments of the backward's adjoint-only pass per forward time segment. H100 sweeps (BENCHMARKS.md, "bwd nc=4
# U=2 carry split 2 / 4" rows): at the 130M training shape (batch 8 x 2048 x 1536) 16 carry segments (split 4) ran
# fwd+bwd in 2.469 ms against 2.515 for 8 (session 34); at batch 2 x 4096 the two were level (1.646 / 6.261 / 24.93
# against 1.641 / 6.266 / 25.09 ms at 2048 / 8192 / 32768, an earlier session's kernel).
CARRY_SEGMENTS_PER_FWD_SEGMENT = 2


def carry_split(batch: int, seqlen: int, dim: int, dstate: int, ngroups: int, seg_len: int, nseg: int,
                config: ScanConfig, device: torch.device) -> int:
    """Carry segments per backward segment in the adjoint-only pass of a time-parallel backward (nseg > 1):
    CARRY_SEGMENTS_PER_FWD_SEGMENT times as many in all as the forward's time segments when that is more (the
    pass is cheap per step and wants programs), at least 16 steps each, and a divisor of seg_len (they tile each
    backward segment exactly). `config.bwd_carry_split` overrides (then capped at seg_len)."""
    if config.bwd_carry_split is not None:
        cin_k = max(1, min(config.bwd_carry_split, seg_len))
    else:
        nc_fwd = default_time_segments(batch, seqlen, dim, dstate, ngroups,
                                       ScanConfig(checkpoint_interval=config.checkpoint_interval), device)
        cin_k = max(1, min(CARRY_SEGMENTS_PER_FWD_SEGMENT * nc_fwd // nseg, seg_len // 16))
    while seg_len % cin_k:
        cin_k -= 1
    return cin_k


# The chunked backward (BWD_VARIANTS["chunked"]): channels per one-warp program (a lane each), and the warps per SM
# its time segments aim for (a first guess, not yet swept)
CHUNKED_CHANNELS = 32
# steps in registers: uncapped sm_90 compiles (session 41) took 126 / 255 / 255 registers at 4 / 8 / 16, the last
# spilling; the 8-step variants are capped at 128 instead (BWD_VARIANTS)
CHUNKED_ROWS = 8
CHUNKED_MIN_WARPS_PER_SM = 16


def chunked_bwd_tiles(group_size: int, config: ScanConfig) -> tuple[int, int]:
    """(channels per program, warps) of the chunked backward: one warp, config.bwd_channels (default CHUNKED_CHANNELS,
    at most 32) capped at the largest power of two dividing the group size, so that a program reads one group's B
    and C."""
    return min(config.bwd_channels or CHUNKED_CHANNELS, 32, group_size & -group_size), 1


def chunked_bwd_rows(config: ScanConfig) -> int:
    """Steps the chunked backward holds in registers: config.block_u (default CHUNKED_ROWS) or the checkpoint interval
    if smaller, the largest divisor of the interval at most that."""
    sub = min(config.block_u or CHUNKED_ROWS, config.checkpoint_interval)
    while config.checkpoint_interval % sub:
        sub -= 1
    return sub


def chunked_bwd_transposed(config: ScanConfig, channels: int, rows: int) -> bool:
    """Whether the chunked backward at `channels` lanes and `rows` steps per block sums dB / dC transposed
    (config.bwd_transposed_sums, where both are powers of two and rows <= channels)."""
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    return bool(config.bwd_transposed_sums) and pow2(channels) and pow2(rows) and rows <= channels


def chunked_bwd_time_segments(batch: int, seqlen: int, dim: int, ngroups: int, config: ScanConfig,
                              device: torch.device | str = "cuda") -> int:
    """Time segments of the chunked backward: the smallest power of two giving CHUNKED_MIN_WARPS_PER_SM one-warp
    programs per SM, segments of at least MIN_SEGMENT steps and whole checkpoint intervals.
    `config.bwd_time_segments` overrides."""
    if config.bwd_time_segments is not None:
        return max(1, config.bwd_time_segments)
    bd, _ = chunked_bwd_tiles(dim // ngroups, config)
    target = CHUNKED_MIN_WARPS_PER_SM * sm_count(torch.device(device), 132)
    return split_until(seqlen, max(MIN_SEGMENT, config.checkpoint_interval), target,
                       lambda nc: batch * nc * (dim // bd))


# Backward variants (A/B switch; the default stays "v1" until GPU timings say otherwise). Each is a set of
# ScanConfig fields; docs/design/triton_selective_scan.md ("Instruction budget of the backward") gives the static
# SASS counts behind them (benchmarks/scan_bwd_sass.py).
#   v1         the default: NL = 4 states per thread, NH = 4 lanes on states, 8 channels per warp, U by policy
#   wide8      NL = 8, NH = 2, 16 channels per warp, row-gathered tiles: per-channel work replicated on 2 lanes
#              instead of 4, reductions over N one shuffle level instead of two; U = 4
#   wide16     NL = 16, NH = 1, 32 channels per warp: no replicated per-channel work, reductions over N in
#              registers; U = 1 (the scratch keeps every state: pass B re-derives none, and 248 registers
#              without spills, where U = 2 / 4 spill), so 32-step checkpoint intervals keep the scratch small
#   wide16-r1  wide16 with dB / dC added by every channel lane (no shuffles, 4x the atomic bytes)
BWD_VARIANTS: dict[str, dict] = {
    "v1": dict(nl=None, channels=None, rows=False, block_u=None, interval=None, reduce_channels=None),
    "wide8": dict(nl=8, channels=16, rows=True, block_u=4, interval=64, reduce_channels=4),
    # wide8's tile at U = 1: 189 registers (10 warps per SM where wide8 holds 8) for 69 instructions per element
    # (v1: 93 at 128 registers, 16 warps): static sm_90 counts (benchmarks/scan_bwd_sass.py), not yet timed
    "wide8-u1": dict(nl=8, channels=16, rows=True, block_u=1, interval=32, reduce_channels=4),
    "wide16": dict(nl=16, channels=32, rows=True, block_u=1, interval=32, reduce_channels=4),
    "wide16-r1": dict(nl=16, channels=32, rows=True, block_u=1, interval=32, reduce_channels=1),
    # the states as the loop (triton_scan_bwd_chunked.py): a warp over 32 channels holds 8 steps in registers
    # (block_u) and loops over the states; "chunked" walks the default 64-step checkpoint intervals in 8-step blocks
    # after a forward pass over each interval, capped at v1's 128 registers (16 warps per SM); "-i8" makes the
    # checkpoint interval the block (no forward pass, 8x the checkpoints), "-nocap" leaves the compiler its 255
    # registers (8 warps per SM), "-i4" 4-step intervals and blocks (capped at 128 too, 16x the checkpoints)
    "chunked": dict(nl=None, channels=CHUNKED_CHANNELS, rows=False, block_u=8, interval=64, reduce_channels=None,
                    chunked=True, maxnreg=128),
    "chunked-i8": dict(nl=None, channels=CHUNKED_CHANNELS, rows=False, block_u=8, interval=8, reduce_channels=None,
                       chunked=True, maxnreg=128),
    "chunked-i8-nocap": dict(nl=None, channels=CHUNKED_CHANNELS, rows=False, block_u=8, interval=8,
                             reduce_channels=None, chunked=True),
    "chunked-i4": dict(nl=None, channels=CHUNKED_CHANNELS, rows=False, block_u=4, interval=4, reduce_channels=None,
                       chunked=True, maxnreg=128),
    # "chunked" with dB_t / dC_t summed over groups of 8 lanes (3 shuffle levels instead of 5), 4 atomics a warp
    "chunked-r8": dict(nl=None, channels=CHUNKED_CHANNELS, rows=False, block_u=8, interval=64, reduce_channels=8,
                       chunked=True, maxnreg=128),
    # "chunked" with each block's 8 rows of dB_t / dC_t summed over the warp at once (a reduce-scatter, 4 shuffles a
    # row instead of 5) and added by one atomic instead of 8
    "chunked-t": dict(nl=None, channels=CHUNKED_CHANNELS, rows=False, block_u=8, interval=64, reduce_channels=None,
                      chunked=True, maxnreg=128, transposed=True),
}


def variant_params(name: str) -> dict:
    """The knobs of backward variant `name` (a key of BWD_VARIANTS)."""
    if name not in BWD_VARIANTS:
        raise ValueError(f"bwd variant {name!r}: expected one of {sorted(BWD_VARIANTS)}")
    return BWD_VARIANTS[name]


def bwd_variant_config(name: str, base: ScanConfig | None = None, **overrides) -> ScanConfig:
    """`base` (default: ScanConfig()) with backward variant `name`'s fields, then `overrides`. The checkpoint
    interval is a forward field too: pass the returned config to the forward and the backward alike (the
    autograd op and `mamba_inner` do, since they take one config)."""
    p = variant_params(name)
    fields = dict(bwd_nl=p["nl"], bwd_channels=p["channels"], bwd_rows=p["rows"], block_u=p["block_u"],
                  bwd_reduce_channels=p["reduce_channels"], bwd_chunked=p.get("chunked", False),
                  bwd_maxnreg=p.get("maxnreg"), bwd_transposed_sums=p.get("transposed", False))
    if p["interval"] is not None:
        fields["checkpoint_interval"] = p["interval"]
    return dataclasses.replace(base or ScanConfig(), **(fields | overrides))
