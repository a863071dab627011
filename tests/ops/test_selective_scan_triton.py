"""Triton selective scan (forward, backward, decode step) against the float64 sequential reference.

Shapes (legend): b batch, L seqlen, d dim, g ngroups, n dstate.

CPU runs go through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the CPU
cases use tiny shapes and a tiny CHUNK / micro-block to get several chunks, ragged tails and every
tile shape (states per thread, states over lanes, channels per program). `@pytest.mark.gpu` cases
run the benchmark shapes on CUDA.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mambakit.ops import selective_scan, selective_state_update
from mambakit.ops.dispatch import triton_interpret
from mambakit.ops.selective_scan.reference import selective_scan_reference
from mambakit.ops.selective_scan.triton_scan import (ScanConfig, default_bwd_time_segments, default_time_segments, scan_bwd,
                                                    scan_fwd, selective_scan_triton)
from mambakit.ops.selective_scan.triton_step import selective_state_update_triton
from tests.conftest import DEVICE
from tests.helpers import assert_close, low_precision_tolerance, run_sass_script, run_with_grads


GRAD_NAMES_ALL = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]


def make_inputs(b=2, L=12, d=8, n=4, g=1, dtype=torch.float32, full=True, h0=True, seq=False, device=DEVICE):
    """Random inputs; A in [-1.5, -0.5], dt + dt_bias mostly in [-3, 1] (dt' ~ 0.05 .. 1.3 after softplus).

    seq: False, True (documents at L/3 and 2L/3 in row 0, a one-token first document in row 1), or a
    tuple of per-row document start positions."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    inp = {
        "x": rnd(b, L, d).to(dtype),
        "dt": rnd(b, L, d, scale=0.5).to(dtype),
        "A": -(torch.rand(d, n, generator=gen) + 0.5).to(device),
        "B": rnd(b, L, g, n).to(dtype),
        "C": rnd(b, L, g, n).to(dtype),
    }
    if full:
        inp.update(D=rnd(d), z=rnd(b, L, d).to(dtype), dt_bias=rnd(d, scale=0.5) - 1.0)
    if h0:
        inp["initial_state"] = rnd(b, d, n)
    extra = {}
    if seq:
        starts = ((L // 3, 2 * L // 3), (1,)) if seq is True else seq  # row 1: a one-token first document
        s = torch.zeros(b, L, dtype=torch.int32)
        for row, row_starts in enumerate(starts):
            for t in row_starts:
                s[row, t:] += 1
        extra["seq_idx"] = s.to(device)
    return inp, extra


def upstreams(inp, seed=1):
    """Random upstream gradients for y (b, L, d) and the final state (b, d, n)."""
    b, L, d = inp["x"].shape
    gen = torch.Generator().manual_seed(seed)
    dev = inp["x"].device
    return [torch.randn(b, L, d, generator=gen).to(dev), torch.randn(b, d, inp["A"].shape[1], generator=gen).to(dev)]


def run_triton(inp, extra, softplus, config):
    names = [k for k in GRAD_NAMES_ALL if k in inp]

    def fn(**k):
        return selective_scan_triton(**k, **extra, dt_softplus=softplus, return_final_state=True, config=config)

    return run_with_grads(fn, inp, upstreams(inp), names)


def run_reference(inp, extra, softplus):
    """float64 reference on the given values (whatever their dtype), same upstreams as run_triton."""
    names = [k for k in GRAD_NAMES_ALL if k in inp]

    def fn(**k):
        return selective_scan_reference(**k, **extra, dt_softplus=softplus, return_final_state=True)

    ref_inp = {k: v.to(torch.float64) for k, v in inp.items()}
    dy, dh = upstreams(inp)
    ups = [dy.to(inp["x"].dtype), dh]  # y has x's dtype, so its upstream arrives rounded to it
    return run_with_grads(fn, ref_inp, ups, names)


def named(result, names):
    """{"y", "final_state", "d<name>"...} from a run_with_grads result."""
    (y, h), grads = result
    return {"y": y, "final_state": h, **{f"d{k}": grads[k] for k in names}}


SMALL = ScanConfig(checkpoint_interval=4, block_u=2)  # several chunks and micro-blocks even at seqlen 12

CASES = [
    pytest.param(dict(full=False, h0=False), False, SMALL, id="plain"),
    pytest.param(dict(), True, SMALL, id="full-D-z-bias-softplus-h0"),
    pytest.param(dict(), True, None, id="default-config"),
    pytest.param(dict(full=False), True, SMALL, id="softplus-no-bias"),
    pytest.param(dict(), False, SMALL, id="no-softplus"),
    pytest.param(dict(g=2), True, SMALL, id="ngroups2"),
    pytest.param(dict(L=1), True, SMALL, id="seqlen1"),
    pytest.param(dict(L=19), True, ScanConfig(checkpoint_interval=8, block_u=4), id="ragged-several-intervals"),
    pytest.param(dict(L=14, seq=True), True, SMALL, id="seq_idx-packed-docs-h0"),
    pytest.param(dict(n=1), True, SMALL, id="dstate1"),
    pytest.param(dict(n=5), True, SMALL, id="dstate5-padded"),
    pytest.param(dict(n=8), True, ScanConfig(fwd_nl=2, bwd_nl=2, checkpoint_interval=4, block_u=2), id="states-over-lanes"),
    pytest.param(dict(n=8), True, ScanConfig(bwd_channels=4, checkpoint_interval=4, block_u=2), id="bwd-4-channels"),
    # dB / dC atomics from every channel lane (no shuffles) into 3 replicas (lane groups share them
    # modulo 3), from pairs / quads of lanes, with ngroups 2 (4-channel programs) and packed documents
    pytest.param(dict(), True, ScanConfig(checkpoint_interval=4, block_u=2, bwd_reduce_channels=1, bwd_replicas=3),
                 id="bwd-atomics-per-lane-3-replicas"),
    pytest.param(dict(g=2), True, ScanConfig(checkpoint_interval=4, block_u=2, bwd_reduce_channels=2), id="bwd-atomics-pairs-ngroups2"),
    pytest.param(dict(L=14, seq=True), True, ScanConfig(checkpoint_interval=4, block_u=2, bwd_reduce_channels=4, bwd_replicas=1),
                 id="bwd-atomics-quads-1-replica-seq_idx"),
    # time-parallel backward (pass 1 adjoint alone per segment, pass 2 combine, pass 3 full backward per
    # segment from its true carry): 3 segments of one chunk, the final-state gradient seeding the last one
    # and d(initial state) from the first; documents starting at segment starts (4, 8) and inside (6, 13),
    # with a time-parallel forward too; ngroups 2 without softplus; ragged 3-step last segment, no D / z
    pytest.param(dict(), True, ScanConfig(checkpoint_interval=4, block_u=2, bwd_time_segments=3), id="bwd-time-segments3-h0"),
    pytest.param(dict(L=14, seq=((4, 6), (8, 12, 13))), True,
                 ScanConfig(checkpoint_interval=4, block_u=2, bwd_time_segments=4, time_segments=2, bwd_reduce_channels=2),
                 id="bwd-time-segments-per-chunk-seq_idx"),
    pytest.param(dict(g=2), False, ScanConfig(checkpoint_interval=4, block_u=4, bwd_time_segments=2), id="bwd-time-segments-ngroups2"),
    pytest.param(dict(L=19, full=False, h0=False), True, ScanConfig(checkpoint_interval=8, block_u=2, bwd_time_segments=8),
                 id="bwd-time-segments-ragged"),
    # carry segments finer than the backward's: 2 per segment of 8 (ragged seqlen 19: 5 carry segments for 3
    # backward ones), 3 per segment of 12 with documents inside carry segments and at their starts
    pytest.param(dict(L=19), True, ScanConfig(checkpoint_interval=8, block_u=4, bwd_time_segments=3, bwd_carry_split=2),
                 id="bwd-carry-split2-ragged-h0"),
    pytest.param(dict(L=23, seq=((3, 4, 12), (8, 17))), True,
                 ScanConfig(checkpoint_interval=12, block_u=2, bwd_time_segments=2, bwd_carry_split=3),
                 id="bwd-carry-split3-seq_idx"),
    # time-parallel forward (pass 1 state-only, pass 2 combine, pass 3 full) under the unchanged backward:
    # 3 checkpoint chunks in 2 segments of 8 steps (the last ragged, 4 steps), initial state included
    pytest.param(dict(), True, ScanConfig(checkpoint_interval=4, block_u=2, time_segments=2), id="time-segments2"),
    # one segment per checkpoint chunk (nc == seqlen / chunk), ragged 2-step last segment; documents start
    # exactly at segment starts 4, 8, 12 and inside segments (6, 13): carried-in state must be dropped
    pytest.param(dict(L=14, seq=((4, 6), (8, 12, 13))), True, ScanConfig(checkpoint_interval=4, block_u=2, time_segments=4),
                 id="time-segments-per-chunk-seq_idx-h0"),
    # ngroups 2, no softplus (dt' may be negative: the decay sum must not assume dt' >= 0), more segments
    # asked for than there are chunks (3 used)
    pytest.param(dict(g=2), False, ScanConfig(checkpoint_interval=4, block_u=2, time_segments=8), id="time-segments-ngroups2"),
    # ragged seqlen 19, chunk 8: 2 segments of 16 and 3 steps; no initial state (zero start of segment 0)
    pytest.param(dict(L=19, full=False, h0=False), True, ScanConfig(checkpoint_interval=8, block_u=4, time_segments=2),
                 id="time-segments-ragged"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape, softplus, config", CASES)
def test_scan_float32_matches_reference(shape, softplus, config):
    inp, extra = make_inputs(**shape)
    names = [k for k in GRAD_NAMES_ALL if k in inp]
    got = named(run_triton(inp, extra, softplus, config), names)
    want = named(run_reference(inp, extra, softplus), names)
    for key in want:
        assert_close(got[key], want[key], name=key, rel=1e-4)


@pytest.mark.slow
def test_scan_float64_runs_in_float64():
    inp, extra = make_inputs(seq=True)
    inp = {k: v.double() for k, v in inp.items()}
    names = [k for k in GRAD_NAMES_ALL if k in inp]
    got = named(run_triton(inp, extra, True, SMALL), names)
    want = named(run_reference(inp, extra, True), names)
    assert got["final_state"].dtype == torch.float64
    for key in want:
        assert_close(got[key], want[key], name=key, rel=1e-10)


@pytest.mark.slow
def test_scan_bfloat16_within_twice_torch_error():
    """bf16 x, dt, z, B, C (A, D, dt_bias, initial_state float32); the kernel keeps float32 state.

    PyTorch's own bf16 error: the exact reference math applied by PyTorch to the bf16-rounded inputs,
    with results in the dtypes PyTorch returns (y and the bf16 inputs' gradients in bf16), measured
    against the float64 reference on the float32 originals. So it holds both the input rounding and
    the output rounding a bf16 user gets. The kernel on the same bf16 inputs must stay within twice
    that error (plus low_precision_tolerance's 1e-3 floor). A stricter second check compares the
    kernel with float64 math on the bf16 inputs themselves, where only the rounding of its outputs
    is left: at most twice that rounding plus the floor. Triton's interpreter truncates on float32 ->
    bf16 casts (GPUs round to nearest), so under the interpreter that baseline is truncation.
    """
    inp32, extra = make_inputs(L=10)
    inp16 = {k: (v.to(torch.bfloat16) if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp32.items()}
    names = [k for k in GRAD_NAMES_ALL if k in inp32]
    got = named(run_triton(inp16, extra, True, SMALL), names)
    exact = named(run_reference(inp32, extra, True), names)
    exact_on16 = named(run_reference(inp16, extra, True), names)
    for key, value in got.items():
        torch_lowp = exact_on16[key].to(value.dtype)  # what PyTorch hands a bf16 user
        assert_close(value, exact[key], name=f"{key} vs fp32 inputs", rel=0.0,
                     atol=low_precision_tolerance(torch_lowp, exact[key]))
        kernel_rounding = truncate_to(exact_on16[key], value.dtype) if triton_interpret() else torch_lowp
        assert_close(value, exact_on16[key], name=f"{key} vs bf16 inputs", rel=0.0,
                     atol=low_precision_tolerance(kernel_rounding, exact_on16[key]))


def truncate_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round toward zero to bf16 (what the interpreter's casts do); other dtypes round as usual."""
    if dtype != torch.bfloat16:
        return t.to(dtype)
    bits = t.float().view(torch.int32) & -65536  # keep sign, exponent and the top 7 mantissa bits
    return bits.view(torch.float32).to(torch.bfloat16)


def test_scan_public_api_triton_backend_3d_BC():
    inp, _ = make_inputs(L=6)
    B3, C3 = inp["B"][:, :, 0], inp["C"][:, :, 0]
    y = selective_scan(inp["x"], inp["dt"], inp["A"], B3, C3, D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"],
                       dt_softplus=True, backend="triton")
    y_ref = selective_scan_reference(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                                     dt_bias=inp["dt_bias"], dt_softplus=True)
    assert_close(y, y_ref, name="y", rel=1e-4)


def test_scan_rejects_bad_checkpoint_interval_and_complex_A():
    inp, _ = make_inputs(L=4, full=False, h0=False)
    with pytest.raises(ValueError, match="checkpoint_interval=6 must be a multiple of 4"):
        selective_scan_triton(**inp, config=ScanConfig(checkpoint_interval=6, block_u=4))
    with pytest.raises(ValueError, match="time_segments"):
        selective_scan_triton(**inp, config=ScanConfig(time_segments=0))
    with pytest.raises(ValueError, match="bwd_time_segments"):
        selective_scan_triton(**inp, config=ScanConfig(bwd_time_segments=0))
    with pytest.raises(ValueError, match="bwd_reduce_channels"):
        selective_scan_triton(**inp, config=ScanConfig(bwd_reduce_channels=3))
    with pytest.raises(ValueError, match="bwd_replicas"):
        selective_scan_triton(**inp, config=ScanConfig(bwd_replicas=0))
    for name in ("bwd_prefetch", "fwd_prefetch", "carry_prefetch"):
        with pytest.raises(ValueError, match=name):
            selective_scan_triton(**inp, config=ScanConfig(**{name: -1}))
    with pytest.raises(ValueError, match="complex"):
        selective_scan_triton(inp["x"], inp["dt"], inp["A"].to(torch.complex64), inp["B"], inp["C"])


@pytest.mark.slow
def test_time_segmented_forward_writes_the_sequential_checkpoints():
    """The backward reads the forward's checkpoints unchanged, so the time-parallel forward must write
    the same (B, K, D, N) checkpoints, y and final state as the sequential one (float64: equal up to
    rounding; a misplaced or stale checkpoint would differ at O(1)). seq_idx with a document starting
    exactly at a segment start (8) and inside one (3, 10), ragged seqlen 13 (4 chunks)."""
    inp, extra = make_inputs(L=13, seq=((3, 8), (10,)))
    inp = {k: v.double() for k, v in inp.items()}

    def fwd(nc):
        return scan_fwd(x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"], D=inp["D"], z=inp["z"],
                        dt_bias=inp["dt_bias"], dt_softplus=True, initial_state=inp["initial_state"],
                        seq_idx=extra["seq_idx"], save_final=True, save_checkpoints=True,
                        config=ScanConfig(checkpoint_interval=4, block_u=2, time_segments=nc))

    y1, h1, ck1 = fwd(1)
    for nc in (2, 4):  # segments [0, 8), [8, 13); and [0, 4), [4, 8), [8, 12), [12, 13)
        y, h, ck = fwd(nc)
        assert ck.shape == ck1.shape == (2, 4, 8, 4)
        for name, got, want in (("y", y, y1), ("final_state", h, h1), ("checkpoints", ck, ck1)):
            assert_close(got, want, name=f"{name} nc={nc}", rel=1e-12)


def test_scan_backward_writes_dz_into_a_strided_view_of_the_callers_tensor():
    """`scan_bwd(dz_out=...)`: dz lands in the z half of a (B, L, 2D) gradient, as the fused Mamba-1 op asks (no
    copy), with z itself such a half; every other gradient as without it, and the other half untouched. The same
    in a slice whose strides are neither x's nor z's. A dz_out of the wrong shape, dtype or last stride is
    refused."""
    inp, extra = make_inputs(L=13, d=8, seq=True)
    inp = {k: v.double() for k, v in inp.items()}
    b, L, d = inp["x"].shape
    xz = torch.cat([inp["x"], inp["z"]], dim=-1)  # z as the strided half of xz
    z = xz[..., d:]
    cfg = ScanConfig(checkpoint_interval=4, block_u=2)
    _, _, hck = scan_fwd(x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"], D=inp["D"], z=z,
                         dt_bias=inp["dt_bias"], dt_softplus=True, initial_state=None, seq_idx=extra["seq_idx"],
                         save_final=False, save_checkpoints=True, config=cfg)
    dy = torch.randn(b, L, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)

    def bwd(dz_out=None):
        return scan_bwd(dy=dy, dhlast=None, x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"],
                        D=inp["D"], z=z, dt_bias=inp["dt_bias"], dt_softplus=True, seq_idx=extra["seq_idx"],
                        checkpoints=hck, want_dinitial=False, config=cfg, dz_out=dz_out)

    plain = bwd()
    dxz = torch.full_like(xz, 7.0)
    into = bwd(dxz[..., d:])
    assert into[6].data_ptr() == dxz[..., d:].data_ptr()
    assert_close(dxz[..., d:], plain[6], name="dz", rel=1e-12)
    assert torch.equal(dxz[..., :d], torch.full_like(dxz[..., :d], 7.0))
    for i, name in enumerate(("dx", "ddt", "dA", "dB", "dC", "dD")):
        assert_close(into[i], plain[i], name=name, rel=1e-12)
    # strides that are neither x's nor z's: dz at offsets of its own (the kernel's third dz addressing)
    wide = torch.full((b, L, 3 * d), 7.0, dtype=torch.float64, device=DEVICE)
    bwd(wide[..., d:2 * d])
    assert_close(wide[..., d:2 * d], plain[6], name="dz in a (B, L, 3D) slice", rel=1e-12)
    assert torch.equal(wide[..., :d], torch.full_like(wide[..., :d], 7.0))
    assert torch.equal(wide[..., 2 * d:], torch.full_like(wide[..., 2 * d:], 7.0))
    for bad in (torch.empty(b, L, d + 1, dtype=torch.float64), torch.empty(b, L, d, dtype=torch.float32),
                torch.empty(b, d, L, dtype=torch.float64).transpose(1, 2)):
        with pytest.raises(ValueError, match="dz_out must be"):
            bwd(bad.to(DEVICE))


def test_default_time_segments_from_shape():
    """Split only where the launch lacks warps (H100 numbers: 132 SMs when not on CUDA)."""
    cpu = torch.device("cpu")
    assert default_time_segments(2, 2048, 4096, 16, device=cpu) == 8  # 512 -> 4096 one-warp programs
    assert default_time_segments(2, 32768, 4096, 16, device=cpu) == 8
    assert default_time_segments(2, 1024, 4096, 16, device=cpu) == 4  # segments stay >= 256 steps
    assert default_time_segments(2, 256, 4096, 16, device=cpu) == 1  # too short to split
    assert default_time_segments(16, 2048, 4096, 16, device=cpu) == 1  # enough rows already
    assert default_time_segments(1, 1 << 20, 1536, 16, device=cpu) == 64  # 1M tokens: 16K-step segments
    assert default_time_segments(2, 2048, 4096, 16, config=ScanConfig(time_segments=16), device=cpu) == 16


def test_default_bwd_time_segments_from_shape():
    """The backward splits until its one-warp programs reach BWD_MIN_WARPS_PER_SM per SM (8 channels each)."""
    cpu = torch.device("cpu")
    assert default_bwd_time_segments(2, 2048, 4096, 16, device=cpu) == 4  # 1024 -> 4096 programs
    assert default_bwd_time_segments(2, 32768, 4096, 16, device=cpu) == 4
    assert default_bwd_time_segments(4, 2048, 4096, 16, device=cpu) == 2
    assert default_bwd_time_segments(8, 2048, 4096, 16, device=cpu) == 1  # enough rows already
    assert default_bwd_time_segments(2, 512, 4096, 16, device=cpu) == 2  # segments stay >= 256 steps
    assert default_bwd_time_segments(2, 256, 4096, 16, device=cpu) == 1
    assert default_bwd_time_segments(1, 1 << 20, 1536, 16, device=cpu) == 32
    assert default_bwd_time_segments(2, 2048, 4096, 16, config=ScanConfig(bwd_time_segments=3), device=cpu) == 3


@pytest.mark.slow
@pytest.mark.parametrize("g, d, n", [pytest.param(1, 8, 4, id="g1"), pytest.param(2, 16, 5, id="g2-dstate5")])
def test_decode_steps_equal_parallel_scan(g, d, n):
    inp, _ = make_inputs(L=7, d=d, n=n, g=g)
    y_par, h_par = selective_scan_triton(**inp, dt_softplus=True, return_final_state=True, config=SMALL)
    state = inp["initial_state"].clone()
    ys = []
    for t in range(inp["x"].shape[1]):
        ys.append(selective_state_update(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t], D=inp["D"],
            z=inp["z"][:, t], dt_bias=inp["dt_bias"], dt_softplus=True, backend="triton"))
    assert_close(torch.stack(ys, dim=1), y_par, name="y", rel=1e-5)
    assert_close(state, h_par, name="state", rel=1e-5)


def test_decode_step_returns_state_it_updated():
    inp, _ = make_inputs(L=1, full=False)
    state = inp["initial_state"].clone()
    y, new_state = selective_state_update_triton(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0],
                                                 inp["C"][:, 0])
    y_ref, h_ref = selective_scan_reference(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                            initial_state=inp["initial_state"], return_final_state=True)
    assert new_state is state
    assert_close(y, y_ref[:, 0], name="y", rel=1e-5)
    assert_close(state, h_ref, name="state", rel=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU: benchmark shapes (batch 2, dim 4096, dstate 16, bf16 inputs; A, D, dt_bias float32)
# ------------------------------------------------------------------------------------------------

BENCH_CHANNELS = torch.tensor([0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 127, 511, 1024, 2047, 2048, 3071, 4094, 4095])


def bench_inputs(batch, seqlen, dim=4096, dstate=16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    inp = {
        "x": torch.randn(batch, seqlen, dim, device=dev, generator=gen).to(bf),
        "dt": (torch.randn(batch, seqlen, dim, device=dev, generator=gen) * 0.5).to(bf),
        "A": -torch.exp(torch.rand(dim, dstate, device=dev, generator=gen) * 2.8),  # S4D-real-like spread
        "B": torch.randn(batch, seqlen, 1, dstate, device=dev, generator=gen).to(bf),
        "C": torch.randn(batch, seqlen, 1, dstate, device=dev, generator=gen).to(bf),
        "D": torch.randn(dim, device=dev, generator=gen),
        "z": torch.randn(batch, seqlen, dim, device=dev, generator=gen).to(bf),
        "dt_bias": torch.log(torch.expm1(torch.exp(torch.rand(dim, device=dev, generator=gen) * 4.6 - 6.9))),
        "initial_state": torch.randn(batch, dim, dstate, device=dev, generator=gen) * 0.1,
    }
    return inp


def channel_slice(inp, ch):
    """The same problem restricted to channels `ch` (B, C are shared by all channels: ngroups 1)."""
    out = {}
    for k, v in inp.items():
        if k in ("x", "dt", "z"):
            out[k] = v[:, :, ch]
        elif k in ("A", "D", "dt_bias"):
            out[k] = v[ch]
        elif k == "initial_state":
            out[k] = v[:, ch]
        else:
            out[k] = v
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [pytest.param(2048, id="L2048")])
def test_gpu_benchmark_shape_fwd_bwd(seqlen):
    """Full-shape kernels; upstream gradients only on a channel subset so dB, dC of the full run equal
    those of the subset, which the float64 reference can afford. bf16 tolerance as on CPU."""
    inp = bench_inputs(2, seqlen)
    ch = BENCH_CHANNELS.cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    # y is bf16, so its upstream gradient arrives in bf16: give the reference the same values
    dy_sub = torch.randn(2, seqlen, len(ch), device="cuda", generator=gen).to(torch.bfloat16).float()
    dh_sub = torch.randn(2, len(ch), 16, device="cuda", generator=gen)
    dy = torch.zeros(2, seqlen, 4096, device="cuda")
    dy[:, :, ch] = dy_sub
    dh = torch.zeros(2, 4096, 16, device="cuda")
    dh[:, ch] = dh_sub
    names = GRAD_NAMES_ALL
    (y, h), g = run_with_grads(lambda **k: selective_scan_triton(**k, dt_softplus=True, return_final_state=True),
                               inp, [dy, dh], names)
    sub = channel_slice(inp, ch)
    sub64 = {k: v.double() for k, v in sub.items()}
    (y_r, h_r), g_r = run_with_grads(
        lambda **k: selective_scan_reference(**k, dt_softplus=True, return_final_state=True), sub64, [dy_sub, dh_sub],
        names)
    got = {"y": y[:, :, ch], "final_state": h[:, ch], "dx": g["x"][:, :, ch], "ddt": g["dt"][:, :, ch],
           "dz": g["z"][:, :, ch], "dA": g["A"][ch], "dD": g["D"][ch], "ddt_bias": g["dt_bias"][ch],
           "dinitial_state": g["initial_state"][:, ch], "dB": g["B"], "dC": g["C"]}
    exact = {"y": y_r, "final_state": h_r, "dx": g_r["x"], "ddt": g_r["dt"], "dz": g_r["z"], "dA": g_r["A"],
             "dD": g_r["D"], "ddt_bias": g_r["dt_bias"], "dinitial_state": g_r["initial_state"], "dB": g_r["B"],
             "dC": g_r["C"]}
    for name, value in got.items():
        # the only bf16 error left against float64 math on the same bf16 inputs is output rounding
        tol = low_precision_tolerance(exact[name].to(value.dtype), exact[name])
        assert_close(value, exact[name], name=name, rel=0.0, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [pytest.param(8192, id="L8192"), pytest.param(32768, id="L32768")])
def test_gpu_benchmark_shape_forward_long(seqlen):
    inp = bench_inputs(2, seqlen)
    ch = BENCH_CHANNELS.cuda()
    with torch.no_grad():
        y, h = selective_scan_triton(**inp, dt_softplus=True, return_final_state=True)
        sub64 = {k: v.double() for k, v in channel_slice(inp, ch).items()}
        y_r, h_r = selective_scan_reference(**sub64, dt_softplus=True, return_final_state=True)
    assert_close(y[:, :, ch], y_r, name="y", rel=0.0, atol=low_precision_tolerance(y_r.to(y.dtype), y_r))
    # float32 state through exp2.approx decays (rel. error ~2^-22 each) over ~1/(dt' |A|) <= 1000 steps
    assert_close(h[:, ch], h_r, name="final_state", rel=1e-3)


def long_inputs(seqlen=1 << 20, dim=1536, dstate=16, device="cuda"):
    """Realistic Mamba-1 values: A = -exp(U(0, 2.8)) (S4D-real-like spread, -16 .. -1), softplus(dt_bias)
    log-uniform in [1e-3, 0.1] as Mamba initialises it, dt ~ N(0, 0.5). x and z are the two halves of
    one (1, L, 2 * dim) projection, like the Mamba-1 block: at 1M tokens z's row stride 2 * dim makes
    t * stride pass 2^31, so the kernel must take its 64-bit offset path."""
    gen = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    xz = torch.randn(1, seqlen, 2 * dim, device=device, generator=gen).to(bf)
    x, z = xz.chunk(2, dim=-1)
    return {
        "x": x, "z": z,
        "dt": (torch.randn(1, seqlen, dim, device=device, generator=gen) * 0.5).to(bf),
        "A": -torch.exp(torch.rand(dim, dstate, device=device, generator=gen) * 2.8),
        "B": torch.randn(1, seqlen, 1, dstate, device=device, generator=gen).to(bf),
        "C": torch.randn(1, seqlen, 1, dstate, device=device, generator=gen).to(bf),
        "D": torch.randn(dim, device=device, generator=gen),
        "dt_bias": torch.log(torch.expm1(torch.exp(torch.rand(dim, device=device, generator=gen) * 4.6 - 6.9))),
    }


SEQ_KEYS = ("x", "z", "dt", "B", "C")


def _chunked(fn, inp, seqlen, piece):
    """Run fn on consecutive seqlen pieces, carrying the final state into the next piece."""
    ys, h = [], None
    for s in range(0, seqlen, piece):
        part = {k: (v[:, s:s + piece] if k in SEQ_KEYS else v) for k, v in inp.items()}
        y, h = fn(part, h)
        ys.append(y)
    return torch.cat(ys, dim=1), h


@pytest.mark.gpu
def test_gpu_one_million_tokens_forward_matches_runs_in_pieces():
    """1M tokens, batch 1, dim 1536. The sequential forward (time_segments=1) in one launch (64-bit
    offsets) equals the same kernel run in 128K-token pieces with the state carried: bit for bit up to
    float32 state storage. The default time-parallel forward (64 segments) matches it within one bf16
    ulp of y's largest values plus a float32-level difference, final state rel 1e-3 (sum-of-dt' decays
    vs the product of per-step exp2.approx). Nothing overflows."""
    seqlen = 1 << 20
    inp = long_inputs(seqlen)
    seq_cfg = ScanConfig(time_segments=1)
    with torch.no_grad():
        y, h = selective_scan_triton(**inp, dt_softplus=True, return_final_state=True, config=seq_cfg)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        y_c, h_c = _chunked(lambda p, h0: selective_scan_triton(**p, dt_softplus=True, initial_state=h0,
                                                                return_final_state=True, config=seq_cfg),
                            inp, seqlen, 1 << 17)
        y_p, h_p = selective_scan_triton(**inp, dt_softplus=True, return_final_state=True)
    assert_close(y, y_c, name="y", rel=1e-5)
    assert_close(h, h_c, name="final_state", rel=1e-5)
    assert torch.isfinite(y_p).all() and torch.isfinite(h_p).all()
    assert_close(y_p, y, name="y time-parallel", rel=2**-7 + 1e-3)
    assert_close(h_p, h, name="final_state time-parallel", rel=1e-3)


LONG_CASES = [
    # the real thing: 1M tokens, default config (time-parallel forward: 64 segments of 16K steps)
    pytest.param(1 << 20, 1536, 16, 1 << 16, None,
                 marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")], id="1M-tokens"),
    # the same code path at interpreter size: 4 segments of 16 steps (the last 8), pieces of 24 steps
    # that straddle segment boundaries, z a strided half of xz
    pytest.param(56, 16, 4, 24, ScanConfig(checkpoint_interval=8, block_u=4, time_segments=4), id="tiny"),
]


@pytest.mark.parametrize("seqlen, dim, dstate, piece, config", LONG_CASES)
def test_long_forward_matches_torch_path_piece_by_piece(seqlen, dim, dstate, piece, config):
    """A long bf16 forward in one call equals the PyTorch path in float32 (same bf16-rounded values)
    run over successive pieces with the state carried: y on every piece (bf16 output tolerance at
    that piece's scale), the final state (rel 1e-3: exp2.approx decays on the GPU), nothing
    non-finite. All channels are compared: the PyTorch path is launch-bound, not size-bound."""
    inp = long_inputs(seqlen, dim, dstate, device=DEVICE)
    with torch.no_grad():
        y, h = selective_scan_triton(**inp, dt_softplus=True, return_final_state=True, config=config)
    assert torch.isfinite(y).all(), "y has non-finite values"
    assert torch.isfinite(h).all(), "final state has non-finite values"
    h_t = None
    for s in range(0, seqlen, piece):
        part = {k: (v[:, s:s + piece] if k in SEQ_KEYS else v).float() for k, v in inp.items()}
        with torch.no_grad():
            y_t, h_t = selective_scan(**part, dt_softplus=True, initial_state=h_t, return_final_state=True,
                                      backend="torch")
        # the kernel's only error beyond float32 rounding is its bf16 output rounding (truncation when
        # interpreted, round-to-nearest on the GPU)
        rounded = truncate_to(y_t, y.dtype) if triton_interpret() else y_t.to(y.dtype)
        assert_close(y[:, s:s + piece], y_t, name=f"y[{s}:{s + piece}]", rel=0.0,
                     atol=low_precision_tolerance(rounded, y_t))
    assert_close(h, h_t, name="final_state", rel=1e-3)


@pytest.mark.gpu
def test_gpu_decode_steps_equal_parallel_at_benchmark_width():
    inp = bench_inputs(2, 16)
    inp = {k: v.float() for k, v in inp.items()}
    with torch.no_grad():
        y_par, h_par = selective_scan_triton(**inp, dt_softplus=True, return_final_state=True)
        state = inp["initial_state"].clone()
        ys = [selective_state_update_triton(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t],
                                            inp["C"][:, t], D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"],
                                            dt_softplus=True)[0] for t in range(16)]
    assert_close(torch.stack(ys, dim=1), y_par, name="y", rel=1e-5)
    assert_close(state, h_par, name="state", rel=1e-5)


@pytest.mark.slow
def test_scan_64bit_offsets_match_reference(monkeypatch):
    """The I64 kernels (taken from ~2^31 / stride steps on, e.g. 1M tokens) on a small case: every forward and
    backward launch, time-parallel in both directions, through 64-bit time offsets."""
    policy = importlib.import_module("mambakit.ops.selective_scan.scan_policy")  # the package name is shadowed
    monkeypatch.setattr(policy, "needs_i64", lambda *a: True)
    inp, extra = make_inputs(L=14, seq=True)
    names = [k for k in GRAD_NAMES_ALL if k in inp]
    cfg = ScanConfig(checkpoint_interval=4, block_u=2, time_segments=2, bwd_time_segments=2, bwd_carry_split=2)
    got = named(run_triton(inp, extra, True, cfg), names)
    want = named(run_reference(inp, extra, True), names)
    for key in want:
        assert_close(got[key], want[key], name=key, rel=1e-4)


@pytest.mark.slow
def test_the_prefetching_forward_and_carry_pass_compile_for_sm90():
    """The forward's and the carry pass's L2 prefetch (on by default on GPUs) is inline PTX that the interpreter
    skips, so no CPU test runs it: `benchmarks/scan_fwd_sass.py` compiles both kernels for an H100 / H200 with
    Triton's bundled ptxas, with and without the prefetch. Each must build without spills, the prefetch must be in
    the SASS (CCTL) only when asked for, and it must hold no register (at most a few more for its addresses)."""
    out = run_sass_script("scan_fwd_sass.py")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[2].strip().isdigit()]
    by = {(r[0], int(r[1]) > 0): (int(r[2]), int(r[3]), int(r[4])) for r in rows}
    assert len(rows) == 6 and len(by) == 6, out.stdout
    for kernel in ("forward, full pass", "forward, state-only pass", "backward, carry pass"):
        (regs0, stack0, pf0), (regs1, stack1, pf1) = by[(kernel, False)], by[(kernel, True)]
        assert stack0 == stack1 == 0, (kernel, out.stdout)
        assert pf0 == 0 < pf1, (kernel, out.stdout)
        assert regs1 <= regs0 + 8, (kernel, out.stdout)
