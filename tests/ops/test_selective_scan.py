"""Selective scan (Mamba-1 S6), "torch" backend: the scan by checkpoint intervals and the decode step against the reference.

Shapes (legend): b batch, l seqlen, d dim, g ngroups, n dstate.

Every case compares y, the final state and the gradients of every input (initial_state included)
with random upstream gradients on y and on the final state, in float64 unless stated otherwise.
Small checkpoint intervals are passed explicitly so that short sequences still span several intervals.
"""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import selective_scan, selective_state_update
from mambakit.ops.selective_scan.torch_scan import default_checkpoint_interval, selective_scan_torch
from mambakit.ops.selective_scan.reference import selective_scan_reference
from tests.helpers import assert_close, low_precision_tolerance, run_with_grads, saved_bytes

# float64 fast path vs float64 reference: only summation order differs
RTOL_F64 = 1e-10


def make_inputs(b, l, d, n, g=1, *, dtype=torch.float64, extras=False, initial_state=False, complex_A=False,
                seq_idx=None):
    """Random inputs in a stable regime: Re(A) < 0, dt' in about (0.01, 1)."""
    real = torch.float64 if dtype == torch.float64 else torch.float32
    if complex_A:
        A = torch.complex(-(0.2 + torch.rand(d, n, dtype=real)), torch.randn(d, n, dtype=real))
    else:
        A = -(0.2 + 2 * torch.rand(d, n, dtype=real))
    inp = dict(
        x=torch.randn(b, l, d, dtype=dtype),
        # raw dt around -2 feeds the softplus; without it dt is already positive
        dt=(torch.randn(b, l, d) - 2 if extras else 0.05 + 0.5 * torch.rand(b, l, d)).to(dtype),
        A=A,
        B=torch.randn(b, l, g, n, dtype=dtype),
        C=torch.randn(b, l, g, n, dtype=dtype),
    )
    if extras:
        inp.update(D=torch.randn(d, dtype=real), z=torch.randn(b, l, d, dtype=dtype),
                   dt_bias=0.5 * torch.randn(d, dtype=real))
    if initial_state:
        state_dtype = A.dtype if complex_A else real
        inp["initial_state"] = torch.randn(b, d, n, dtype=state_dtype)
    if seq_idx is not None:
        inp["seq_idx"] = seq_idx
    return inp


def packed_seq_idx(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(b, l) int32 document index from document lengths per row."""
    rows = [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row]
    return torch.stack(rows).to(torch.int32)


def upstream_for(inp):
    """Random upstream gradients for y (b, l, d) and the final state (b, d, n)."""
    b, l, d = inp["x"].shape
    n = inp["A"].shape[1]
    state_dtype = torch.complex128 if inp["A"].is_complex() else torch.float64
    return [torch.randn(b, l, d, dtype=torch.float64), torch.randn(b, d, n, dtype=state_dtype)]


def grad_names(inp):
    return [k for k, v in inp.items() if k != "seq_idx" and v is not None]


CASES = [
    pytest.param(dict(b=2, l=24, d=8, n=4), {}, 8, id="plain"),
    pytest.param(dict(b=2, l=24, d=8, n=4, extras=True), dict(dt_softplus=True), 8, id="D-z-dt_bias-softplus"),
    pytest.param(dict(b=2, l=24, d=8, n=4, g=2, extras=True), dict(dt_softplus=True), 8, id="ngroups2"),
    pytest.param(dict(b=2, l=24, d=8, n=4, g=4, extras=True, initial_state=True), dict(dt_softplus=True), 8,
                 id="ngroups4"),
    pytest.param(dict(b=3, l=1, d=8, n=4, extras=True, initial_state=True), dict(dt_softplus=True), 8,
                 id="seqlen1"),
    pytest.param(dict(b=2, l=7, d=8, n=4, extras=True, initial_state=True), dict(dt_softplus=True), 8,
                 id="seqlen7"),
    pytest.param(dict(b=2, l=37, d=8, n=4, g=2, extras=True, initial_state=True), dict(dt_softplus=True), 8,
                 id="seqlen37"),
    pytest.param(dict(b=2, l=50, d=8, n=4, extras=True, initial_state=True), dict(dt_softplus=True), 16,
                 id="3-intervals-ragged-tail"),
    pytest.param(dict(b=2, l=9, d=4, n=3, extras=True, initial_state=True), dict(dt_softplus=True), 1,
                 id="interval-1"),
    pytest.param(dict(b=2, l=40, d=8, n=4, extras=True, initial_state=True), dict(dt_softplus=True), None,
                 id="default-interval"),
    pytest.param(dict(b=2, l=32, d=8, n=4, extras=True, initial_state=True), {}, 8, id="extras-no-softplus"),
    pytest.param(
        # row 0: a boundary exactly at the interval boundary (t=8) and length-1 documents;
        # row 1: a length-1 document first, one crossing the interval boundary, a length-1 last one
        dict(b=2, l=20, d=8, n=4, g=2, extras=True, initial_state=True,
             seq_idx=packed_seq_idx([[3, 5, 1, 1, 10], [1, 12, 6, 1]])),
        dict(dt_softplus=True), 8, id="seq_idx-packed-initial-state"),
    pytest.param(dict(b=2, l=21, d=8, n=4, g=2, extras=True, initial_state=True, complex_A=True),
                 dict(dt_softplus=True), 8, id="complex-A"),
    pytest.param(dict(b=2, l=13, d=8, n=4, extras=True, initial_state=True, complex_A=True,
                      seq_idx=packed_seq_idx([[5, 8], [1, 1, 11]])),
                 dict(dt_softplus=True), 4, id="complex-A-seq_idx"),
]


@pytest.mark.parametrize("shape, flags, interval", CASES)
def test_torch_path_matches_reference(shape, flags, interval):
    inp = make_inputs(**shape)
    upstream = upstream_for(inp)
    names = grad_names(inp)
    ref_out, ref_grads = run_with_grads(
        lambda **kw: selective_scan_reference(**kw, **flags, return_final_state=True), inp, upstream, names)
    out, grads = run_with_grads(
        lambda **kw: selective_scan_torch(**kw, **flags, return_final_state=True, checkpoint_interval=interval),
        inp, upstream, names)
    for got, want, name in zip(out, ref_out, ("y", "final_state")):
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert_close(got, want, name=name, rel=RTOL_F64)
    for name in names:
        assert grads[name].dtype == inp[name].dtype
        assert_close(grads[name], ref_grads[name], name=f"grad {name}", rel=RTOL_F64)
    # the no-grad path (no interval-entry states kept) gives the same outputs
    with torch.no_grad():
        y, h = selective_scan_torch(**inp, **flags, return_final_state=True, checkpoint_interval=interval)
    assert_close(y, ref_out[0], name="y (no grad)", rel=RTOL_F64)
    assert_close(h, ref_out[1], name="final_state (no grad)", rel=RTOL_F64)


def test_torch_path_takes_chunk_len_as_the_former_name_of_checkpoint_interval():
    inp = make_inputs(b=1, l=9, d=4, n=4)
    want = selective_scan_torch(**inp, checkpoint_interval=4)
    with pytest.warns(DeprecationWarning, match="'chunk_len' is renamed 'checkpoint_interval'"):
        got = selective_scan_torch(**inp, chunk_len=4)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="checkpoint_interval must be >= 1, got 0"):
        selective_scan_torch(**inp, checkpoint_interval=0)


@pytest.mark.parametrize("names", [
    pytest.param(["x"], id="only-x"),
    pytest.param(["A", "dt_bias"], id="only-A-dt_bias"),
    pytest.param(["B", "initial_state"], id="only-B-initial_state"),
])
def test_partial_requires_grad(names):
    inp = make_inputs(2, 19, 8, 4, g=2, extras=True, initial_state=True)
    upstream = upstream_for(inp)
    flags = dict(dt_softplus=True, return_final_state=True)
    _, ref_grads = run_with_grads(lambda **kw: selective_scan_reference(**kw, **flags), inp, upstream, names)
    _, grads = run_with_grads(lambda **kw: selective_scan_torch(**kw, **flags, checkpoint_interval=8), inp, upstream, names)
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"grad {name}", rel=RTOL_F64)


def test_only_y_or_only_final_state_used():
    """Upstream gradient on one output only (autograd passes None for the other)."""
    inp = make_inputs(2, 19, 8, 4, extras=True, initial_state=True)
    names = grad_names(inp)
    flags = dict(dt_softplus=True, return_final_state=True)
    for which in (0, 1):
        def loss_of(fn):
            return lambda **kw: fn(**kw, **flags)[which]
        up = [upstream_for(inp)[which]]
        ref_out, ref_grads = run_with_grads(loss_of(selective_scan_reference), inp, up, names)
        out, grads = run_with_grads(loss_of(lambda **kw: selective_scan_torch(**kw, checkpoint_interval=8)), inp, up, names)
        assert_close(out[0], ref_out[0], name=f"output {which}", rel=RTOL_F64)
        for name in names:
            assert_close(grads[name], ref_grads[name], name=f"grad {name} (output {which})", rel=RTOL_F64)


def test_public_op_default_backend_is_torch_on_cpu():
    inp = make_inputs(2, 30, 8, 4, extras=True, initial_state=True)
    y, h = selective_scan(**inp, dt_softplus=True, return_final_state=True)
    y_ref, h_ref = selective_scan_reference(**inp, dt_softplus=True, return_final_state=True)
    assert_close(y, y_ref, name="y", rel=RTOL_F64)
    assert_close(h, h_ref, name="final_state", rel=RTOL_F64)
    # B, C given 3-D mean ngroups = 1
    y3 = selective_scan(**{**inp, "B": inp["B"][:, :, 0], "C": inp["C"][:, :, 0]}, dt_softplus=True)
    assert_close(y3, y_ref, name="y (3-D B, C)", rel=RTOL_F64)


def test_float32_within_1e4_of_reference():
    """float32 inputs, several intervals: errors stay under 1e-4 of the float64 reference's scale (DESIGN.md)."""
    inp = make_inputs(2, 70, 8, 4, g=2, dtype=torch.float32, extras=True, initial_state=True,
                      seq_idx=packed_seq_idx([[30, 1, 39], [70]]))
    inp64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    upstream = upstream_for(inp)
    names = grad_names(inp)
    flags = dict(dt_softplus=True, return_final_state=True)
    ref_out, ref_grads = run_with_grads(lambda **kw: selective_scan_reference(**kw, **flags), inp64, upstream, names)
    out, grads = run_with_grads(lambda **kw: selective_scan_torch(**kw, **flags, checkpoint_interval=16), inp, upstream, names)
    for got, want, name in zip(out, ref_out, ("y", "final_state")):
        assert got.dtype == torch.float32
        assert_close(got, want, name=name, rel=1e-4)
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"grad {name}", rel=1e-4)


def test_empty_sequence_passes_state_through():
    inp = make_inputs(2, 0, 8, 4, extras=True, initial_state=True)
    y, h = selective_scan(**inp, dt_softplus=True, return_final_state=True)
    assert y.shape == (2, 0, 8) and y.dtype == inp["x"].dtype
    assert_close(h, inp["initial_state"], name="final_state", rel=0.0)


def test_bf16_inputs_within_twice_pytorch_bf16_error():
    """bf16 x, dt, B, C, z (fp32 A, D, dt_bias, state) against the reference on the same values in fp32.

    "PyTorch's own bf16 error" is measured as the reference run on the bf16 tensors themselves: it
    computes in float64 and rounds y and the bf16 inputs' gradients to bf16, i.e. the error of the
    exact answer stored in bf16. The fast path may make at most twice that, plus 1e-3 of the scale
    for its float32 arithmetic (helpers.low_precision_tolerance).
    """
    inp32 = make_inputs(2, 40, 16, 8, g=2, dtype=torch.float32, extras=True, initial_state=True)
    low = ("x", "dt", "B", "C", "z")
    inp16 = {k: (v.to(torch.bfloat16) if k in low else v) for k, v in inp32.items()}
    inp32 = {k: (v.float() if k in low else v) for k, v in inp16.items()}  # the same values, exactly
    gy, gh = upstream_for(inp32)
    upstream = [gy.to(torch.bfloat16).double(), gh]  # both runs see the same upstream values
    names = grad_names(inp32)
    flags = dict(dt_softplus=True, return_final_state=True)
    truth_out, truth_grads = run_with_grads(lambda **kw: selective_scan_reference(**kw, **flags), inp32, upstream,
                                            names)
    lowp_out, lowp_grads = run_with_grads(lambda **kw: selective_scan_reference(**kw, **flags), inp16, upstream,
                                          names)
    out, grads = run_with_grads(lambda **kw: selective_scan_torch(**kw, **flags, checkpoint_interval=16), inp16, upstream,
                                names)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32
    for got, base, want, name in zip(out, lowp_out, truth_out, ("y", "final_state")):
        assert_close(got, want, name=name, rel=0.0, atol=low_precision_tolerance(base, want))
    for name in names:
        assert grads[name].dtype == inp16[name].dtype
        assert_close(grads[name], truth_grads[name], name=f"grad {name}", rel=0.0,
                     atol=low_precision_tolerance(lowp_grads[name], truth_grads[name]))


@pytest.mark.parametrize("shape", [
    pytest.param(dict(b=2, d=8, n=4, g=2, extras=True), id="real-D-z-dt_bias-ngroups2"),
    pytest.param(dict(b=2, d=8, n=4, extras=True, complex_A=True), id="complex-A"),
])
def test_step_by_step_reproduces_parallel(shape):
    """selective_state_update token by token == selective_scan over the whole sequence (float64)."""
    l = 11
    inp = make_inputs(l=l, initial_state=True, **shape)
    par = dict(dt_softplus=True, return_final_state=True)
    y_par, h_par = selective_scan(**inp, **par, backend="torch")
    state = inp["initial_state"].clone()
    ys = []
    for t in range(l):
        z_t = inp["z"][:, t] if "z" in inp else None
        y_t = selective_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                                     D=inp.get("D"), z=z_t, dt_bias=inp.get("dt_bias"), dt_softplus=True,
                                     backend="torch")
        ys.append(y_t)
        if t in (0, 4):  # the state after a prefix equals the parallel op's final state on that prefix
            prefix = {k: (v[:, : t + 1] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
            _, h_prefix = selective_scan(**prefix, **par, backend="torch")
            assert_close(state, h_prefix, name=f"state after token {t}", rel=1e-12)
    assert_close(torch.stack(ys, dim=1), y_par, name="y", rel=1e-12)
    assert_close(state, h_par, name="final state", rel=1e-12)


@pytest.mark.parametrize("contiguous", [pytest.param(True, id="contiguous"),
                                        pytest.param(False, id="non-contiguous-state")])
def test_step_updates_state_in_place_and_matches_reference_step(contiguous):
    inp = make_inputs(3, 1, 8, 4, g=2, extras=True)
    state = torch.randn(3, 8, 4, dtype=torch.float64)
    if not contiguous:  # e.g. one layer's slice of a cache laid out (batch, dstate, dim)
        state = state.transpose(1, 2).contiguous().transpose(1, 2)
    args = dict(x=inp["x"][:, 0], dt=inp["dt"][:, 0], A=inp["A"], B=inp["B"][:, 0], C=inp["C"][:, 0], D=inp["D"],
                z=inp["z"][:, 0], dt_bias=inp["dt_bias"], dt_softplus=True)
    ref_state = state.clone()
    y_ref = selective_state_update(ref_state, **args, backend="reference")
    ptr = state.data_ptr()
    y = selective_state_update(state, **args, backend="torch")
    assert state.data_ptr() == ptr
    assert_close(y, y_ref, name="y", rel=1e-12)
    assert_close(state, ref_state, name="state", rel=1e-12)


def test_saved_tensors_far_smaller_than_full_state_history():
    """Memory: what autograd keeps is O(b l d + b l d n / checkpoint_interval), not the (b, l, d, n) history."""
    b, l, d, n = 2, 512, 64, 64
    inp = make_inputs(b, l, d, n, dtype=torch.float32, extras=True, initial_state=True)
    leaves = {k: v.requires_grad_() for k, v in inp.items()}
    (y, h), saved = saved_bytes(lambda: selective_scan_torch(**leaves, dt_softplus=True, return_final_state=True))
    full_history = b * l * d * n * 4
    interval = default_checkpoint_interval(b, d, n)
    # (l, b, d)-sized tensors (x, dt', dt raw, y_pre, z) + B, C + interval-entry states
    expected_bound = 6 * b * l * d * 4 + 2 * b * l * n * 4 + (l // interval) * b * d * n * 4 + 4 * d * n * 4
    assert 0 < saved <= expected_bound, (saved, expected_bound)
    # at dstate 64 the (l, b, d)-sized inputs cost 5 / 64 of the history, the interval-entry states 1 / checkpoint_interval
    assert saved < full_history / 4, (saved, full_history)
    (y.float().square().sum() + h.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


_S = dict(b=2, l=5, d=8, n=4)


def _scan_args(**overrides):
    args = make_inputs(**_S, extras=True, initial_state=True)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, name", [
    pytest.param(dict(x=torch.randn(2, 5)), "x", id="x-wrong-rank"),
    pytest.param(dict(dt=torch.randn(2, 4, 8, dtype=torch.float64)), "dt", id="dt-seqlen-mismatch"),
    pytest.param(dict(A=torch.randn(8, 5, dtype=torch.float64)), "A", id="A-dstate-mismatch"),
    pytest.param(dict(B=torch.randn(2, 5, 3, 4, dtype=torch.float64), C=torch.randn(2, 5, 3, 4, dtype=torch.float64)),
                 "B", id="ngroups-not-dividing-dim"),
    pytest.param(dict(C=torch.randn(2, 5, 1, 3, dtype=torch.float64)), "C", id="C-dstate-mismatch"),
    pytest.param(dict(A=-torch.ones(8, 4, dtype=torch.int32)), "A", id="A-int-dtype"),
    pytest.param(dict(D=torch.randn(7, dtype=torch.float64)), "D", id="D-size"),
    pytest.param(dict(z=torch.randn(2, 5, 9, dtype=torch.float64)), "z", id="z-shape"),
    pytest.param(dict(initial_state=torch.randn(2, 8, 3, dtype=torch.float64)), "initial_state",
                 id="initial_state-shape"),
    pytest.param(dict(initial_state=torch.randn(2, 8, 4, dtype=torch.bfloat16)), "initial_state",
                 id="initial_state-bf16"),  # the sequence op takes float32 / float64 (a bf16 cache is widened first)
    pytest.param(dict(seq_idx=torch.tensor([[0, 0, 1, 0, 1], [0, 1, 1, 2, 2]], dtype=torch.int32)), "seq_idx",
                 id="seq_idx-decreasing"),
    pytest.param(dict(seq_idx=torch.zeros(2, 5)), "seq_idx", id="seq_idx-float"),
])
def test_selective_scan_rejects_bad_input(overrides, name):
    with pytest.raises(ValueError, match=f"^selective_scan: {name} "):
        selective_scan(**_scan_args(**overrides))


@pytest.mark.parametrize("overrides, name", [
    pytest.param(dict(state=torch.randn(2, 8, dtype=torch.float64)), "state", id="state-wrong-rank"),
    pytest.param(dict(state=torch.randn(2, 8, 4).to(torch.int32)), "state", id="state-int"),  # bf16 / fp16 states step
    pytest.param(dict(x=torch.randn(2, 5, 8, dtype=torch.float64)), "x", id="x-wrong-rank"),
    pytest.param(dict(dt=torch.randn(3, 8, dtype=torch.float64)), "dt", id="dt-batch-mismatch"),
    pytest.param(dict(B=torch.randn(2, 3, 4, dtype=torch.float64), C=torch.randn(2, 3, 4, dtype=torch.float64)), "B",
                 id="ngroups-not-dividing-dim"),
    pytest.param(dict(C=torch.randn(2, 1, 5, dtype=torch.float64)), "C", id="C-dstate-mismatch"),
    pytest.param(dict(A=torch.randn(8, 4).to(torch.int64)), "A", id="A-int-dtype"),
])
def test_selective_state_update_rejects_bad_input(overrides, name):
    args = dict(state=torch.randn(2, 8, 4, dtype=torch.float64), x=torch.randn(2, 8, dtype=torch.float64),
                dt=torch.rand(2, 8, dtype=torch.float64), A=-torch.rand(8, 4, dtype=torch.float64),
                B=torch.randn(2, 1, 4, dtype=torch.float64), C=torch.randn(2, 1, 4, dtype=torch.float64))
    args.update(overrides)
    with pytest.raises(ValueError, match=f"^selective_state_update: {name} "):
        selective_state_update(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [
    pytest.param(dict(extras=True, initial_state=True), id="real"),
    pytest.param(dict(extras=True, initial_state=True, seq_idx=packed_seq_idx([[100, 1, 155], [256]])),
                 id="real-seq_idx"),
])
def test_torch_backend_on_cuda_float32(flags):
    """The torch path on CUDA tensors (float32) against the float64 reference on CPU."""
    inp = make_inputs(2, 256, 64, 16, g=2, dtype=torch.float32, **flags)
    inp64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    cuda = {k: v.cuda() for k, v in inp.items()}
    upstream = upstream_for(inp)
    names = grad_names(inp)
    call = dict(dt_softplus=True, return_final_state=True)
    ref_out, ref_grads = run_with_grads(lambda **kw: selective_scan_reference(**kw, **call), inp64, upstream, names)
    out, grads = run_with_grads(lambda **kw: selective_scan(**kw, **call, backend="torch"), cuda,
                                [u.cuda() for u in upstream], names)
    for got, want, name in zip(out, ref_out, ("y", "final_state")):
        assert_close(got, want, name=name, rel=1e-4)
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"grad {name}", rel=1e-4)
