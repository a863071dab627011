"""rms_norm (plain and gated): the torch and triton paths against the float64 reference.

On CPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which handles float64, so shapes stay tiny and comparisons are in float64. Tests marked `gpu`
compare the kernels at real shapes on CUDA (the lead runs them on the GPU machine).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import rms_norm
from tests.helpers import assert_close, low_precision_tolerance, run_with_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def _inputs(shape, gated, dtype=F64):
    """x, weight, z (None unless gated) on DEVICE."""
    return dict(x=torch.randn(*shape, dtype=dtype, device=DEVICE),
                weight=1.0 + 0.5 * torch.randn(shape[-1], dtype=dtype, device=DEVICE),
                z=torch.randn(*shape, dtype=dtype, device=DEVICE) if gated else None)


def _grad_names(inputs):
    return ["x", "weight"] + (["z"] if inputs["z"] is not None else [])


def _op(backend, z_view=None, **kw):
    """The op as a function of its tensors; z_view(z) is what reaches the op (a strided slice, say)."""
    def op(x, weight, z=None):
        return rms_norm(x, weight, z=z if z is None or z_view is None else z_view(z), **kw, backend=backend)
    return op


CASES = [
    pytest.param(dict(shape=(48,), gated=False), id="no-leading-dims"),
    pytest.param(dict(shape=(7, 48), gated=False), id="plain-2d"),
    pytest.param(dict(shape=(2, 5, 48), gated=False, group_size=16), id="plain-3d-groups"),
    pytest.param(dict(shape=(2, 3, 4, 32), gated=True), id="gated-4d"),
    pytest.param(dict(shape=(3, 6, 48), gated=True, group_size=12), id="gated-groups-not-pow2"),
    pytest.param(dict(shape=(3, 6, 48), gated=True, group_size=48, norm_before_gate=True), id="norm-then-gate"),
    pytest.param(dict(shape=(2, 9, 64), gated=True, group_size=16, norm_before_gate=True, eps=1e-2),
                 id="norm-then-gate-groups-eps"),
    pytest.param(dict(shape=(2, 7, 40), gated=True, group_size=20, strided_z=True), id="gated-z-channel-slice"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_norm_matches_reference(backend, case):
    case = dict(case)
    shape = case.pop("shape")
    inputs = _inputs(shape, case.pop("gated"))
    if case.pop("strided_z", False):
        # z as a channel slice of a wider tensor (Mamba-2's in_proj output), sliced inside the op so that
        # the row stride reaches the kernels (run_with_grads' leaf copies are contiguous)
        hidden = shape[-1]
        inputs["z"] = torch.randn(*shape[:-1], 3 * hidden, dtype=F64, device=DEVICE)
        case["z_view"] = lambda z: z[..., hidden : 2 * hidden]
    upstream = [torch.randn(inputs["x"].shape, dtype=F64, device=DEVICE)]
    names = _grad_names(inputs)
    (ref,), ref_grads = run_with_grads(_op("reference", **case), inputs, upstream, names)
    (out,), grads = run_with_grads(_op(backend, **case), inputs, upstream, names)
    # compiled float64 kernels on CUDA are not numpy: an H200 gave 2.1e-10 of y's scale (the gate after the norm,
    # eps 1e-2), where the interpreter and the torch path agree with the reference to ~1e-15
    rel = 1e-8 if backend == "triton" and DEVICE == "cuda" else 1e-10
    assert_close(out, ref, name="y", rel=rel)
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"d{name}", rel=rel)


@pytest.mark.parametrize("gating", [
    pytest.param(dict(gated=False, norm_before_gate=False), id="plain"),
    pytest.param(dict(gated=True, norm_before_gate=False), id="gate-then-norm"),
    pytest.param(dict(gated=True, norm_before_gate=True), id="norm-then-gate"),
])
def test_triton_launchers_with_small_tiles(gating):
    """Tiles of 2 rows x 16 channels: ragged last row tile, backward programs looping over 4 row
    tiles with a partly empty last one, groups of 12 in 16-wide tiles."""
    from mambakit.ops.rms_norm.triton_norm import rms_norm_bwd, rms_norm_fwd

    inputs = _inputs((13, 36), gating["gated"])
    nbg, group, eps = gating["norm_before_gate"], 12, 1e-5
    upstream = [torch.randn(13, 36, dtype=F64, device=DEVICE)]
    names = _grad_names(inputs)
    (ref,), ref_grads = run_with_grads(_op("reference", group_size=group, norm_before_gate=nbg), inputs, upstream,
                                       names)
    x, w, z = inputs["x"], inputs["weight"], inputs["z"]
    y, rstd = rms_norm_fwd(x2=x, weight=w, z2=z, eps=eps, group=group, norm_before_gate=nbg, elems=32, num_warps=1)
    dx, dw, dz = rms_norm_bwd(x2=x, weight=w, z2=z, rstd=rstd, dy2=upstream[0], group=group, norm_before_gate=nbg,
                              elems=32, num_warps=1, row_tiles=4)
    assert_close(y, ref, name="y", rel=1e-10)
    for name, grad in (("x", dx), ("weight", dw), ("z", dz)):
        if name in names:
            assert_close(grad, ref_grads[name], name=f"d{name}", rel=1e-10)


def _native_norm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """The norm written with PyTorch ops in the inputs' own dtype: the yardstick for low-precision error."""
    h = x * F.silu(z) if z is not None and not norm_before_gate else x
    g = h.shape[-1] if group_size is None else group_size
    hg = h.unflatten(-1, (h.shape[-1] // g, g))
    y = (hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    y = y * F.silu(z) if z is not None and norm_before_gate else y
    return y.to(x.dtype)  # a float32 weight promotes: round like the fast paths do


def _check_low_precision(backend, inputs, **kw):
    """Output and grads within 2x of PyTorch's own low-precision error, against the float32 reference."""
    names = _grad_names(inputs)
    upstream = [torch.randn(inputs["x"].shape, device=inputs["x"].device).to(inputs["x"].dtype)]
    inputs_32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    (ref,), ref_grads = run_with_grads(_op("reference", **kw), inputs_32, upstream, names)
    (nat,), nat_grads = run_with_grads(lambda **a: _native_norm(**a, **kw), inputs, upstream, names)
    (out,), grads = run_with_grads(_op(backend, **kw), inputs, upstream, names)
    assert out.dtype == inputs["x"].dtype
    assert_close(out, ref, name="y", rel=0.0, atol=low_precision_tolerance(nat, ref))
    for name in names:
        assert grads[name].dtype == inputs[name].dtype
        assert_close(grads[name], ref_grads[name], name=f"d{name}", rel=0.0,
                     atol=low_precision_tolerance(nat_grads[name], ref_grads[name]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    pytest.param(dict(gated=False), id="plain"),
    pytest.param(dict(gated=True, group_size=16), id="gated-groups"),
    pytest.param(dict(gated=True, norm_before_gate=True), id="norm-then-gate"),
])
def test_norm_bf16_within_twice_pytorch_error(backend, case):
    case = dict(case)
    inputs = _inputs((4, 10, 64), case.pop("gated"), dtype=torch.bfloat16)
    _check_low_precision(backend, inputs, **case)


def _bad(**changes):
    args = dict(x=torch.randn(2, 5, 8), weight=torch.randn(8), z=torch.randn(2, 5, 8), group_size=4)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, match", [
    pytest.param(_bad(x=torch.tensor(1.0)), "x must be a tensor of shape", id="x-0d"),
    pytest.param(_bad(weight=torch.randn(7)), "weight must have shape", id="weight-size"),
    pytest.param(_bad(weight=torch.randn(8, 1)), "weight must be 1-D", id="weight-rank"),
    pytest.param(_bad(z=torch.randn(2, 4, 8)), "z must have shape", id="z-shape"),
    pytest.param(_bad(z=torch.randn(10, 8)), "z must be 3-D", id="z-rank"),
    pytest.param(_bad(group_size=3), "group_size must be a positive int dividing", id="group-not-dividing"),
    pytest.param(_bad(group_size=0), "group_size must be a positive int dividing", id="group-zero"),
    pytest.param(_bad(group_size=4.0), "group_size must be a positive int dividing", id="group-float"),
    pytest.param(_bad(x=torch.randint(0, 5, (2, 5, 8))), "x must have dtype", id="x-int-dtype"),
    pytest.param(_bad(eps=-1.0), "eps must be >= 0", id="negative-eps"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_rejects_bad_input(args, match, backend):
    with pytest.raises(ValueError, match=match):
        rms_norm(**args, backend=backend)


# ---------------------------------------------------------------------------------------------------
# real shapes on the GPU: Triton bf16 against the torch path in float32
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    pytest.param(dict(gated=False, group_size=None), id="plain"),
    pytest.param(dict(gated=True, group_size=512), id="gated-group512"),
    pytest.param(dict(gated=True, group_size=4096), id="gated-group4096"),
    pytest.param(dict(gated=True, group_size=512, norm_before_gate=True), id="norm-then-gate-group512"),
])
def test_norm_gpu_real_shape_bf16(case):
    case = dict(case)
    bf16 = torch.bfloat16
    shape = (2, 8192, 4096)
    inputs = dict(x=torch.randn(shape, device="cuda", dtype=bf16),
                  weight=(1.0 + 0.5 * torch.randn(shape[-1], device="cuda")),  # float32 weight, as in training
                  z=torch.randn(shape, device="cuda", dtype=bf16) if case.pop("gated") else None)
    names = _grad_names(inputs)
    upstream = [torch.randn(shape, device="cuda", dtype=bf16)]
    inputs_32 = {k: (v.float() if v is not None else None) for k, v in inputs.items()}
    (ref,), ref_grads = run_with_grads(_op("torch", **case), inputs_32, upstream, names)
    (nat,), nat_grads = run_with_grads(lambda **a: _native_norm(**a, **case), inputs, upstream, names)
    (out,), grads = run_with_grads(_op("triton", **case), inputs, upstream, names)
    assert_close(out, ref, name="y", rel=0.0, atol=low_precision_tolerance(nat, ref))
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"d{name}", rel=0.0,
                     atol=low_precision_tolerance(nat_grads[name], ref_grads[name]))


# ---- add_rms_norm: the fused residual add + norm of every block --------------------------------------------

ADD_CASES = [
    # x dtype, residual dtype (None: no residual), weight dtype, residual_dtype
    pytest.param(torch.float32, torch.float32, torch.float32, None, id="fp32"),
    pytest.param(torch.float32, None, torch.float32, torch.float32, id="fp32-first-block"),
    pytest.param(torch.float64, torch.float64, torch.float64, None, id="fp64"),
    pytest.param(torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, id="bf16-residual-fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, None, id="bf16-residual-bf16"),
    pytest.param(torch.bfloat16, None, torch.bfloat16, torch.float32, id="bf16-first-block"),
]


def _unfused(x, residual, weight, eps, residual_dtype):
    """What Block computed before the fused op: add, cast to the weight's dtype, rms_norm, cast."""
    s = x if residual is None else x + residual
    y = rms_norm(s.to(weight.dtype), weight, eps=eps, backend="reference")
    return y, s if residual_dtype is None else s.to(residual_dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_dtype, r_dtype, w_dtype, residual_dtype", ADD_CASES)
def test_add_rms_norm_equals_the_unfused_steps(backend, x_dtype, r_dtype, w_dtype, residual_dtype):
    from mambakit.ops import add_rms_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=gen).to(device=DEVICE, dtype=x_dtype)
    residual = None if r_dtype is None else (3 * torch.randn(3, 5, 48, generator=gen)).to(device=DEVICE, dtype=r_dtype)
    weight = (1 + 0.5 * torch.randn(48, generator=gen)).to(device=DEVICE, dtype=w_dtype)
    y, s = add_rms_norm(x, residual, weight, eps=1e-5, residual_dtype=residual_dtype, backend=backend)
    y_ref, s_ref = _unfused(x, residual, weight, 1e-5, residual_dtype)
    assert y.dtype == w_dtype and s.dtype == s_ref.dtype and y.shape == s.shape == x.shape
    # the sum is exact in every case; y differs by float32 rounding of the statistics, or by one bf16
    # ulp where Triton's CPU interpreter truncates a float32 -> bf16 cast that torch rounds
    low = torch.bfloat16 in (x_dtype, w_dtype)
    interp_low = low and backend == "triton" and DEVICE == "cpu"
    assert_close(s, s_ref, name="residual", rel=2**-7 if interp_low else 1e-12)
    assert_close(y, y_ref, name="y", rel=2**-6 if interp_low else 2**-7 if low
                 else (1e-12 if x_dtype == torch.float64 else 1e-6))


def _add_norm_grads(backend, x, residual, weight, residual_dtype, out_dtype, gy, gs):
    """y, s and the gradients of (x, residual, weight) for the loss <y, gy> + <s, gs> (gy / gs None: that output
    gets no gradient)."""
    x, residual, weight = (None if t is None else t.detach().clone().requires_grad_(True) for t in (x, residual, weight))
    from mambakit.ops import add_rms_norm

    y, s = add_rms_norm(x, residual, weight, eps=1e-5, residual_dtype=residual_dtype, out_dtype=out_dtype,
                        backend=backend)
    loss = sum((out.double() * g).sum() for out, g in ((y, gy), (s, gs)) if g is not None)
    loss.backward()
    leaves = {"dx": x, "dweight": weight, **({"dresidual": residual} if residual is not None else {})}
    # an input the loss does not reach (the weight when only s gets a gradient) counts as a zero gradient
    return y, s, {name: t.grad if t.grad is not None else torch.zeros_like(t) for name, t in leaves.items()}


@pytest.mark.parametrize("outputs", ["both", "y-only", "s-only"])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["y-weight-dtype", "y-bf16"])
@pytest.mark.parametrize("x_dtype, r_dtype, w_dtype, residual_dtype", ADD_CASES)
def test_add_rms_norm_triton_backward_equals_the_torch_path(x_dtype, r_dtype, w_dtype, residual_dtype, out_dtype,
                                                            outputs):
    """The Triton backward (one kernel: dx, dresidual and the weight's partial sums) against autograd through the
    torch path, for every dtype mix a block meets, y written in the weight's dtype or in bf16 (what Block asks for
    under autocast), and with y or s getting no gradient (the final norm's s; a block whose residual is unused)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=gen).to(device=DEVICE, dtype=x_dtype)
    residual = None if r_dtype is None else (3 * torch.randn(3, 5, 48, generator=gen)).to(device=DEVICE, dtype=r_dtype)
    weight = (1 + 0.5 * torch.randn(48, generator=gen)).to(device=DEVICE, dtype=w_dtype)
    gy = None if outputs == "s-only" else torch.randn(3, 5, 48, generator=gen, dtype=F64).to(DEVICE)
    gs = None if outputs == "y-only" else torch.randn(3, 5, 48, generator=gen, dtype=F64).to(DEVICE)
    y, s, grads = _add_norm_grads("triton", x, residual, weight, residual_dtype, out_dtype, gy, gs)
    y_ref, s_ref, ref = _add_norm_grads("torch", x, residual, weight, residual_dtype, out_dtype, gy, gs)
    assert y.dtype == (out_dtype or w_dtype) == y_ref.dtype and s.dtype == s_ref.dtype
    assert grads.keys() == ref.keys()
    assert_close(s, s_ref, name="s", rel=2**-7 if torch.bfloat16 in (x_dtype, w_dtype) else 1e-12)
    low = torch.bfloat16 in (x_dtype, r_dtype, w_dtype, out_dtype)
    for name, g in grads.items():
        assert g is not None and g.dtype == ref[name].dtype, name
        # float64: the same math; float32: rounding of the statistics; bf16 (inputs, weight or y): one bf16 ulp
        # of an input or of the gradient through the cast to bf16 (the interpreter truncates where CUDA rounds)
        rel = 2**-6 if low else (1e-12 if x_dtype == torch.float64 else 1e-5)
        assert_close(g, ref[name], name=name, rel=rel)


def test_add_rms_norm_triton_backward_keeps_no_copy_of_y():
    """What the backward keeps: s (the residual the next block holds anyway) and one rstd per row, never y."""
    from mambakit.ops import add_rms_norm

    x = torch.randn(4, 64, dtype=torch.float32, device=DEVICE, requires_grad=True)
    residual = torch.randn(4, 64, dtype=torch.float32, device=DEVICE, requires_grad=True)
    weight = torch.ones(64, device=DEVICE, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y, s = add_rms_norm(x, residual, weight, residual_dtype=torch.float32, out_dtype=torch.bfloat16,
                            backend="triton")
    shapes = sorted(tuple(t.shape) for t in kept)
    assert shapes == [(4,), (4, 64), (64,)], shapes
    assert any(t.data_ptr() == s.data_ptr() for t in kept), "the backward should keep s itself, not a copy"
    assert not any(t.data_ptr() == y.data_ptr() for t in kept)


def test_add_rms_norm_rejects_bad_input():
    from mambakit.ops import add_rms_norm

    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"add_rms_norm: residual must have shape \(d0=2, hidden=8\)"):
        add_rms_norm(x, torch.randn(2, 7), w)
    with pytest.raises(ValueError, match=r"add_rms_norm: weight must have shape \(hidden=8\)"):
        add_rms_norm(x, None, torch.ones(7))
    with pytest.raises(ValueError, match="add_rms_norm: eps must be >= 0"):
        add_rms_norm(x, None, w, eps=-1.0)
    with pytest.raises(ValueError, match="add_rms_norm: residual_dtype must be a floating dtype"):
        add_rms_norm(x, None, w, residual_dtype=torch.int32)
    with pytest.raises(ValueError, match="add_rms_norm: backend 'reference' is not implemented"):
        add_rms_norm(x, None, w, backend="reference")
    with pytest.raises(ValueError, match="add_rms_norm: out_dtype must be a floating dtype"):
        add_rms_norm(x, None, w, out_dtype=torch.int64)


def test_rms_norm_bwd_writes_dz_into_a_strided_slice():
    """`dz_out` (Mamba-2's slice of in_proj's gradient, rows wider than the norm): the same dz as a new tensor,
    nothing written outside the slice; a slice of the wrong shape or dtype is refused."""
    from mambakit.ops.rms_norm.triton_norm import rms_norm_bwd, rms_norm_fwd

    gen = torch.Generator().manual_seed(0)
    x2, z2, dy2 = (torch.randn(6, 32, generator=gen, dtype=F64).to(DEVICE) for _ in range(3))
    weight = (1 + 0.5 * torch.randn(32, generator=gen, dtype=F64)).to(DEVICE)
    _, rstd = rms_norm_fwd(x2=x2, weight=weight, z2=z2, eps=1e-5, group=16, norm_before_gate=False)
    dx, dw, dz = rms_norm_bwd(x2=x2, weight=weight, z2=z2, rstd=rstd, dy2=dy2, group=16, norm_before_gate=False)
    wide = torch.full((6, 50), 7.0, dtype=F64, device=DEVICE)
    dx2, dw2, dz2 = rms_norm_bwd(x2=x2, weight=weight, z2=z2, rstd=rstd, dy2=dy2, group=16, norm_before_gate=False,
                                 dz_out=wide[:, 5:37])
    assert dz2.data_ptr() == wide[:, 5:37].data_ptr()
    assert torch.equal(dz2, dz) and torch.equal(dx2, dx) and torch.equal(dw2, dw)
    assert (wide[:, :5] == 7).all() and (wide[:, 37:] == 7).all()
    with pytest.raises(ValueError, match="dz_out must be"):
        rms_norm_bwd(x2=x2, weight=weight, z2=z2, rstd=rstd, dy2=dy2, group=16, norm_before_gate=False,
                     dz_out=wide[:, :31])
