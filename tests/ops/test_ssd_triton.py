"""The "triton" backend of `ssd` and `ssd_state_update` against the float64 reference.

The inputs are made on DEVICE: CUDA where there is one, else the CPU, where the kernels run through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on tiny shapes: the interpreter is slow
and its tl.dot needs block dims >= 16, hence headdim = dstate = chunk = 16. Every comparison covers the output,
the final state and the gradient of every input (initial state included) under random upstream gradients on
both the output and the final state.

float32: the kernels multiply in IEEE fp32 (no tf32), so the float32 tolerance is DESIGN.md's 1e-4 of
the reference's scale. bf16: each tensor may be off by at most twice what PyTorch itself makes in bf16,
measured on the same inputs with the paper's chunked algorithm (Listing 1) evaluated entirely in bf16
(`_ssd_listing_lowp`), both against the float64 reference (tests.helpers.low_precision_tolerance);
float16 likewise against the listing in float16.
GPU tests (`-m gpu`) run the benchmark shape against the float32 torch path and the float64 reference.
"""

from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import ssd, ssd_state_update
from mambakit.ops.ssd.reference import ssd_reference
from tests.helpers import assert_close, low_precision_tolerance, max_error, run_sass_script, run_with_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, *, D=None, z=False, dt_bias=False,
                 initial_state=False, device=DEVICE):
    """Random SSD inputs in float32 on `device` (dt moderate so that chunks decay but do not vanish)."""
    inp = {
        "x": torch.randn(batch, seqlen, nheads, headdim, device=device),
        "dt": torch.rand(batch, seqlen, nheads, device=device) * 0.5 + (-0.6 if dt_bias else 0.05),
        "A": -torch.rand(nheads, device=device) * 1.5 - 0.1,
        "B": torch.randn(batch, seqlen, ngroups, dstate, device=device),
        "C": torch.randn(batch, seqlen, ngroups, dstate, device=device),
    }
    if D == "head":
        inp["D"] = torch.randn(nheads, device=device)
    elif D == "channel":
        inp["D"] = torch.randn(nheads, headdim, device=device)
    if z:
        inp["z"] = torch.randn(batch, seqlen, nheads, headdim, device=device)
    if dt_bias:
        inp["dt_bias"] = torch.rand(nheads, device=device) * 0.5 - 0.5
    if initial_state:
        inp["initial_state"] = torch.randn(batch, nheads, headdim, dstate, device=device)
    return inp


def _grad_names(inp):
    return [k for k in FLOAT_INPUTS if k in inp]


def _run_ssd(inp, opts, backend, upstream):
    """(y, final_state) and the gradient of every float input, through the public op."""

    def fn(**kw):
        return ssd(**kw, **opts, return_final_state=True, backend=backend)

    return run_with_grads(fn, inp, upstream, _grad_names(inp))


def _as_float64(inp):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}


def _upstream(inp):
    x, h = inp["x"], inp["B"]
    batch, seqlen, nheads, headdim = x.shape
    gy = torch.randn(batch, seqlen, nheads, headdim, device=x.device)
    gh = torch.randn(batch, nheads, headdim, h.shape[-1], device=x.device)
    return gy, gh


def _assert_triton_matches_float64_reference(inp, opts):
    """y, the final state and every gradient of the Triton path against the float64 reference on the same inputs."""
    upstream = _upstream(inp)
    outs, grads = _run_ssd(inp, opts, "triton", upstream)
    ref_outs, ref_grads = _run_ssd(_as_float64(inp), opts, "reference", [u.double() for u in upstream])
    assert_close(outs[0], ref_outs[0], name="y")
    assert_close(outs[1], ref_outs[1], name="final_state")
    assert set(grads) == set(_grad_names(inp))
    for k in grads:
        assert_close(grads[k], ref_grads[k], name=f"d{k}")


def _seq_idx(seqlen, rows, device=DEVICE):
    """Packed documents: row 0 has a boundary at chunk boundary 16, a length-1 document at position 16,
    and boundaries inside chunks; row 1 has a short first document and a boundary at 32."""
    s = torch.zeros(rows, seqlen, dtype=torch.int32, device=device)
    s[0, 16:] = 1
    s[0, 17:] = 2
    s[0, 30:] = 3
    if rows > 1:
        s[1, 5:] = 1
        s[1, 32:] = 2
    return s


FULL = dict(D="head", z=True, dt_bias=True)
FULL_OPTS = dict(dt_softplus=True, dt_limit=(0.05, 1.2))

CASES = [
    pytest.param((1, 40, 2, 16, 1, 16), {}, dict(chunk_size=16), False, id="plain"),
    pytest.param((1, 40, 2, 16, 1, 16), FULL, FULL_OPTS, False, id="full-D-per-head-z-bias-softplus-limit"),
    pytest.param((1, 40, 2, 16, 1, 16), dict(FULL, D="channel"), FULL_OPTS, False, id="full-D-per-channel"),
    pytest.param((1, 40, 4, 16, 2, 16), dict(D="head"), {}, False, id="ngroups-2"),
    pytest.param((2, 45, 2, 16, 1, 16), {}, {}, False, id="ragged-2-chunks-plus-13"),
    pytest.param((1, 9, 2, 16, 1, 16), dict(D="head", initial_state=True), {}, False, id="seqlen-below-chunk"),
    pytest.param((2, 48, 2, 16, 1, 16), dict(FULL, initial_state=True), FULL_OPTS, True,
                 id="seq-idx-packed-docs-initial-state"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape, features, opts, packed", CASES)
def test_ssd_triton_float32_matches_reference(shape, features, opts, packed):
    inp = _make_inputs(*shape, **features)
    if packed:
        inp["seq_idx"] = _seq_idx(shape[1], shape[0])
    opts = {"chunk_size": 16, **opts}
    _assert_triton_matches_float64_reference(inp, opts)


def test_ssd_triton_returns_y_alone_without_final_state():
    inp = _make_inputs(1, 20, 2, 16, 1, 16)
    y = ssd(**inp, chunk_size=16, backend="triton")
    assert isinstance(y, torch.Tensor)
    assert_close(y, ssd(**_as_float64(inp), backend="reference"), name="y")


def _ssd_listing_lowp(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, chunk_size=16,
                      initial_state=None, dtype=torch.bfloat16):
    """Dao & Gu's Listing 1 (ngroups 1) with every tensor in `dtype`.

    This is what PyTorch itself makes of the chunked algorithm in bf16: the yardstick of the bf16 test. A ragged
    last chunk is padded with steps of Δ = 0 and x = 0, which neither decay nor write the state.
    """
    batch, seqlen, nheads, headdim = x.shape
    T, nc = chunk_size, -(-seqlen // chunk_size)
    pad = nc * T - seqlen
    dt_ = dt.to(dtype) + (dt_bias.to(dtype) if dt_bias is not None else 0)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    X = F.pad(x.to(dtype) * dt_[..., None], (0, 0, 0, 0, 0, pad)).reshape(batch, nc, T, nheads, headdim)
    a = F.pad(dt_ * A.to(dtype), (0, 0, 0, pad)).reshape(batch, nc, T, nheads).permute(0, 3, 1, 2)  # (b, H, c, T)
    Bc = F.pad(B.to(dtype)[:, :, 0], (0, 0, 0, pad)).reshape(batch, nc, T, -1)
    Cc = F.pad(C.to(dtype)[:, :, 0], (0, 0, 0, pad)).reshape(batch, nc, T, -1)
    acs = torch.cumsum(a, dim=-1)
    tril = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    Lmask = torch.exp((acs[..., :, None] - acs[..., None, :]).masked_fill(~tril, -math.inf))
    y_diag = torch.einsum("bcln,bcsn,bhcls,bcshp->bclhp", Cc, Bc, Lmask, X)
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", Bc, torch.exp(acs[..., -1:] - acs), X)
    h = initial_state.to(dtype) if initial_state is not None else torch.zeros_like(states[:, 0])
    incoming = []
    for k in range(nc):
        incoming.append(h)
        h = torch.exp(acs[:, :, k, -1])[..., None, None] * h + states[:, k]
    y_off = torch.einsum("bcln,bchpn,bhcl->bclhp", Cc, torch.stack(incoming, 1), torch.exp(acs))
    y = (y_diag + y_off).reshape(batch, nc * T, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + D.to(dtype)[:, None] * x.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y, h.float()


@pytest.mark.parametrize("seqlen", [48, 45, 9], ids=["whole-chunks", "ragged", "below-one-chunk"])
def test_lowp_listing_in_float64_equals_the_reference(seqlen):
    """The yardstick of the low-precision tests is exact in float64, ragged last chunk included."""
    inp = _as_float64(_make_inputs(2, seqlen, 2, 8, 1, 16, D="head", z=True, dt_bias=True, initial_state=True))
    y, h = _ssd_listing_lowp(**inp, dt_softplus=True, chunk_size=16, dtype=torch.float64)
    ref_y, ref_h = ssd(**inp, dt_softplus=True, chunk_size=16, return_final_state=True, backend="reference")
    assert_close(y, ref_y, name="y")
    assert_close(h.double(), ref_h, name="final_state")


def _lowp_inputs(shape, dtype, device):
    inp = _make_inputs(*shape, D="head", z=True, dt_bias=True, initial_state=True, device=device)
    for k in ("x", "dt", "B", "C", "z"):
        inp[k] = inp[k].to(dtype)  # A, D, dt_bias, initial_state stay float32 (as in a model)
    return inp


def _check_lowp_against_budget(inp, opts, reference_backend):
    """Every output and gradient within 2x the error of `_ssd_listing_lowp` in the same dtype."""
    dtype = inp["x"].dtype
    upstream = _upstream(inp)
    upstream = [upstream[0].to(dtype), upstream[1]]
    outs, grads = _run_ssd(inp, opts, "triton", upstream)
    ref_inp = _as_float64(inp) if reference_backend == "reference" else {
        k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
    ref_outs, ref_grads = _run_ssd(ref_inp, opts, reference_backend, [u.to(ref_inp["x"].dtype) for u in upstream])
    low_outs, low_grads = run_with_grads(
        lambda **kw: _ssd_listing_lowp(**kw, dt_softplus=True, chunk_size=opts["chunk_size"], dtype=dtype),
        inp, upstream, _grad_names(inp))
    for name, got, ref, low in (("y", outs[0], ref_outs[0], low_outs[0]),
                                ("final_state", outs[1], ref_outs[1], low_outs[1])):
        assert_close(got, ref, name=name, rel=0.0, atol=low_precision_tolerance(low, ref))
    for k in grads:
        assert_close(grads[k], ref_grads[k], name=f"d{k}", rel=0.0,
                     atol=low_precision_tolerance(low_grads[k], ref_grads[k]))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_ssd_triton_low_precision_within_twice_torch_error(dtype):
    _check_lowp_against_budget(_lowp_inputs((2, 48, 2, 16, 1, 16), dtype, DEVICE),
                               dict(chunk_size=16, dt_softplus=True), "reference")


# chunk 256: the backward's kernels cut a chunk into 4 row blocks of 64 (at chunk 16 above, one), the layout of
# the decay gradient's row parts (triton_chunk_scan_bwd: the dcb kernel's tiles write their row and column sums)
ROW_BLOCK_CASES = [
    pytest.param((2, 300, 2, 16, 1, 16), dict(FULL, initial_state=True), FULL_OPTS, True,
                 id="packed-docs-across-blocks-and-chunks-full"),
    pytest.param((1, 200, 4, 16, 2, 16), dict(D="channel"), {}, False, id="ngroups-2-ragged-one-chunk"),
]


@pytest.mark.parametrize("shape, features, opts, packed", ROW_BLOCK_CASES)
def test_ssd_triton_float32_several_row_blocks(shape, features, opts, packed):
    inp = _make_inputs(*shape, **features)
    if packed:  # boundaries inside row blocks, on a row-block edge (64) and on the chunk edge (256)
        s = torch.zeros(shape[0], shape[1], dtype=torch.int32, device=DEVICE)
        s[0, 64:], s[0, 71:], s[0, 256:] = 1, 2, 3
        s[1, 130:] = 1
        inp["seq_idx"] = s
    opts = {"chunk_size": 256, **opts}
    _assert_triton_matches_float64_reference(inp, opts)


def test_ssd_triton_bf16_decay_gradient_cancels():
    """dA = sum_t dt'_t da_t, da the reverse cumsum of dcs, which is a difference of large terms: at chunk 256 the
    running sum of dt' (~100 here) weights whatever the roundings leave of them. The backward takes each
    cancelling pair from one set of fp32 numbers (triton_chunk_scan_bwd's docstring), which keeps dA within a
    quarter of the bf16 budget on these seeds (measured: 0.012 / 0.042 / 0.000 / 0.051). The kernels before
    (the intra-chunk pair from a fp32 tile and a bf16 dot, the chunk-end pair from bf16 states and bf16 dH)
    gave 0.12 / 0.16 / 0.25 / 2.8x the budget, and ddt_bias 2.4x on seed 3: what
    test_gpu_small_heads_low_precision[bf16-P64-N16-T256] met on the H200. Every other gradient within the
    budget (a bf16 case with 4 row blocks)."""
    opts = dict(chunk_size=256, dt_softplus=True)
    ratio = {}  # (gradient, seed): max error / budget
    for seed in range(4):
        torch.manual_seed(seed)
        inp = _lowp_inputs((1, 256, 2, 64, 1, 16), torch.bfloat16, DEVICE)
        gy, gh = _upstream(inp)
        upstream = [gy.to(torch.bfloat16), gh]
        _, grads = _run_ssd(inp, opts, "triton", upstream)
        _, ref = _run_ssd({k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}, opts, "torch",
                          [u.float() for u in upstream])
        _, low = run_with_grads(lambda **kw: _ssd_listing_lowp(**kw, dtype=torch.bfloat16, **opts), inp, upstream,
                                _grad_names(inp))
        for k in grads:
            assert torch.isfinite(grads[k]).all(), f"d{k} (seed {seed}) not finite"
            ratio[k, seed] = round(max_error(grads[k], ref[k]) / low_precision_tolerance(low[k], ref[k]), 3)
    dA = {seed: r for (k, seed), r in ratio.items() if k == "A"}
    assert max(dA.values()) <= 0.25, f"dA error / bf16 budget by seed: {dA}"
    over = {f"d{k} seed {seed}": r for (k, seed), r in ratio.items() if r > 1.0}
    assert not over, f"error / bf16 budget over 1: {over}"


@pytest.mark.parametrize("chunk_size", [
    pytest.param(48, id="not-a-power-of-two"),
    pytest.param(8, id="below-16"),
    pytest.param(512, id="above-256"),
])
def test_ssd_triton_runs_any_chunk_size(chunk_size):
    """A model configured with chunk 8, 48 or 512 runs on the Triton path (chunk rounded and clamped to a
    power of two in [16, 256]); only the rounding differs from the float64 reference."""
    inp = _make_inputs(1, 40, 2, 16, 1, 16, D="head")
    upstream = _upstream(inp)
    outs, grads = _run_ssd(inp, {"chunk_size": chunk_size}, "triton", upstream)
    ref_outs, ref_grads = _run_ssd(_as_float64(inp), {"chunk_size": chunk_size}, "reference",
                                   [u.double() for u in upstream])
    assert_close(outs[0], ref_outs[0], name="y")
    for k in grads:
        assert_close(grads[k], ref_grads[k], name=f"d{k}")


@pytest.mark.parametrize("chunk_size", [0, -16, 16.0])
def test_ssd_triton_rejects_bad_chunk_size(chunk_size):
    inp = _make_inputs(1, 8, 2, 16, 1, 16)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        ssd(**inp, chunk_size=chunk_size, backend="triton")


DECODE_CASES = [
    pytest.param((2, 5, 2, 16, 1, 16), {}, {}, id="plain"),
    pytest.param((1, 5, 4, 16, 2, 16), dict(FULL, D="channel"), FULL_OPTS, id="full-D-per-channel-ngroups-2"),
]


@pytest.mark.parametrize("shape, features, opts", DECODE_CASES)
def test_ssd_state_update_triton_token_by_token_equals_parallel(shape, features, opts):
    inp = _make_inputs(*shape, initial_state=True, **features)
    y_par, h_par = ssd(**inp, **opts, chunk_size=16, return_final_state=True, backend="triton")
    y_ref, h_ref = ssd(**_as_float64(inp), **opts, return_final_state=True, backend="reference")
    state = inp["initial_state"].clone()
    ys = []
    for t in range(shape[1]):
        ys.append(ssd_state_update(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t], D=inp.get("D"),
            z=inp["z"][:, t] if "z" in inp else None, dt_bias=inp.get("dt_bias"), **opts, backend="triton"))
    y_step = torch.stack(ys, dim=1)
    assert_close(y_step, y_ref, name="y (steps vs reference)")
    assert_close(state, h_ref, name="state (steps vs reference)")
    assert_close(y_step, y_par, name="y (steps vs parallel triton)")
    assert_close(state, h_par, name="state (steps vs parallel triton)")


@pytest.mark.parametrize("state_dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_ssd_state_update_low_precision_state(state_dtype):
    """A bf16 / fp16 state is updated in float32 and rounded back: the Triton steps track the torch steps
    on the same low-precision state and a float32-state run within a few bf16 ulps (Triton's CPU
    interpreter truncates float32 -> bf16 where the GPU rounds, so the two paths may drift by an ulp a
    step; 3% of the state's scale is 4 ulps)."""
    shape = (2, 6, 2, 16, 1, 16)
    inp = _make_inputs(*shape, initial_state=True, D="head", dt_bias=True)
    opts = dict(dt_softplus=True)
    st_triton = inp["initial_state"].to(state_dtype)
    st_torch = st_triton.clone()
    st_fp32 = inp["initial_state"].clone()
    for t in range(shape[1]):
        args = (inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t])
        kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], **opts)
        y_tr = ssd_state_update(st_triton, *args, **kw, backend="triton")
        y_to = ssd_state_update(st_torch, *args, **kw, backend="torch")
        y_32 = ssd_state_update(st_fp32, *args, **kw, backend="torch")
        assert st_triton.dtype == state_dtype
        assert_close(st_triton.float(), st_torch.float(), name=f"step {t} state triton vs torch", rel=3e-2)
        assert_close(y_tr, y_to, name=f"step {t} y triton vs torch", rel=3e-2)
        assert_close(y_tr, y_32, name=f"step {t} y vs float32 state", rel=3e-2)
    assert_close(st_triton.float(), st_fp32, name="state vs float32 state", rel=3e-2)


# ---------------------------------------------------------------- parallel chunk-state forward

# `mambakit.ops.ssd` is also the public function's name: kernel modules are imported by path
_chunk_decay = importlib.import_module("mambakit.ops.ssd.triton_chunk_decay")
_chunk_state = importlib.import_module("mambakit.ops.ssd.triton_chunk_state")
_triton_ssd = importlib.import_module("mambakit.ops.ssd.triton_ssd")


def _states_reference(inp, T):
    """(b, c + 1, H, P, N) float64: the state entering every chunk, and the final state, as the sequential
    float64 reference leaves them after each chunk's last token (its final state on every prefix)."""
    x = inp["x"]
    seqlen = x.shape[1]
    h0 = inp.get("initial_state")
    out = [h0.double() if h0 is not None else torch.zeros(x.shape[0], x.shape[2], x.shape[3], inp["B"].shape[-1],
                                                         dtype=torch.float64, device=x.device)]
    for end in range(T, seqlen + T, T):
        end = min(end, seqlen)
        seq = inp.get("seq_idx")
        _, h = ssd_reference(*(inp[k][:, :end].double() for k in ("x", "dt")), inp["A"].double(),
                             *(inp[k][:, :end].double() for k in ("B", "C")),
                             initial_state=out[0], return_final_state=True,
                             seq_idx=seq[:, :end] if seq is not None else None)
        out.append(h)
    return torch.stack(out, dim=1)


STATE_CASES = [
    pytest.param((2, 45, 2, 16, 1, 16), torch.float32, False, False, {}, id="fp32-ragged-2-chunks-plus-13"),
    pytest.param((2, 48, 2, 16, 1, 16), torch.float32, True, True, {}, id="fp32-initial-state-seq-idx"),
    pytest.param((2, 45, 4, 16, 2, 16), torch.float32, True, True, {}, id="fp32-ngroups-2-ragged-seq-idx-h0"),
    pytest.param((1, 40, 2, 24, 1, 32), torch.float32, True, False,
                 dict(BLOCK_P=16, BLOCK_N=16, PASS_BLOCK=64), id="fp32-headdim-24-several-blocks"),
    pytest.param((2, 45, 2, 16, 1, 16), torch.bfloat16, True, True, {}, id="bf16-ragged-seq-idx-h0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape, dtype, initial_state, packed, cfg", STATE_CASES)
def test_chunk_state_parallel_equals_fused_and_reference(shape, dtype, initial_state, packed, cfg):
    """The parallel path (local states + state passing) stores the same states and final state as the
    fused walk (the same fp32 terms: equal to fp32 rounding), and both match the float64 reference.
    _seq_idx puts documents starting inside chunks and exactly at chunk starts (16, 32)."""
    T = 16
    inp = _make_inputs(*shape, initial_state=initial_state)
    for k in ("x", "B", "C"):
        inp[k] = inp[k].to(dtype)
    if packed:
        inp["seq_idx"] = _seq_idx(shape[1], shape[0])
    seq, h0 = inp.get("seq_idx"), inp.get("initial_state")
    dtp, cs = _chunk_decay.chunk_decay_fwd(inp["dt"], inp["A"], None, False, (0.0, math.inf), T)
    args = (inp["x"], inp["B"], dtp, cs, h0, seq, T)
    st_f, fin_f = _chunk_state.chunk_state_fwd(*args, cfg=dict(cfg, PARALLEL=False))
    st_p, fin_p = _chunk_state.chunk_state_fwd(*args, cfg=dict(cfg, PARALLEL=True))
    assert st_p.dtype == st_f.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    assert_close(st_p.float(), st_f.float(), name="states parallel vs fused", rel=1e-6)
    assert_close(fin_p, fin_f, name="final parallel vs fused", rel=1e-6)
    ref = _states_reference(inp, T)
    # bf16: x w and B are rounded to bf16 as dot operands (2^-9 relative each), the states stored in bf16
    rel = 1e-4 if dtype == torch.float32 else 1e-2
    assert_close(st_p.float(), ref, name="states vs reference", rel=rel)
    assert_close(fin_p, ref[:, -1], name="final vs reference", rel=rel)
    if packed:  # the documents do change the states (the masks are exercised, not vacuous)
        free = _chunk_state.chunk_state_fwd(inp["x"], inp["B"], dtp, cs, h0, None, T, cfg=dict(cfg, PARALLEL=True))
        assert float((free[0].float() - st_p.float()).abs().max()) > 0.1 * float(ref.abs().max())


@pytest.fixture
def forced_chunk_state_path(monkeypatch):
    """Make the public op's forward take a given chunk-state path (the backward reads its `states`)."""

    def force(parallel):
        monkeypatch.setattr(_triton_ssd, "chunk_state_fwd",
                            functools.partial(_chunk_state.chunk_state_fwd, cfg={"PARALLEL": parallel}))

    return force


PUBLIC_PARALLEL_CASES = [
    pytest.param((2, 48, 2, 16, 1, 16), dict(FULL, initial_state=True), FULL_OPTS, True,
                 id="seq-idx-packed-docs-initial-state-full"),
    pytest.param((2, 45, 4, 16, 2, 16), dict(D="head", initial_state=True), {}, False,
                 id="ngroups-2-ragged-initial-state"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape, features, opts, packed", PUBLIC_PARALLEL_CASES)
def test_ssd_triton_parallel_chunk_state_through_public_op(shape, features, opts, packed, forced_chunk_state_path):
    """y, the final state and every gradient with the parallel forward against float64 (the backward reads
    the states it stored; equality with the fused path's states is the test above)."""
    inp = _make_inputs(*shape, **features)
    if packed:
        inp["seq_idx"] = _seq_idx(shape[1], shape[0])
    opts = {"chunk_size": 16, **opts}
    forced_chunk_state_path(True)
    _assert_triton_matches_float64_reference(inp, opts)


@pytest.mark.slow
def test_ssd_triton_parallel_chunk_state_bf16_within_twice_torch_error(forced_chunk_state_path):
    forced_chunk_state_path(True)
    _check_lowp_against_budget(_lowp_inputs((2, 48, 2, 16, 1, 16), torch.bfloat16, DEVICE),
                               dict(chunk_size=16, dt_softplus=True), "reference")


def test_chunk_state_path_policy():
    """Parallel only with enough chunks and a fused grid under one program per SM (H100: 132 SMs)."""
    policy = _chunk_state.use_parallel_chunk_state
    # benchmark shape (batch 2, 64 heads, headdim 64, dstate 128: 256 fused programs), chunk 256
    assert not policy(2, 64, 8, 64, 128, 132)  # seqlen 2048
    assert not policy(2, 64, 128, 64, 128, 132)  # seqlen 32768: 2 fused programs per SM
    assert not policy(1, 64, 8, 64, 128, 132)  # batch 1, seqlen 2048: too few chunks to repay a second launch
    assert policy(1, 64, 16, 64, 128, 132)  # batch 1, seqlen 4096: 128 fused programs on 132 SMs
    assert not policy(1, 64, 128, 64, 128, 64)  # the same on a 64-SM GPU: 2 per SM
    assert policy(1, 24, 64, 64, 128, 132)  # a small model, long prompt
    assert not policy(1, 24, 70000, 64, 128, 132)  # more chunks than a CUDA grid axis holds


# ---------------------------------------------------------------- GPU (benchmark shape: -m gpu)

BENCH_SHAPE = dict(batch=2, nheads=64, headdim=64, ngroups=1, dstate=128)


def _bench_inputs(seqlen, **features):
    s = BENCH_SHAPE
    return _make_inputs(s["batch"], seqlen, s["nheads"], s["headdim"], s["ngroups"], s["dstate"], device="cuda",
                        **features)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [pytest.param(2048, id="L2048"), pytest.param(1000, id="L1000-ragged")])
def test_gpu_float32_matches_torch_path(seqlen):
    inp = _bench_inputs(seqlen, D="head", initial_state=True)
    opts = dict(chunk_size=256, dt_softplus=True)
    upstream = _upstream(inp)
    outs, grads = _run_ssd(inp, opts, "triton", upstream)
    ref_outs, ref_grads = _run_ssd(inp, opts, "torch", upstream)
    assert_close(outs[0], ref_outs[0], name="y")
    assert_close(outs[1], ref_outs[1], name="final_state")
    for k in grads:
        assert_close(grads[k], ref_grads[k], name=f"d{k}")


@pytest.mark.gpu
def test_gpu_float32_full_features_match_float64_reference():
    """A short slice at the benchmark head shape with every feature on, against the sequential float64 reference."""
    inp = _bench_inputs(300, D="channel", z=True, dt_bias=True, initial_state=True)
    s = torch.zeros(2, 300, dtype=torch.int32, device="cuda")
    s[0, 100:], s[0, 101:], s[0, 256:] = 1, 2, 3
    s[1, 7:] = 1
    inp["seq_idx"] = s
    opts = dict(chunk_size=128, dt_softplus=True, dt_limit=(0.05, 1.2))
    _assert_triton_matches_float64_reference(inp, opts)


@pytest.mark.gpu
def test_gpu_bfloat16_within_twice_torch_bf16_error():
    """Benchmark shape in bf16; reference: the float32 torch path on the same (bf16-valued) inputs."""
    inp = _bench_inputs(2048, D="head", z=True, dt_bias=True, initial_state=True)
    for k in ("x", "dt", "B", "C", "z"):
        inp[k] = inp[k].to(torch.bfloat16)
    _check_lowp_against_budget(inp, dict(chunk_size=256, dt_softplus=True), "torch")


SMALL_HEADS = [pytest.param(torch.bfloat16, P, N, T, id=f"bf16-P{P}-N{N}-T{T}")
               for P in (16, 32, 64) for N in (16, 64, 256) for T in (64, 256)] + [
    pytest.param(torch.float16, P, 64, 64, id=f"fp16-P{P}-N64-T64") for P in (16, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, headdim, dstate, chunk", SMALL_HEADS)
def test_gpu_small_heads_low_precision(dtype, headdim, dstate, chunk):
    """Small models' head shapes (the reproductions' Mamba-2 rows: headdim 16, dstate 16-256, chunk 64) in bf16 and
    fp16: with 64-row tiles the chunk scan gave y off by 6-10x its scale at headdim 16 / 32 and dstate 64 on the
    H200 (session 12); every output and gradient within the low-precision budget."""
    inp = _lowp_inputs((2, 2 * chunk + 37, 4, headdim, 1, dstate), dtype, "cuda")
    _check_lowp_against_budget(inp, dict(chunk_size=chunk, dt_softplus=True), "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [8, 16, 32])
def test_gpu_small_head_model_under_autocast(headdim):
    """The layout that faulted (an illegal memory access in the chunk scan, session 12): induction-heads' Mamba-2
    (d_model 64, dstate 64, chunk 64) at batch 128 x 256 under bf16 autocast, forward and backward, against the
    same model on the torch path in float32."""
    from mambakit import MambaConfig, MambaLM
    from mambakit.ops import use_backend

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=17, ssm_cfg={
        "layer": "Mamba2", "d_state": 64, "headdim": headdim, "chunk_size": 64})).cuda()
    ids = torch.randint(0, 17, (128, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with use_backend("torch"):
        ref = model(ids, logits_to_keep=1).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, logits_to_keep=1)
    out.float().square().sum().backward()
    torch.cuda.synchronize()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())
    assert float((out.float() - ref).abs().max()) <= 0.05 * float(ref.abs().max())


@pytest.mark.gpu
def test_gpu_decode_steps_equal_parallel():
    inp = _bench_inputs(32, D="head", z=True, dt_bias=True, initial_state=True)
    opts = dict(dt_softplus=True)
    y_par, h_par = ssd(**inp, **opts, chunk_size=256, return_final_state=True, backend="triton")
    state = inp["initial_state"].clone()
    ys = [ssd_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                           D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"], **opts, backend="triton")
          for t in range(32)]
    assert_close(torch.stack(ys, dim=1), y_par, name="y")
    assert_close(state, h_par, name="state")


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [pytest.param(8192, id="L8192"), pytest.param(5000, id="L5000-ragged-packed")])
def test_gpu_chunk_state_parallel_equals_fused(seqlen):
    """Benchmark shape, bf16: the two chunk-state paths agree (fp32 final to rounding, bf16 states to an ulp)."""
    inp = _bench_inputs(seqlen, initial_state=True)
    for k in ("x", "B"):
        inp[k] = inp[k].to(torch.bfloat16)
    seq = None
    if seqlen == 5000:
        seq = torch.zeros(2, seqlen, dtype=torch.int32, device="cuda")
        seq[0, 700:], seq[0, 1024:], seq[1, 3001:] = 1, 2, 1
    dtp, cs = _chunk_decay.chunk_decay_fwd(inp["dt"], inp["A"], None, False, (0.0, math.inf), 256)
    args = (inp["x"], inp["B"], dtp, cs, inp["initial_state"], seq, 256)
    st_f, fin_f = _chunk_state.chunk_state_fwd(*args, cfg={"PARALLEL": False})
    st_p, fin_p = _chunk_state.chunk_state_fwd(*args, cfg={"PARALLEL": True})
    assert_close(fin_p, fin_f, name="final parallel vs fused", rel=1e-5)
    assert_close(st_p.float(), st_f.float(), name="states parallel vs fused", rel=1e-2)


def test_batch_pieces_fit_the_grid_axes():
    from mambakit.ops.ssd.triton_ssd import batch_pieces

    assert batch_pieces(8, 2048, 24, 1, 64) == [slice(0, 8)]
    # 512 rows of 8192 tokens at T = 64: 128 chunks a row, 65536 blocks in all: two launches of 511 and 1 rows.
    assert batch_pieces(512, 8192, 24, 1, 64) == [slice(0, 511), slice(511, 512)]
    pieces = batch_pieces(100, 8192, 24, 2, 64)  # 256 chunk-groups a row: 255 rows a launch
    assert [p.stop - p.start for p in pieces] == [100]
    with pytest.raises(ValueError, match="chunk_size"):
        batch_pieces(1, 65536 * 64 + 1, 24, 1, 64)


@pytest.mark.slow  # 15-35 s on 2 cores: out of the fast lane, CI runs it
@pytest.mark.parametrize("z", [pytest.param(False, id="no-z"), pytest.param(True, id="z-gate")])
def test_ssd_triton_split_batch_equals_one_launch(monkeypatch, z):
    """Past the grid limit the batch runs in slices: the same outputs, final states and gradients."""
    from mambakit.ops.ssd import triton_ssd

    inp = _make_inputs(3, 48, 2, 16, 1, 16, D="head", z=z, dt_bias=True, initial_state=True)
    inp["seq_idx"] = torch.cat([_seq_idx(48, 2), torch.zeros(1, 48, dtype=torch.int32, device=DEVICE)])
    opts = {"chunk_size": 16, **FULL_OPTS}
    upstream = _upstream(inp)
    outs, grads = _run_ssd(inp, opts, "triton", upstream)
    monkeypatch.setattr(triton_ssd, "_GRID_YZ", 3)  # 3 chunks a row: one row per launch
    assert len(triton_ssd.batch_pieces(3, 48, 2, 1, 16)) == 3
    split_outs, split_grads = _run_ssd(inp, opts, "triton", upstream)
    assert_close(split_outs[0], outs[0], name="y")
    assert_close(split_outs[1], outs[1], name="final_state")
    assert set(split_grads) == set(grads)
    for k in grads:
        assert_close(split_grads[k], grads[k], name=f"d{k}")


@pytest.mark.slow
@pytest.mark.parametrize("flags, max_stack", [
    pytest.param([], 64, id="bf16-anchors-shape"),
    pytest.param(["--batch", "8", "--nheads", "24", "--seqlen", "2048", "--z", "--dtype", "float32"], None,
                 id="float32-z-training-shape"),
])
def test_every_ssd_kernel_compiles_for_sm90_at_the_launchers_configs(flags, max_stack):
    """No CPU test runs the GPU configs (the interpreter ignores warps, stages and shared memory): the launchers'
    tiles for a GPU shape go through `benchmarks/ssd_sass.py`, which records a forward + backward's launches on meta
    tensors and compiles each for an H100 / H200 with Triton's bundled ptxas. Every kernel must build within the
    227 KB of shared memory a block may use (exit code), and in bf16 (the models' path) spill at most a few words
    (64 bytes a thread: the dx kernel spills 48 at 255 registers)."""
    out = run_sass_script("ssd_sass.py", *flags)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| _")]
    names = {r[0] for r in rows}
    assert {"_chunk_cb_kernel", "_chunk_scan_fwd_kernel", "_chunk_state_bwd_kernel", "_chunk_dcb_kernel",
            "_chunk_dbc_kernel", "_chunk_dx_kernel"} <= names, out.stdout
    for name, _, regs, stack, smem_kb, _ in rows:
        assert int(regs) <= 255 and float(smem_kb) * 1024 <= 232448, (name, out.stdout)
        if max_stack is not None:
            assert int(stack) <= max_stack, (name, out.stdout)
