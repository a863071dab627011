"""The Triton selective scan's launch policy (ops/selective_scan/scan_policy.py): plain Python, no Triton.

Off the GPU the policy assumes an H100's 132 SMs, so these figures are the GPU's choices.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from mambakit.ops.selective_scan.scan_policy import (BWD_U2_MIN_WARPS_PER_SM, ScanConfig, bwd_block_u,
                                                     bwd_replicas, bwd_variant_config, carry_split, pick_tiles,
                                                     segments)

CPU = torch.device("cpu")


@pytest.mark.slow
def test_policy_imports_without_triton():
    """The policy module (and ops/common.py under it) import with Triton absent."""
    code = ("import importlib, sys; sys.modules['triton'] = None; "  # a None entry makes `import triton` fail
            "p = importlib.import_module('mambakit.ops.selective_scan.scan_policy'); "
            "print(p.default_time_segments(2, 2048, 4096, 16, device='cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8"


@pytest.mark.parametrize("nl, dstate, group_size, channels, want", [
    pytest.param(16, 16, 4096, None, (16, 1, 32, 1), id="nl16-one-lane-per-channel"),
    pytest.param(4, 16, 4096, None, (4, 4, 8, 1), id="nl4-four-lanes-on-states"),
    pytest.param(4, 12, 4096, None, (4, 4, 8, 1), id="dstate-padded-to-16"),
    pytest.param(4, 16, 6, None, (4, 4, 2, 1), id="bd-divides-group"),
    pytest.param(4, 16, 4096, 16, (4, 4, 16, 2), id="channels-override"),
])
def test_pick_tiles(nl, dstate, group_size, channels, want):
    t = pick_tiles(nl, dstate, group_size, channels)
    assert (t.NL, t.NH, t.BD, t.num_warps) == want
    assert group_size % t.BD == 0


def test_bwd_block_u_from_warps():
    """U = 2 once the launch fills the SMs (BWD_U2_MIN_WARPS_PER_SM warps each on 132 SMs), else U = 4."""
    enough = BWD_U2_MIN_WARPS_PER_SM * 132
    assert bwd_block_u(enough, ScanConfig(), CPU) == 2
    assert bwd_block_u(enough - 1, ScanConfig(), CPU) == 4
    assert bwd_block_u(enough, ScanConfig(block_u=4), CPU) == 4


@pytest.mark.parametrize("group_size, reduce_channels, override, want", [
    pytest.param(1536, 4, None, 8, id="130m-d_inner-384-groups"),
    pytest.param(2048, 4, None, 16, id="d_inner-2048"),
    pytest.param(4096, 4, None, 32, id="d_inner-4096-as-before"),
    pytest.param(8192, 4, None, 32, id="capped"),
    pytest.param(64, 4, None, 1, id="few-groups"),
    pytest.param(16, 4, None, 1, id="tiny"),
    pytest.param(1536, 4, 3, 3, id="override"),
    pytest.param(8, 4, 32, 2, id="override-capped-at-the-groups"),
])
def test_bwd_replicas_from_channel_groups(group_size, reduce_channels, override, want):
    """About SOURCES_PER_REPLICA channel groups per replica row, a power of two up to MAX_REPLICAS; an explicit
    count is kept, up to the groups there are."""
    assert bwd_replicas(group_size, reduce_channels, ScanConfig(bwd_replicas=override)) == want


def test_bwd_maxnreg_is_the_configs_cap_only():
    """No default register cap (the default kernel fits 128 registers by itself; session 32's cap went with the
    kernel that needed it); an explicit bwd_maxnreg is kept, the variants keep the compiler's choice."""
    assert ScanConfig().bwd_maxnreg is None
    assert bwd_variant_config("wide8", block_u=2).bwd_maxnreg is None
    assert ScanConfig(bwd_maxnreg=96).bwd_maxnreg == 96


@pytest.mark.parametrize("seqlen, interval, nc, want", [
    pytest.param(13, 4, 2, (8, 2), id="ragged"),
    pytest.param(13, 4, 4, (4, 4), id="one-interval-each"),
    pytest.param(13, 4, 64, (4, 4), id="capped-by-intervals"),
    pytest.param(2048, 128, 1, (2048, 1), id="sequential"),
])
def test_segments_hold_whole_checkpoint_intervals(seqlen, interval, nc, want):
    seg_len, nseg = segments(seqlen, interval, nc)
    assert (seg_len, nseg) == want
    assert seg_len % interval == 0 and (nseg - 1) * seg_len < seqlen <= nseg * seg_len


@pytest.mark.parametrize("batch, seqlen, dim, seg_len, nseg, cfg, want", [
    # forward 8 segments, backward 4: four carry segments per backward segment (16 in all, twice the forward's)
    pytest.param(2, 2048, 4096, 512, 4, ScanConfig(), 4, id="twice-the-forward"),
    pytest.param(8, 2048, 1536, 512, 4, ScanConfig(), 4, id="twice-the-forward-130m-shape"),
    # 32-step backward segments: at least 16 steps a carry segment caps it at 2
    pytest.param(2, 2048, 4096, 32, 4, ScanConfig(), 2, id="at-least-16-steps"),
    pytest.param(2, 13, 4096, 8, 2, ScanConfig(checkpoint_interval=4, bwd_carry_split=3), 2,
                 id="override-rounded-to-a-divisor"),
    pytest.param(2, 13, 4096, 8, 2, ScanConfig(checkpoint_interval=4, bwd_carry_split=100), 8,
                 id="override-capped-at-seg-len"),
])
def test_carry_split_tiles_each_backward_segment(batch, seqlen, dim, seg_len, nseg, cfg, want):
    k = carry_split(batch, seqlen, dim, 16, 1, seg_len, nseg, cfg, CPU)
    assert k == want
    assert seg_len % k == 0


@pytest.mark.parametrize("old, new", [
    pytest.param("chunk", "checkpoint_interval", id="checkpoint-interval"),
    pytest.param("time_chunks", "time_segments", id="time-segments"),
    pytest.param("bwd_time_chunks", "bwd_time_segments", id="bwd-time-segments"),
])
def test_scan_config_takes_its_former_names_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=f"'{old}' is renamed '{new}'"):
        cfg = ScanConfig(**{old: 8}, block_u=2)
    assert cfg == ScanConfig(**{new: 8}, block_u=2)
    assert ScanConfig.from_ints(cfg.as_ints()) == cfg  # the custom op's int round trip keeps the new fields
    with pytest.raises(ValueError, match=f"got both {new}=4"):
        ScanConfig(**{old: 8, new: 4})
    with pytest.raises(TypeError, match="unexpected arguments"):
        ScanConfig(chunk_len=8)


def test_scan_config_int_round_trip_covers_every_field_and_is_memoized():
    cfg = ScanConfig(fwd_nl=2, bwd_nl=8, bwd_channels=4, checkpoint_interval=32, block_u=2, time_segments=3,
                     bwd_reduce_channels=16, bwd_replicas=2, bwd_maxnreg=128, bwd_time_segments=5, bwd_carry_split=2,
                     bwd_rows=True, bwd_chunked=True, bwd_prefetch=16, fwd_prefetch=8, carry_prefetch=4,
                     bwd_transposed_sums=True)
    ints = cfg.as_ints()
    assert ints == [2, 8, 4, 32, 2, 3, 16, 2, 128, 5, 2, 1, 1, 16, 8, 4, 1]
    assert len(ints) == len(dataclasses.fields(ScanConfig))
    back = ScanConfig.from_ints(ints)
    # bool fields come back truthy (the schema carries ints)
    assert back == cfg and back.bwd_rows and back.bwd_chunked and back.bwd_transposed_sums
    assert ScanConfig.from_ints(list(ints)) is back  # one instance per int list: the per-call round trip is cheap
    assert ScanConfig().as_ints()[0] == -1 and ScanConfig.from_ints(ScanConfig().as_ints()) == ScanConfig()


def test_prefetch_distances_come_from_the_policy_unless_the_config_sets_them():
    from mambakit.ops.selective_scan import scan_policy as policy

    default = ScanConfig()
    # forward and carry pass prefetch by default (H100-timed), the backward's pass A does not
    assert policy.fwd_prefetch(default) == policy.DEFAULT_FWD_PREFETCH > 0
    assert policy.carry_prefetch(default) == policy.DEFAULT_CARRY_PREFETCH > 0
    assert policy.bwd_prefetch(default) == policy.DEFAULT_BWD_PREFETCH == 0
    off = ScanConfig(fwd_prefetch=0, carry_prefetch=0, bwd_prefetch=0)
    assert (policy.fwd_prefetch(off), policy.carry_prefetch(off), policy.bwd_prefetch(off)) == (0, 0, 0)
    on = ScanConfig(fwd_prefetch=4, carry_prefetch=2, bwd_prefetch=8)
    assert (policy.fwd_prefetch(on), policy.carry_prefetch(on), policy.bwd_prefetch(on)) == (4, 2, 8)
