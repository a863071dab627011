"""`mamba1_inner` (conv -> x_proj / dt_proj -> gated scan as one op) against its composition of reference ops.

Shapes (legend): b batch, L seqlen, d d_inner, w d_conv, r dt_rank, n d_state.

The Triton backend is one autograd node that recomputes the conv output and dt in its backward; on
CPU it runs through Triton's interpreter (tests/conftest.py), so the shapes are tiny and the scan's
checkpoint chunk is short (several chunks, a ragged tail). The reference is the same math as the
public ops in a row on the float64 "reference" backend.
"""

from __future__ import annotations

import pytest
import torch

from mambakit.modules import Mamba1
from mambakit.ops import mamba1_inner, use_backend
from mambakit.ops.mamba_inner.mamba1 import mamba1_inner_composed
from mambakit.ops.mamba_inner.triton_mamba1 import mamba1_inner_triton
from mambakit.ops.selective_scan.triton_scan import ScanConfig
from tests.conftest import DEVICE
from tests.helpers import assert_close, low_precision_tolerance, run_with_grads, saved_bytes

GRADS = ["xz", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A", "D"]
SMALL_CHUNK = ScanConfig(checkpoint_interval=8, block_u=2)


def make_inputs(b=2, L=21, d=8, w=4, r=2, n=4, dtype=torch.float32, conv_bias=True, D=True, seq=False,
                device=DEVICE):
    """Random layer inputs; dt + bias mostly in [-3, 0] so softplus(dt) ~ 0.05 .. 0.7 (a stable scan)."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    inp = {
        "xz": rnd(b, L, 2 * d).to(dtype),
        "conv_weight": rnd(d, w, scale=0.5).to(dtype),
        "conv_bias": rnd(d, scale=0.1).to(dtype) if conv_bias else None,
        "x_proj_weight": rnd(r + 2 * n, d, scale=d ** -0.5).to(dtype),
        "dt_proj_weight": rnd(d, r, scale=r ** -0.5).to(dtype),
        "dt_proj_bias": rnd(d, scale=0.3) - 1.5,
        "A": -(torch.rand(d, n, generator=gen, dtype=torch.float64) + 0.5).to(device),
        "D": rnd(d) if D else None,
    }
    extra = {}
    if seq:
        s = torch.zeros(b, L, dtype=torch.int32)
        s[0, L // 3:] += 1
        s[0, 2 * L // 3:] += 1
        s[1, 8:] += 1  # a document starting exactly at a checkpoint chunk (chunk 8)
        extra["seq_idx"] = s.to(device)
    return inp, extra


def _reference(inp, extra):
    """The composition on the float64 reference backend: outputs and named gradients."""
    inp64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    names = [k for k in GRADS if inp64.get(k) is not None]
    up = torch.randn(inp64["xz"].shape[:2] + (inp64["conv_weight"].shape[0],), generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to(inp64["xz"].device)
    (y,), grads = run_with_grads(lambda **kw: mamba1_inner(**kw, **extra, backend="reference"), inp64, [up], names)
    return y, grads, up, names


@pytest.mark.slow
@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"seq": True}, id="seq_idx"),
    pytest.param({"conv_bias": False, "D": False, "L": 13}, id="no-bias-no-D-ragged"),
    pytest.param({"n": 16, "r": 1, "w": 2}, id="dstate16-rank1-width2"),
])
def test_triton_matches_reference_composition(opts):
    """Output and every gradient (xz, conv weight / bias, x_proj, dt_proj weight / bias, A, D) of the fused
    Triton node in float32 against the float64 composition of reference ops."""
    seq = opts.pop("seq", False)
    inp, extra = make_inputs(seq=seq, **opts)
    y_ref, g_ref, up, names = _reference(inp, extra)
    fn = lambda **kw: mamba1_inner_triton(**kw, seq_idx=extra.get("seq_idx"), config=SMALL_CHUNK)  # noqa: E731
    (y,), grads = run_with_grads(fn, inp, [up.float()], names)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, name="y", rel=2e-5)
    for k in names:
        assert_close(grads[k], g_ref[k], name=f"d{k}", rel=1e-4)


def test_triton_with_the_chunked_backward_by_default(monkeypatch):
    """The fused node called without a config takes `scan_policy.DEFAULT_CONFIG` (how `gpu_train.py --scan-variant`
    A/Bs a backward variant in whole models): with the chunked backward there, dz lands in the z half of d xz from
    that kernel, and output and every gradient still match the float64 composition (documents, a ragged tail)."""
    from mambakit.ops.selective_scan import scan_policy

    monkeypatch.setattr(scan_policy, "DEFAULT_CONFIG", scan_policy.bwd_variant_config("chunked", checkpoint_interval=8, block_u=4))
    inp, extra = make_inputs(seq=True, L=19)
    y_ref, g_ref, up, names = _reference(inp, extra)
    (y,), grads = run_with_grads(lambda **kw: mamba1_inner_triton(**kw, seq_idx=extra["seq_idx"]), inp, [up.float()],
                                 names)
    assert_close(y, y_ref, name="y", rel=2e-5)
    for k in names:
        assert_close(grads[k], g_ref[k], name=f"d{k}", rel=1e-4)


def test_torch_backend_matches_reference():
    """The CPU path (the composition on the torch backend) agrees with the reference in float64."""
    inp, extra = make_inputs(seq=True)
    inp = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    y_ref, g_ref, up, names = _reference(inp, extra)
    (y,), grads = run_with_grads(lambda **kw: mamba1_inner(**kw, **extra, backend="torch"), inp, [up], names)
    assert_close(y, y_ref, name="y", rel=1e-10)
    for k in names:
        assert_close(grads[k], g_ref[k], name=f"d{k}", rel=1e-9)


@pytest.mark.slow
def test_triton_keeps_less_memory_than_the_separate_ops():
    """The fused node keeps xz, x_dbl, the scan checkpoints and the parameters; the separate ops keep the
    conv output and dt as well (distinct storages: xz 2d, xc d, dt d, x_dbl r + 2n per token), so at
    d 32, r 2, n 4 and the default checkpoint chunk: 1.8x the fused node's bytes."""
    inp, _ = make_inputs(L=128, d=32, n=4, r=2)
    leaves = {k: (v.detach().requires_grad_(k in GRADS) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    fused = saved_bytes(lambda: mamba1_inner_triton(**leaves, seq_idx=None), distinct_storages=True)[1]
    separate = saved_bytes(lambda: mamba1_inner_composed(**leaves, seq_idx=None, backend="triton"),
                           distinct_storages=True)[1]
    activations = 2 * 128 * (2 * 32 + 10) * 4  # xz and x_dbl in float32
    assert activations < fused < activations * 1.1, (fused, activations)
    assert separate >= 1.75 * fused, (separate, fused)


@pytest.mark.slow
def test_module_fused_equals_separate_ops_on_triton():
    """Mamba1 with fused = True / False on the Triton backend: the same output, input and parameter gradients."""
    torch.manual_seed(0)
    layer = Mamba1(d_model=8, d_state=4, dt_rank=2).to(DEVICE)
    x = torch.randn(2, 19, 8, device=DEVICE)
    up = torch.randn(2, 19, 8, device=DEVICE)
    seq_idx = torch.zeros(2, 19, dtype=torch.int32, device=DEVICE)
    seq_idx[1, 7:] = 1
    results = {}
    with use_backend("triton"):
        for fused in (True, False):
            layer.fused = fused
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = layer(xi, seq_idx=seq_idx)
            y.backward(up)
            results[fused] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
    (y1, dx1, g1), (y0, dx0, g0) = results[True], results[False]
    assert_close(y1, y0, name="y", rel=1e-6)
    assert_close(dx1, dx0, name="dx", rel=1e-5)
    assert set(g1) == set(g0) and len(g1) == 9
    for n in g0:
        assert_close(g1[n], g0[n], name=f"d{n}", rel=1e-5)


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda inp: inp.update(xz=inp["xz"][..., :-1]), "xz must have shape", id="xz-width"),
    pytest.param(lambda inp: inp.update(x_proj_weight=inp["x_proj_weight"][:-1]), "x_proj_weight must have shape",
                 id="x_proj-rows"),
    pytest.param(lambda inp: inp.update(A=inp["A"].half()), "A must have dtype", id="A-dtype"),
    pytest.param(lambda inp: inp.update(conv_weight=inp["conv_weight"][:, :1]), "width >= 2", id="conv-width-1"),
    pytest.param(lambda inp: inp.update(D=inp["D"][:-1]), "D must have shape", id="D-shape"),
])
def test_invalid_inputs_are_rejected(change, message):
    inp, _ = make_inputs()
    change(inp)
    with pytest.raises(ValueError, match=message):
        mamba1_inner(**inp)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_gpu_bf16_layer_fused_within_twice_torch_bf16_error():
    """Mamba1 layer (d_model 256, seqlen 1024, bf16) with the fused Triton node: output and every gradient
    within 2x the error of the PyTorch path in bf16, both against the PyTorch path in float32."""
    torch.manual_seed(0)
    layer = Mamba1(d_model=256).to(DEVICE)
    x = torch.randn(2, 1024, 256, device=DEVICE)
    up = torch.randn(2, 1024, 256, device=DEVICE)

    def run(dtype, backend):
        model = layer.to(dtype)
        model.zero_grad()
        xi = x.to(dtype).detach().requires_grad_(True)  # x.to(float32) is x itself: keep x a plain input
        with use_backend(backend):
            y = model(xi)
        y.backward(up.to(dtype))
        return [y.float(), xi.grad.float()] + [p.grad.float() for p in model.parameters()]

    ref = run(torch.float32, "torch")
    lowp = run(torch.bfloat16, "torch")
    fused = run(torch.bfloat16, "triton")
    names = ["y", "dx"] + [n for n, _ in layer.named_parameters()]
    for name, r, l, f in zip(names, ref, lowp, fused):
        assert_close(f, r, name=name, rel=0.0, atol=low_precision_tolerance(l, r))
