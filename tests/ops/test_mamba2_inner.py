"""`mamba2_inner` (conv -> SSD -> gated norm -> out_proj as one op) against its composition of reference ops.

Shapes (legend): b batch, L seqlen, M d_model, S d_ssm = H P, H nheads, P headdim, G ngroups, N d_state,
K = S + 2 G N conv channels, E = 2 S + 2 G N + H in_proj width, W d_conv.

The Triton backend is one autograd node that keeps in_proj's output and the SSD output and recomputes
the conv, the cheap SSD launches and the norm output in its backward. On CPU it runs through Triton's
interpreter (tests/conftest.py), so the shapes are tiny: 2 x 40 tokens in chunks of 16 (two full chunks
and a ragged tail), 4 heads of 8 channels, d_state 8. It runs in float32 (the Triton SSD's widest dtype)
and is held to DESIGN.md's 1e-4 of the float64 reference composition's scale, output and every gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.modules import Mamba2
from mambakit.ops import use_backend
from mambakit.ops import GatedNormSpec, mamba2_inner
from tests.conftest import DEVICE
from tests.helpers import assert_close, low_precision_tolerance, run_with_grads, saved_bytes

GRADS = ["zxbcdt", "conv_weight", "conv_bias", "dt_bias", "A", "D", "norm_weight", "out_proj_weight", "out_proj_bias"]


def make_inputs(b=2, L=40, H=4, P=8, G=1, N=8, M=16, W=4, *, conv_bias=True, D="head", norm=True, out_bias=True,
                seq=False, dtype=torch.float32, device=DEVICE):
    """Random layer inputs; dt + dt_bias mostly in [-2.5, 0] so dt' = softplus(.) ~ 0.1 .. 0.7 (chunks decay,
    states do not vanish). Returns (tensors, options)."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    S, K = H * P, H * P + 2 * G * N
    zxbcdt = rnd(b, L, 2 * S + 2 * G * N + H)
    zxbcdt[..., S + K:] *= 0.5  # dt
    inp = {
        "zxbcdt": zxbcdt.to(dtype),
        "conv_weight": rnd(K, W, scale=0.5).to(dtype),
        "conv_bias": rnd(K, scale=0.1).to(dtype) if conv_bias else None,
        "dt_bias": (rnd(H, scale=0.3) - 1.0).float(),
        "A": -(torch.rand(H, generator=gen, dtype=torch.float64) * 1.5 + 0.1).float().to(device),
        "D": (rnd(H) if D == "head" else rnd(H, P)).float() if D else None,
        "norm_weight": (1.0 + rnd(S, scale=0.2)).to(dtype) if norm else None,
        "out_proj_weight": rnd(M, S, scale=S ** -0.5).to(dtype),
        "out_proj_bias": rnd(M, scale=0.1).to(dtype) if out_bias else None,
    }
    opts = dict(headdim=P, ngroups=G, d_state=N, chunk_size=16)
    if seq:
        s = torch.zeros(b, L, dtype=torch.int32)
        s[0, 16:] = 1  # a document starting at a chunk boundary ...
        s[0, 17:] = 2  # ... one token long
        s[0, 30:] = 3  # a boundary inside a chunk
        s[1, 5:] = 1
        opts["seq_idx"] = s.to(device)
    return inp, opts


def _call(norm_weight=None, norm=None, **kw):
    """mamba2_inner with the norm weight (a leaf the gradients are taken of) and the norm's other settings
    (`norm`: a dict of GatedNormSpec fields) bundled into the one GatedNormSpec the op takes."""
    spec = None if norm_weight is None else GatedNormSpec(norm_weight, **(norm or {}))
    return mamba2_inner(norm=spec, **kw)


def _run(inp, opts, backend, upstream):
    """out_proj's output and the gradient of every given float input."""
    names = [k for k in GRADS if inp.get(k) is not None]
    outs, grads = run_with_grads(lambda **kw: _call(**kw, **opts, backend=backend), inp, [upstream], names)
    return outs[0], grads


def _float64(inp):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


# batch 1 except where packed documents need two rows: the interpreter runs every program in turn
CASES = [
    pytest.param(dict(b=1), dict(), id="norm-D-per-head"),
    pytest.param(dict(G=2, D="channel", seq=True), dict(norm=dict(group_size=8)),
                 id="ngroups-2-D-per-channel-norm-groups-packed-docs"),
    pytest.param(dict(b=1, norm=False, conv_bias=False, out_bias=False), dict(dt_limit=(0.05, 1.2)),
                 id="no-norm-z-gates-ssd-dt-limit-no-biases"),
    pytest.param(dict(b=1), dict(norm=dict(norm_before_gate=True, group_size=16), dt_limit=(0.0, 0.5)),
                 id="norm-before-gate-norm-groups-dt-limit"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape, extra", CASES)
def test_mamba2_inner_triton_float32_matches_reference(shape, extra):
    inp, opts = make_inputs(**shape)
    opts.update(extra)
    upstream = torch.randn(inp["zxbcdt"].shape[:2] + (inp["out_proj_weight"].shape[0],), device=DEVICE)
    out, grads = _run(inp, opts, "triton", upstream)
    ref_out, ref_grads = _run(_float64(inp), opts, "reference", upstream.double())
    assert_close(out, ref_out, name="out")
    assert set(grads) == {k for k in GRADS if inp.get(k) is not None}
    for k in grads:
        assert_close(grads[k], ref_grads[k], name=f"d{k}")


def _module_pair(**kw):
    """A Mamba2 layer (d_model 16, 4 heads x 8, d_state 8) and its grads; `fused` set by the caller."""
    torch.manual_seed(0)
    layer = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=16, **kw).to(DEVICE)
    with torch.no_grad():  # away from the initial values (norm weight 1, D 1) so that every term shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def _module_run(layer, u, seq_idx, upstream):
    out, saved = saved_bytes(lambda: layer(u, seq_idx=seq_idx))
    grads = torch.autograd.grad(out, [u, *layer.parameters()], upstream)
    return out.detach(), grads, saved


@pytest.mark.slow
def test_module_fused_equals_unfused_on_triton_and_keeps_less():
    """Mamba2.fused = True (one autograd node) against the ops one by one, both on the Triton backend:
    same output, same gradient of the input and of every parameter, and fewer bytes kept for the
    backward: in_proj's output and y instead of those plus the conv output, the SSD's intermediates
    and the norm output."""
    layer = _module_pair(ngroups=2)
    u = torch.randn(1, 40, 16, device=DEVICE, requires_grad=True)
    seq_idx = torch.tensor([[0] * 15 + [1] * 25], dtype=torch.int32, device=DEVICE)
    upstream = torch.randn(1, 40, 16, device=DEVICE)
    results = {}
    with use_backend("triton"):
        for fused in (True, False):
            layer.fused = fused
            results[fused] = _module_run(layer, u, seq_idx, upstream)
    (out, grads, saved), (ref_out, ref_grads, ref_saved) = results[True], results[False]
    assert_close(out, ref_out, name="out")
    names = ["u"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(g, r, name=f"d{name}")
    # what the fused node may keep: in_proj's input and output, y (b, L, S), and the parameters (twice:
    # the float32 copies of A, D, dt_bias the module makes count too)
    b, L, E, S = 1, 40, layer.in_proj.out_features, layer.d_ssm
    params = sum(p.numel() for p in layer.parameters())
    bound = 4 * (b * L * 16 + b * L * E + b * L * S + 2 * params) + seq_idx.numel() * 4
    assert saved <= bound, (saved, bound)
    assert saved < 0.6 * ref_saved, (saved, ref_saved)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(), id="norm"),
    pytest.param(dict(rmsnorm=False, D_has_hdim=True), id="no-norm-D-per-channel"),
    pytest.param(dict(d_ssm=16), id="mlp-half-keeps-the-composed-path"),
])
def test_module_fused_flag_changes_nothing_on_the_torch_path(kw):
    """On CPU (the torch backend) the fused op is the composition of the same ops: identical numbers, and
    recompute (torch.utils.checkpoint around the mixer) still gives the same gradients."""
    layer = _module_pair(**kw).double()
    u = torch.randn(2, 40, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    upstream = torch.randn(2, 40, 16, dtype=torch.float64, device=DEVICE)
    results = {}
    with use_backend("torch"):
        for fused, recompute in ((False, False), (True, False), (True, True)):
            layer.fused, layer.recompute = fused, recompute
            results[fused, recompute] = _module_run(layer, u, None, upstream)
    ref_out, ref_grads, _ = results[False, False]
    for key in ((True, False), (True, True)):
        out, grads, _ = results[key]
        assert_close(out, ref_out, name=f"out {key}", rel=1e-12)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_close(g, r, name=f"grad {i} {key}", rel=1e-12)


def _bad(device=DEVICE, **change):
    inp, opts = make_inputs(b=1, L=8, device=device)
    inp.update({k: v for k, v in change.items() if k in inp})
    opts.update({k: v for k, v in change.items() if k not in inp})
    return inp, opts


BAD = [
    pytest.param(dict(zxbcdt=torch.randn(1, 8, 83)),
                 r"zxbcdt must be \(batch, seqlen, d_in_proj=84\) = \[z \| x \| B \| C \| dt\]", id="zxbcdt-width"),
    pytest.param(dict(zxbcdt=torch.randn(8, 84)), r"zxbcdt must be 3-D", id="zxbcdt-rank"),
    pytest.param(dict(conv_weight=torch.randn(32, 4)), r"conv_weight must have shape \(conv_dim=48, width\)",
                 id="conv-weight-channels"),
    pytest.param(dict(conv_weight=torch.randn(48, 1)), r"width >= 2", id="conv-width-1"),
    pytest.param(dict(conv_bias=torch.randn(32)), r"conv_bias must have shape", id="conv-bias"),
    pytest.param(dict(A=torch.randn(4).half()), r"A must have dtype", id="A-dtype"),
    pytest.param(dict(dt_bias=torch.randn(5)), r"dt_bias must have shape \(nheads=4\)", id="dt-bias"),
    pytest.param(dict(D=torch.randn(4, 7)), r"D must have shape \(nheads=4, headdim=8\)", id="D-per-channel"),
    pytest.param(dict(norm_weight=torch.randn(31)), r"norm.weight must have shape \(d_ssm=32\)", id="norm-weight"),
    pytest.param(dict(out_proj_weight=torch.randn(16, 31)), r"out_proj_weight must have shape", id="out-proj-weight"),
    pytest.param(dict(out_proj_bias=torch.randn(15)), r"out_proj_bias must have shape \(d_model=16\)",
                 id="out-proj-bias"),
    pytest.param(dict(headdim=0), r"headdim must be a positive int", id="headdim-0"),
    pytest.param(dict(ngroups=3, d_state=8), r"ngroups=3 must divide nheads=4", id="ngroups"),
    pytest.param(dict(norm=dict(group_size=5)), r"norm.group_size=5 must divide d_ssm=32", id="norm-group-size"),
    pytest.param(dict(norm=dict(eps=-1.0)), r"GatedNormSpec: eps must be >= 0", id="norm-eps"),
    pytest.param(dict(norm=dict(group_size=0)), r"GatedNormSpec: group_size must be a positive int",
                 id="norm-group-size-0"),
    pytest.param(dict(chunk_size=0), r"chunk_size must be a positive int", id="chunk-size"),
    pytest.param(dict(dt_limit=(1.0, 0.5)), r"dt_limit must be \(low, high\)", id="dt-limit"),
    pytest.param(dict(seq_idx=torch.tensor([[0, 1, 1, 0, 2, 2, 2, 2]], dtype=torch.int32)), r"nondecreasing",
                 id="seq-idx-decreasing"),
    pytest.param(dict(seq_idx=torch.zeros(1, 8)), r"seq_idx must have dtype", id="seq-idx-float"),
    pytest.param(dict(backend="cuda"), r"backend must be None or one of", id="backend-name"),
]


@pytest.mark.parametrize("change, match", BAD)
def test_mamba2_inner_rejects_bad_input(change, match):
    # seq_idx's order is checked on CPU tensors only (on CUDA reading it would sync every layer: checks.py)
    device = "cpu" if match == r"nondecreasing" else DEVICE
    inp, opts = _bad(device, **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        _call(**inp, **opts)


def test_mamba2_inner_rejects_loose_norm_weight():
    """The norm is one GatedNormSpec: a bare weight tensor in its place is refused by name."""
    inp, opts = make_inputs(b=1, L=8)
    inp["norm"] = inp.pop("norm_weight")
    with pytest.raises(ValueError, match=r"mamba2_inner: norm must be a GatedNormSpec or None, got Tensor"):
        mamba2_inner(**inp, **opts)


def test_module_norm_spec_carries_every_setting():
    """RMSNormGated.spec() bundles the module's weight (the parameter itself: gradients reach it) and settings,
    and applying the spec is the module's forward."""
    layer = _module_pair(norm_before_gate=True, ngroups=2).double()
    spec = layer.norm.spec()
    assert spec.weight is layer.norm.weight
    assert (spec.eps, spec.group_size, spec.norm_before_gate, spec.group) == (layer.norm.eps, 16, True, 16)
    y, z = torch.randn(2, 2, 5, 32, dtype=torch.float64, device=DEVICE)
    assert_close(spec(y, z, backend="torch"), layer.norm(y, z), name="spec vs module", rel=1e-12)


def test_mamba2_inner_triton_rejects_float64():
    inp, opts = make_inputs(b=1, L=8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend 'triton' needs zxbcdt of dtype float32"):
        _call(**inp, **opts, backend="triton")


# ---------------------------------------------------------------- GPU (-m gpu)


def _lowp_layer(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, out_proj_bias, *,
                headdim, ngroups, d_state, chunk_size, norm_eps=1e-5):
    """The layer as PyTorch computes it with every tensor in bf16 (ngroups 1, seqlen a multiple of the chunk,
    one norm group): the yardstick of the bf16 test. The SSD is Dao & Gu's Listing 1 evaluated in bf16."""
    from tests.ops.test_ssd_triton import _ssd_listing_lowp

    dtype = zxbcdt.dtype
    b, L, _ = zxbcdt.shape
    H, K = A.shape[0], conv_weight.shape[0]
    S = H * headdim
    z, xBC, dt = zxbcdt[..., :S], zxbcdt[..., S:S + K], zxbcdt[..., S + K:]
    W = conv_weight.shape[1]
    xBC = F.conv1d(xBC.transpose(1, 2), conv_weight[:, None, :].to(dtype), conv_bias.to(dtype), padding=W - 1,
                   groups=K)[..., :L]
    xBC = F.silu(xBC.transpose(1, 2))
    x, B, C = torch.split(xBC, [S, d_state, d_state], dim=-1)
    y, _ = _ssd_listing_lowp(x.unflatten(-1, (H, headdim)), dt, A, B[:, :, None], C[:, :, None], D=D,
                             dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk_size, dtype=dtype)
    h = y.reshape(b, L, S) * F.silu(z)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.to(dtype)
    return F.linear(h, out_proj_weight.to(dtype), out_proj_bias)


@pytest.mark.gpu
def test_gpu_bfloat16_fused_within_twice_torch_bf16_error():
    """d_model 256, 512 tokens, 8 heads x 64, d_state 64, chunk 256, bf16 activations and weights (A, D,
    dt_bias float32, as a model keeps them). Reference: the float32 torch composition on the same values;
    every output and gradient of the fused Triton node within twice PyTorch's own bf16 error."""
    inp, opts = make_inputs(b=2, L=512, H=8, P=64, G=1, N=64, M=256, out_bias=False, dtype=torch.bfloat16,
                            device="cuda")
    opts["chunk_size"] = 256
    upstream = torch.randn(2, 512, 256, device="cuda")
    out, grads = _run(inp, opts, "triton", upstream)
    ref_out, ref_grads = _run({k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()},
                              opts, "torch", upstream)
    names = [k for k in GRADS if inp.get(k) is not None]
    low_outs, low_grads = run_with_grads(lambda **kw: _lowp_layer(**kw, **opts), inp, [upstream], names)
    assert_close(out, ref_out, name="out", rel=0.0, atol=low_precision_tolerance(low_outs[0], ref_out))
    for k in names:
        assert_close(grads[k], ref_grads[k], name=f"d{k}", rel=0.0,
                     atol=low_precision_tolerance(low_grads[k], ref_grads[k]))
