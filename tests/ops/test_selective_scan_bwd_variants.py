"""The selective scan's backward variants (scan_policy.BWD_VARIANTS) against the float64 sequential reference.

Shapes (legend): b batch, L seqlen, d dim, g ngroups, n dstate.

Each variant is a ScanConfig (`bwd_variant_config`); the "wide" ones hold 8 or 16 states per thread and move the
backward's (D, N) tiles one state row at a time (ROWS); "chunked" holds a block of steps for 32 channels (a lane
each) in registers and loops over the states (`triton_scan_bwd_chunked.py`). Cases use dstate 16 and enough channels
for the real tiles (NL x NH x BD = 16 x 1 x 32, 8 x 2 x 16), with short checkpoint intervals so that several intervals,
micro-blocks, ragged tails and time segments occur at tiny seqlens. Output, final state and every gradient
(initial state included) are compared, through Triton's interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch

from mambakit.ops.selective_scan.scan_policy import (BWD_VARIANTS, ScanConfig, bwd_variant_config, chunked_bwd_rows,
                                                     chunked_bwd_tiles, chunked_bwd_time_segments,
                                                     chunked_bwd_transposed, pick_tiles,
                                                     variant_params)
from tests.conftest import DEVICE
from tests.ops.test_selective_scan_triton import GRAD_NAMES_ALL, make_inputs, named, run_reference, run_triton
from tests.helpers import assert_close, run_sass_script


def wide(name: str, **overrides):
    return bwd_variant_config(name, **overrides)


CASES = [
    # NL 16 x BD 32: two programs per row, ragged seqlen over three 8-step intervals, U = 4 (registers spill on a
    # GPU: correct, not fast)
    pytest.param("wide16", dict(L=19, d=64, n=16), True, dict(checkpoint_interval=8, block_u=4),
                 id="wide16-full-ragged",
                 marks=pytest.mark.slow),
    # documents inside and at interval starts, ngroups 2 (one group per program), U = 2, 2 backward time segments
    # (the adjoint-only carry pass and the row-gathered entering carry)
    pytest.param("wide16", dict(L=14, d=64, n=16, g=2, seq=((4, 8), (1, 12))), True,
                 dict(checkpoint_interval=4, block_u=2, bwd_time_segments=2), id="wide16-seq-ngroups2-segments",
                 marks=pytest.mark.slow),
    # NL 8 x NH 2 x BD 16, dstate 13 (padded state rows masked), no softplus, no initial state
    pytest.param("wide8", dict(L=12, d=32, n=13, h0=False), False, dict(checkpoint_interval=4), id="wide8-dstate13"),
    # wide8's tile at U = 1 (every state in the scratch), documents, ngroups 2, 2 time segments, ragged seqlen
    pytest.param("wide8-u1", dict(L=11, d=32, n=16, g=2, seq=True), True,
                 dict(checkpoint_interval=4, bwd_time_segments=2), id="wide8-u1-seq-ngroups2-segments"),
    # U = 1 (the wide16 default: scratch holds every state), dB / dC atomics from every lane, documents, 2 time segments
    pytest.param("wide16-r1", dict(L=9, d=32, n=16, seq=True), True, dict(checkpoint_interval=4, bwd_time_segments=2),
                 id="wide16-r1-seq-segments"),
    # NL 8 x NH 1 (dstate 5 pads to 8), no D / z / bias, 3 time segments
    pytest.param("wide16", dict(L=12, d=32, n=5, full=False), True,
                 dict(checkpoint_interval=4, bwd_time_segments=3), id="wide16-dstate5-plain"),
    # the chunked backward: 8-step intervals walked in 4-step blocks (the forward pass keeping each block's entering
    # state), a ragged last interval of one block partly past seqlen
    pytest.param("chunked", dict(L=19, d=32, n=16), True, dict(checkpoint_interval=8, block_u=4), id="chunked-ragged"),
    # documents inside and at interval and block starts (a_t cut), ngroups 2, 2 time segments (the entering carry
    # from the adjoint-only pass), 32 channels in two programs of 16 per group, 2-step blocks
    pytest.param("chunked", dict(L=14, d=64, n=16, g=2, seq=((4, 8), (1, 12))), True,
                 dict(checkpoint_interval=8, block_u=2, bwd_time_segments=2, bwd_channels=16),
                 id="chunked-seq-ngroups2-segments"),
    # the block is the interval (no forward pass); dstate 13, no softplus, no initial state; dstate 5 without D / z /
    # bias in 3 segments
    pytest.param("chunked-i4", dict(L=12, d=32, n=13, h0=False), False, dict(), id="chunked-i4-dstate13"),
    # dB / dC over groups of 8 lanes into 3 replicas (groups 0..7 of the two programs cycle through them), documents
    pytest.param("chunked-r8", dict(L=13, d=64, n=16, seq=True), True,
                 dict(checkpoint_interval=8, block_u=4, bwd_replicas=3), id="chunked-r8-replicas3-seq"),
    pytest.param("chunked-i8", dict(L=12, d=32, n=5, full=False), True,
                 dict(checkpoint_interval=4, block_u=4, bwd_time_segments=3), id="chunked-i8-dstate5-plain"),
    # dB / dC summed transposed: 4-step blocks over 32 lanes (two reduce-scatter stages, then three butterfly levels;
    # lane l adds row l // 8), a ragged last block partly past seqlen, documents, 2 time segments, 3 replicas
    pytest.param("chunked-t", dict(L=19, d=64, n=16, seq=True), True,
                 dict(checkpoint_interval=8, block_u=4, bwd_time_segments=2, bwd_replicas=3),
                 id="chunked-t-ragged-seq-segments-replicas3"),
    # every block whole (4 divides seqlen: the kernel has no ragged path), 2 intervals of 8, no initial state
    pytest.param("chunked-t", dict(L=16, d=32, n=16, h0=False, seq=True), True,
                 dict(checkpoint_interval=8, block_u=4), id="chunked-t-whole-blocks"),
    # 8-step blocks over 8 lanes (the block is the lanes: three reduce-scatter stages, no butterfly), ngroups 2,
    # dstate 13, no initial state
    pytest.param("chunked-t", dict(L=21, d=16, n=13, g=2, h0=False), True,
                 dict(checkpoint_interval=16, block_u=8, bwd_channels=8), id="chunked-t-rows-equal-lanes-ngroups2"),
    # 6-step blocks (a 12-step interval): not a power of two, so the per-row sums run instead
    pytest.param("chunked-t", dict(L=15, d=32, n=16, full=False), True,
                 dict(checkpoint_interval=12, block_u=8), id="chunked-t-rows6-falls-back"),
]


@pytest.mark.parametrize("variant, shape, softplus, overrides", CASES)
def test_bwd_variant_matches_reference(variant, shape, softplus, overrides):
    inp, extra = make_inputs(**shape)
    names = [k for k in GRAD_NAMES_ALL if k in inp]
    got = named(run_triton(inp, extra, softplus, wide(variant, **overrides)), names)
    want = named(run_reference(inp, extra, softplus), names)
    for key in want:
        assert_close(got[key], want[key], name=key, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("variant, overrides", [("v1", {})] + [
    (v, {}) for v in BWD_VARIANTS if variant_params(v).get("chunked")] + [
    pytest.param("chunked-t", dict(bwd_channels=8), id="chunked-t-8-lanes")])
def test_gpu_bwd_variant_matches_reference(variant, overrides):
    """Compiled for the GPU, what the interpreter cannot check (the PTX shuffles of the transposed sums, also over 8
    channels of a 32-lane warp, the register caps, a whole block's B / C at constant offsets): 300 steps (four 64-step
    intervals, the last one ragged) and 256 (no ragged block), ngroups 2, documents, 2 backward time segments, against
    the float64 reference."""
    for L in (300, 256):  # a ragged last block; every block whole
        inp, extra = make_inputs(L=L, d=64, n=16, g=2, seq=True)
        names = [k for k in GRAD_NAMES_ALL if k in inp]
        got = named(run_triton(inp, extra, True, wide(variant, bwd_time_segments=2, **overrides)), names)
        want = named(run_reference(inp, extra, True), names)
        for key in want:
            assert_close(got[key], want[key], name=f"{variant} L={L} {key}", rel=1e-4)


@pytest.mark.slow
def test_bwd_variants_agree_with_each_other_in_float64():
    """Every variant on the same float64 problem: equal to 1e-10 (the math is the same, only its tiling moves)."""
    inp, extra = make_inputs(L=12, d=32, n=16, seq=True)
    inp = {k: v.double() for k, v in inp.items()}
    names = [k for k in GRAD_NAMES_ALL if k in inp]
    results = {v: named(run_triton(inp, extra, True, wide(v, checkpoint_interval=4)), names) for v in BWD_VARIANTS}
    for v, got in results.items():
        for key, value in got.items():
            assert_close(value, results["v1"][key], name=f"{v} {key}", rel=1e-10)


def test_variant_configs_hold_the_tiles_they_name():
    """wide16 is 16 states x 32 channels per warp, wide8 8 x 2 lanes x 16 channels, v1 the unchanged default."""
    assert bwd_variant_config("v1") == ScanConfig()  # the default backward is v1, unchanged
    assert not bwd_variant_config("v1").bwd_rows and bwd_variant_config("v1").bwd_nl is None
    for name, tiles in (("wide16", (16, 1, 32, 1)), ("wide8", (8, 2, 16, 1))):
        p = variant_params(name)
        cfg = bwd_variant_config(name)
        assert cfg.bwd_rows and cfg.checkpoint_interval % cfg.block_u == 0
        t = pick_tiles(cfg.bwd_nl, 16, 4096, cfg.bwd_channels)
        assert (t.NL, t.NH, t.BD, t.num_warps) == tiles, name
        assert p["rows"]
    with pytest.raises(ValueError, match="bwd variant"):
        variant_params("nope")


@pytest.mark.slow
def test_the_default_backward_compiles_for_sm90_without_spills():
    """`benchmarks/scan_bwd_sass.py --specialisations` compiles the default backward for an H100 / H200 with Triton's
    bundled ptxas on this CPU (no GPU): the interpreter runs kernels no compiler has seen, so a kernel that fails to
    compile for sm_90, or spills under its register cap (`ScanConfig.bwd_maxnreg`), fails here. The benchmark
    specialisation keeps the 128 registers of its occupancy."""
    out = run_sass_script("scan_bwd_sass.py", "--specialisations")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {cells[0]: (int(cells[1]), int(cells[2])) for line in out.stdout.splitlines()
            if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])[1].isdigit()}
    assert len(rows) == 7, out.stdout
    assert all(stack == 0 for _, stack in rows.values()), rows
    assert rows["benchmark"][0] <= 128, rows


def test_chunked_policy():
    """The chunked backward is one warp over at most 32 channels, capped by the group (one group's B / C per program);
    its time segments come from warps per SM (the override wins)."""
    cfg = bwd_variant_config("chunked")
    assert cfg.bwd_chunked and cfg.checkpoint_interval == 64 and cfg.bwd_maxnreg == 128
    assert chunked_bwd_rows(cfg) == 8 and chunked_bwd_rows(bwd_variant_config("chunked-i4")) == 4
    assert chunked_bwd_rows(bwd_variant_config("chunked", checkpoint_interval=12)) == 6  # a divisor of the interval
    assert chunked_bwd_tiles(4096, cfg) == (32, 1)
    assert chunked_bwd_tiles(24, cfg) == (8, 1)  # 24 = 8 x 3
    assert chunked_bwd_tiles(4096, bwd_variant_config("chunked", bwd_channels=64)) == (32, 1)
    cpu = torch.device("cpu")  # 132 SMs assumed off the GPU: 2,112 warps wanted
    assert chunked_bwd_time_segments(8, 2048, 1536, 1, cfg, cpu) == 8  # 384 programs -> 3,072
    assert chunked_bwd_time_segments(2, 8192, 4096, 1, cfg, cpu) == 16  # 256 -> 4,096
    assert chunked_bwd_time_segments(2, 512, 4096, 1, cfg, cpu) == 2  # segments of at least 256 steps
    assert chunked_bwd_time_segments(2, 8192, 4096, 1, bwd_variant_config("chunked", bwd_time_segments=3), cpu) == 3
    t = bwd_variant_config("chunked-t")
    assert chunked_bwd_transposed(t, 32, 8) and chunked_bwd_transposed(t, 8, 8)
    assert not chunked_bwd_transposed(cfg, 32, 8)  # off unless the config asks
    assert not chunked_bwd_transposed(t, 32, 6) and not chunked_bwd_transposed(t, 4, 8)  # powers of two, rows <= lanes


@pytest.mark.slow
def test_the_chunked_backward_compiles_for_sm90():
    """The interpreter runs the chunked kernel without compiling it: `scan_bwd_sass.py --chunked` compiles each chunked
    variant for an H100 / H200 on this CPU, so a kernel that Triton or ptxas rejects fails here, not on a GPU; the
    capped variants keep the 128 registers of v1's occupancy."""
    out = run_sass_script("scan_bwd_sass.py", "--chunked")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {cells[0]: cells for line in out.stdout.splitlines()
            if line.startswith("| chunked") and (cells := [c.strip() for c in line.strip("|").split("|")])}
    capped = ("chunked", "chunked-i8", "chunked-i4", "chunked-r8", "chunked-t")
    assert set(rows) == {*capped, "chunked-i8-nocap"}, out.stdout
    assert all(int(rows[v][2]) <= 128 for v in capped), rows
    assert all(int(r[4]) > 64 for r in rows.values()), rows  # the state loop was found
    # the transposed sums take fewer shuffles and atomics per state element than the per-row warp sums
    per_element = {v: [float(c) for c in rows[v][6].split("/")] for v in ("chunked", "chunked-t")}
    assert per_element["chunked-t"][0] < per_element["chunked"][0] / 2, per_element  # SHFL
    assert per_element["chunked-t"][3] < per_element["chunked"][3] / 2, per_element  # atomics
