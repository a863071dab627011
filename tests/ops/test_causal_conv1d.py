"""causal_conv1d and causal_conv1d_update: the torch and triton paths against the float64 reference.

On CPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which handles float64, so shapes stay tiny and comparisons are in float64. Tests marked `gpu`
compare the kernels at real shapes on CUDA (the lead runs them on the GPU machine).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import causal_conv1d, causal_conv1d_update
from mambakit.ops.causal_conv1d.reference import causal_conv1d_reference
from tests.helpers import assert_close, low_precision_tolerance, run_with_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def _seq_idx(doc_lengths: list[list[int]], dtype=torch.int32) -> torch.Tensor:
    """(batch, seqlen) integers from each row's document lengths, e.g. [[3, 5], [8]]."""
    rows = [torch.cat([torch.full((n,), i, dtype=dtype) for i, n in enumerate(row)]) for row in doc_lengths]
    return torch.stack(rows).to(DEVICE)


def _inputs(batch=2, seqlen=37, dim=12, width=4, bias=True, init=False, docs=None, dtype=F64, seq_dtype=torch.int32):
    """Random inputs of the op on DEVICE."""
    return dict(
        x=torch.randn(batch, seqlen, dim, dtype=dtype, device=DEVICE),
        weight=torch.randn(dim, width, dtype=dtype, device=DEVICE) / width**0.5,
        bias=torch.randn(dim, dtype=dtype, device=DEVICE) if bias else None,
        initial_state=torch.randn(batch, dim, width - 1, dtype=dtype, device=DEVICE) if init else None,
        seq_idx=_seq_idx(docs, seq_dtype) if docs is not None else None,
    )


def _grad_names(inputs):
    return [k for k in ("x", "weight", "bias", "initial_state") if inputs[k] is not None]


def _upstream(inputs, dtype=F64):
    """Random upstream gradients for y and the final state (representable in `dtype`)."""
    batch, seqlen, dim = inputs["x"].shape
    width = inputs["weight"].shape[1]
    return [torch.randn(batch, seqlen, dim, device=DEVICE).to(dtype),
            torch.randn(batch, dim, width - 1, device=DEVICE).to(dtype)]


def _op(backend, activation, return_final_state=True, x_view=None):
    """The op as a function of its tensors; x_view(x) is what reaches the op (a strided slice, say)."""
    def op(x, **kw):
        return causal_conv1d(x if x_view is None else x_view(x), **kw, activation=activation,
                             return_final_state=return_final_state, backend=backend)
    return op


def _check_against_reference(outs, grads, ref_outs, ref_grads, rel):
    for name, out, ref in zip(("y", "final_state"), outs, ref_outs):
        assert_close(out, ref, name=name, rel=rel)
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, name=f"d{name}", rel=rel)


CASES = [
    pytest.param(dict(width=2, activation=None, bias=False), id="w2-plain"),
    pytest.param(dict(width=3, activation="silu", bias=True), id="w3-silu-bias"),
    pytest.param(dict(width=4, activation="silu", bias=True, init=True), id="w4-silu-bias-init"),
    pytest.param(dict(width=4, activation=None, bias=True, init=True, seqlen=1), id="w4-seqlen1-init"),
    pytest.param(dict(width=4, activation="silu", bias=False, init=True, seqlen=2), id="w4-seqlen2-inside-window"),
    pytest.param(dict(width=4, activation="swish", bias=True, init=True, seqlen=40, dim=40,
                      docs=[[3, 1, 2, 30, 4], [40]]), id="w4-silu-packed-docs-init"),
    pytest.param(dict(width=3, activation=None, bias=True, init=True, seqlen=33, dim=20,
                      docs=[[1, 32], [30, 2, 1]], seq_dtype=torch.int64), id="w3-docs-at-both-ends-init-int64"),
    pytest.param(dict(width=4, activation="silu", bias=True, seqlen=39, dim=40), id="w4-ragged-tails"),
    pytest.param(dict(width=4, activation="silu", bias=True, init=True, seqlen=24, dim=16, strided_x=True),
                 id="w4-strided-x-channel-slice"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_conv_matches_reference(backend, case):
    case = dict(case)
    activation = case.pop("activation")
    strided_x = case.pop("strided_x", False)
    inputs = _inputs(**case)
    upstream = _upstream(inputs)
    names = _grad_names(inputs)
    x_view = None
    if strided_x:
        # x as a channel slice of a wider tensor (Mamba-2's xBC inside in_proj's output), sliced inside
        # the op so that the strides reach the kernels (run_with_grads' leaf copies are contiguous)
        batch, seqlen, dim = inputs["x"].shape
        inputs["x"] = torch.randn(batch, seqlen, dim + 24, dtype=F64, device=DEVICE)
        x_view = lambda x: x[:, :, 8 : 8 + dim]  # noqa: E731
    ref_outs, ref_grads = run_with_grads(_op("reference", activation, x_view=x_view), inputs, upstream, names)
    outs, grads = run_with_grads(_op(backend, activation, x_view=x_view), inputs, upstream, names)
    _check_against_reference(outs, grads, ref_outs, ref_grads, rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_without_final_state(backend):
    inputs = _inputs(width=4, init=True, docs=[[20, 17], [37]])
    upstream = _upstream(inputs)[:1]
    names = _grad_names(inputs)
    ref_outs, ref_grads = run_with_grads(_op("reference", "silu", False), inputs, upstream, names)
    outs, grads = run_with_grads(_op(backend, "silu", False), inputs, upstream, names)
    assert len(outs) == 1
    _check_against_reference(outs, grads, ref_outs, ref_grads, rel=1e-10)


TILINGS = [
    pytest.param(dict(width=4, activation="silu", docs=[[5, 9, 3], [17]]), id="w4-silu-docs"),
    pytest.param(dict(width=2, activation=None, docs=None), id="w2-plain"),
]


@pytest.mark.slow
@pytest.mark.parametrize("tiling", TILINGS)
def test_triton_launchers_with_small_tiles(tiling):
    """Many small tiles: 3 forward tiles (the final state comes from the last), a ragged channel
    tile, and backward programs looping over 4 tiles of 4 rows with a partly empty last chunk."""
    from mambakit.ops.causal_conv1d.triton_conv import causal_conv1d_bwd, causal_conv1d_fwd, channel_contiguous

    silu = tiling["activation"] is not None
    inputs = _inputs(seqlen=17, dim=24, width=tiling["width"], init=True, docs=tiling["docs"])
    upstream = _upstream(inputs)
    names = _grad_names(inputs)
    ref_outs, ref_grads = run_with_grads(_op("reference", tiling["activation"]), inputs, upstream, names)
    x, weight, bias, seq_idx = inputs["x"], inputs["weight"], inputs["bias"], inputs["seq_idx"]
    init = channel_contiguous(inputs["initial_state"])
    y, final = causal_conv1d_fwd(x=x, weight=weight, bias=bias, initial_state=init, seq_idx=seq_idx, silu=silu,
                                 return_final_state=True, block_l=8, block_d=16, num_warps=2)
    dx, dw, db, dinit = causal_conv1d_bwd(x=x, weight=weight, bias=bias, initial_state=init, seq_idx=seq_idx, silu=silu,
                                          dy=upstream[0], dfinal=channel_contiguous(upstream[1]), need_dinit=True,
                                          block_l=4, block_d=16, num_warps=2, tiles=4)
    grads = dict(x=dx, weight=dw, bias=db, initial_state=dinit)
    _check_against_reference([y, final], grads, ref_outs, ref_grads, rel=1e-10)


UPDATE_CASES = [
    pytest.param(dict(width=2, activation=None, bias=False, strided_state=False), id="w2-plain"),
    pytest.param(dict(width=3, activation="silu", bias=True, strided_state=False), id="w3-silu-bias"),
    pytest.param(dict(width=4, activation="silu", bias=True, strided_state=True), id="w4-silu-bias-strided-state"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UPDATE_CASES)
def test_update_token_by_token_equals_parallel(backend, case):
    width = case["width"]
    inputs = _inputs(seqlen=9, width=width, bias=case["bias"], init=True)
    y_par, final_par = causal_conv1d(**inputs, activation=case["activation"], return_final_state=True,
                                     backend="reference")
    batch, seqlen, dim = inputs["x"].shape
    if case["strided_state"]:
        # a window inside a bigger cache buffer, as a generation cache may hold it
        cache = torch.zeros(batch, dim, width + 2, dtype=F64, device=DEVICE)
        state = cache[:, :, 1:width]
    else:
        state = torch.empty(batch, dim, width - 1, dtype=F64, device=DEVICE)
    state.copy_(inputs["initial_state"])
    ys = [causal_conv1d_update(state, inputs["x"][:, t], inputs["weight"], inputs["bias"], case["activation"],
                               backend=backend) for t in range(seqlen)]
    assert_close(torch.stack(ys, dim=1), y_par, name="y", rel=1e-10)
    assert_close(state, final_par, name="state", rel=1e-10)
    if case["strided_state"]:
        assert (cache[:, :, 0] == 0).all() and (cache[:, :, width:] == 0).all(), "wrote outside the window"


def _native_conv(x, weight, bias=None, activation=None, initial_state=None, seq_idx=None):
    """The conv written with PyTorch ops in the inputs' own dtype (each multiply-add rounds): the
    yardstick for low-precision error. Returns y and the final window."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    pad = initial_state.transpose(1, 2) if initial_state is not None else x.new_zeros(batch, width - 1, dim)
    xpad = torch.cat([pad, x], dim=1)  # (B, L + W - 1, D)
    seq_pad = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)
    y = xpad[:, width - 1 :] * weight[:, -1]
    for k in range(width - 1):
        tap = xpad[:, k : k + seqlen]
        if seq_pad is not None:
            tap = tap * (seq_pad[:, k : k + seqlen] == seq_idx)[:, :, None].to(x.dtype)
        y = y + tap * weight[:, k]
    y = y + bias if bias is not None else y
    final = xpad[:, seqlen:]
    if seq_pad is not None:
        final = final * (seq_pad[:, seqlen:] == seq_idx[:, -1:])[:, :, None].to(x.dtype)
    return (F.silu(y) if activation in ("silu", "swish") else y), final.transpose(1, 2)


def _check_low_precision(backend, inputs_lp, activation):
    """Outputs and grads within 2x of PyTorch's own bf16 error, all against the float32 reference."""
    upstream = _upstream(inputs_lp, dtype=inputs_lp["x"].dtype)
    names = _grad_names(inputs_lp)
    inputs_32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in inputs_lp.items()}
    ref_outs, ref_grads = run_with_grads(_op("reference", activation), inputs_32, upstream, names)
    nat_outs, nat_grads = run_with_grads(lambda **kw: _native_conv(**kw, activation=activation), inputs_lp,
                                         upstream, names)
    outs, grads = run_with_grads(_op(backend, activation), inputs_lp, upstream, names)
    for i, name in enumerate(("y", "final_state")):
        assert outs[i].dtype == inputs_lp["x"].dtype
        assert_close(outs[i], ref_outs[i], name=name, rel=0.0, atol=low_precision_tolerance(nat_outs[i], ref_outs[i]))
    for name in names:
        assert grads[name].dtype == inputs_lp[name].dtype
        assert_close(grads[name], ref_grads[name], name=f"d{name}", rel=0.0,
                     atol=low_precision_tolerance(nat_grads[name], ref_grads[name]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    pytest.param(dict(width=4, activation="silu", bias=True, init=True), id="w4-silu-bias-init"),
    pytest.param(dict(width=3, activation=None, bias=False, init=False), id="w3-plain"),
    pytest.param(dict(width=4, activation="silu", bias=True, init=True, docs=[[4, 1, 35], [40]]), id="w4-packed-docs"),
])
def test_conv_bf16_within_twice_pytorch_error(backend, case):
    case = dict(case)
    activation = case.pop("activation")
    _check_low_precision(backend, _inputs(seqlen=40, dim=32, dtype=torch.bfloat16, **case), activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_bf16_input_float32_state(backend):
    """Decoding keeps a float32 window while activations are bf16: y in bf16, state stays float32."""
    inputs = _inputs(seqlen=6, width=4, init=True, dtype=torch.bfloat16)
    state = inputs["initial_state"].float()
    y_ref, final_ref = causal_conv1d_reference(inputs["x"].float(), inputs["weight"].float(), inputs["bias"].float(),
                                               "silu", state, return_final_state=True)
    ys = [causal_conv1d_update(state, inputs["x"][:, t], inputs["weight"], inputs["bias"], "silu", backend=backend)
          for t in range(6)]
    assert ys[0].dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(state, final_ref, name="state", rel=0.0)  # the window holds the inputs exactly
    assert_close(torch.stack(ys, dim=1), y_ref, name="y", rel=1e-2)  # one bf16 rounding of y


def _bad(**changes):
    args = dict(x=torch.randn(2, 8, 6), weight=torch.randn(6, 4), bias=torch.randn(6), activation="silu",
                initial_state=torch.randn(2, 6, 3), seq_idx=torch.zeros(2, 8, dtype=torch.int32))
    args.update(changes)
    return args


@pytest.mark.parametrize("args, match", [
    pytest.param(_bad(x=torch.randn(8, 6)), "x must be 3-D", id="x-rank"),
    pytest.param(_bad(weight=torch.randn(5, 4)), "weight must have shape", id="weight-dim-mismatch"),
    pytest.param(_bad(weight=torch.randn(6, 1), initial_state=None), "width >= 2", id="width-1"),
    pytest.param(_bad(bias=torch.randn(7)), "bias must have shape", id="bias-dim-mismatch"),
    pytest.param(_bad(activation="relu"), "activation must be one of", id="bad-activation"),
    pytest.param(_bad(initial_state=torch.randn(2, 6, 4)), "initial_state must have shape", id="state-width"),
    pytest.param(_bad(x=torch.randint(0, 3, (2, 8, 6))), "x must have dtype", id="x-int-dtype"),
    pytest.param(_bad(seq_idx=torch.zeros(2, 8)), "seq_idx must have dtype", id="seq-idx-float"),
    pytest.param(_bad(seq_idx=torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]] * 2, dtype=torch.int32)), "nondecreasing",
                 id="seq-idx-decreasing"),
    pytest.param(_bad(seq_idx=torch.zeros(2, 7, dtype=torch.int32)), "seq_idx must have shape", id="seq-idx-length"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_rejects_bad_input(args, match, backend):
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**args, backend=backend)


@pytest.mark.parametrize("args, match", [
    pytest.param(dict(conv_state=torch.zeros(2, 6, 3), x=torch.randn(2, 1, 6), weight=torch.randn(6, 4)),
                 "x must be 2-D", id="x-rank"),
    pytest.param(dict(conv_state=torch.zeros(2, 6, 2), x=torch.randn(2, 6), weight=torch.randn(6, 4)),
                 "conv_state must have shape", id="state-width"),
    pytest.param(dict(conv_state=torch.zeros(2, 6, 3), x=torch.randn(2, 6), weight=torch.randn(6, 4),
                      activation="gelu"), "activation must be one of", id="bad-activation"),
    pytest.param(dict(conv_state=torch.zeros(3, 6, 3), x=torch.randn(2, 6), weight=torch.randn(6, 4)),
                 "conv_state must have shape", id="state-batch"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_update_rejects_bad_input(args, match, backend):
    with pytest.raises(ValueError, match=match):
        causal_conv1d_update(**args, backend=backend)


VARIANT_CASES = [
    # (variant, launcher config, inputs): several programs along L with ragged last chunks and channel blocks
    pytest.param("stream", dict(block_l=4, block_d=32, rows=2), dict(width=4, activation="silu", init=True,
                 docs=[[2, 8, 3], [13]], seqlen=13, dim=20, sliced=True), id="stream-w4-silu-docs-init-sliced"),
    pytest.param("stream", dict(block_l=4, block_d=16, rows=2, prefetch=False), dict(width=3, activation=None,
                 init=True, docs=None, seqlen=11, dim=9, sliced=False), id="stream-w3-plain-init-odd-dim-no-prefetch"),
    pytest.param("stream", dict(block_l=2, block_d=16, rows=1), dict(width=2, activation="silu", init=False,
                 docs=[[1, 4], [2, 3]], seqlen=5, dim=16, sliced=True), id="stream-w2-silu-docs-rows1"),
    pytest.param("stream", dict(block_l=4, block_d=16, rows=4), dict(width=4, activation="silu", init=True,
                 docs=[[2], [2]], seqlen=2, dim=16, sliced=False), id="stream-w4-seqlen2-inside-window"),
    pytest.param("tile", dict(block_l=4, block_d=16, tiles=2), dict(width=4, activation="silu", init=True,
                 docs=[[5, 9, 3], [17]], seqlen=17, dim=20, sliced=True), id="tile-w4-silu-docs-init-sliced",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("variant, config, case", VARIANT_CASES)
def test_triton_variants_match_reference(variant, config, case):
    """Each kernel variant through its launchers against the float64 reference: y, the final state and the
    gradients of x, weight, bias and the initial state, with x a channel slice of a wider tensor (row stride
    not a multiple of 16, as Mamba-2's in_proj output) and dx written into a slice of another."""
    from mambakit.ops.causal_conv1d.triton_conv import causal_conv1d_bwd, causal_conv1d_fwd, channel_contiguous

    case = dict(case)
    silu, sliced = case.pop("activation") is not None, case.pop("sliced")
    inputs = _inputs(**case)
    upstream = _upstream(inputs)
    names = _grad_names(inputs)
    ref_outs, ref_grads = run_with_grads(_op("reference", "silu" if silu else None), inputs, upstream, names)
    x, weight, bias, seq_idx = inputs["x"], inputs["weight"], inputs["bias"], inputs["seq_idx"]
    batch, seqlen, dim = x.shape
    dx = None
    if sliced:
        x = torch.randn(batch, seqlen, dim + 7, dtype=F64, device=DEVICE)[:, :, 3 : 3 + dim].copy_(x)
        dx = torch.full((batch, seqlen, dim + 5), float("nan"), dtype=F64, device=DEVICE)[:, :, 2 : 2 + dim]
    init = channel_contiguous(inputs["initial_state"])
    fwd_config = {k: v for k, v in config.items() if k != "tiles"}
    y, final = causal_conv1d_fwd(x=x, weight=weight, bias=bias, initial_state=init, seq_idx=seq_idx, silu=silu,
                                 return_final_state=True, variant=variant, num_warps=1, **fwd_config)
    dx, dw, db, dinit = causal_conv1d_bwd(x=x, weight=weight, bias=bias, initial_state=init, seq_idx=seq_idx,
                                          silu=silu, dy=upstream[0], dfinal=channel_contiguous(upstream[1]),
                                          need_dinit=init is not None, variant=variant, num_warps=1, dx=dx, **config)
    grads = dict(x=dx, weight=dw, bias=db, initial_state=dinit)
    _check_against_reference([y, final], grads, ref_outs, ref_grads, rel=1e-10)


def test_row_align_divides_row_and_batch_strides():
    """ALIGN is the largest power of two <= 16 bytes that divides every batch and row stride."""
    from mambakit.ops.causal_conv1d.triton_conv import row_align

    bf16 = torch.empty(2, 4, 3352, dtype=torch.bfloat16)[..., 1536 : 1536 + 1792]  # Mamba-2's xBC slice
    assert row_align(bf16) == 8
    assert row_align(bf16, torch.empty(2, 4, 1792, dtype=torch.bfloat16)) == 8
    assert row_align(torch.empty(2, 4, 3352 + 4, dtype=torch.bfloat16)) == 4
    assert row_align(torch.empty(2, 3, 7, dtype=torch.float32)) == 1
    assert row_align(torch.empty(2, 4, 1792, dtype=torch.float32)) == 4


def test_stream_variant_rejects_bad_config():
    from mambakit.ops.causal_conv1d.triton_conv import causal_conv1d_fwd

    x = torch.randn(1, 8, 16, dtype=F64, device=DEVICE)
    w = torch.randn(16, 4, dtype=F64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of rows"):
        causal_conv1d_fwd(x=x, weight=w, bias=None, initial_state=None, seq_idx=None, silu=False,
                          return_final_state=False, variant="stream", block_l=6, rows=4)
    with pytest.raises(ValueError, match="variant must be one of"):
        causal_conv1d_fwd(x=x, weight=w, bias=None, initial_state=None, seq_idx=None, silu=False,
                          return_final_state=False, variant="blocked")


# ---------------------------------------------------------------------------------------------------
# real shapes on the GPU: Triton bf16 against the torch path in float32
# ---------------------------------------------------------------------------------------------------

GPU_CASES = [
    pytest.param(dict(docs=None, init=False, final=False), id="silu-bias"),
    pytest.param(dict(docs=[[1000, 3, 4189, 3000], [8192]], init=True, final=True), id="silu-bias-packed-init-final"),
    # Mamba-2 130M's training layout: x = zxbcdt[..., 1536:3328] of 3352 columns (row stride not a multiple of 16)
    pytest.param(dict(docs=[[700, 1348], [2048], [2048], [1, 2047]], init=False, final=False,
                      layout=(4, 2048, 1792, 3352, 1536)),
                 id="mamba2-slice-docs"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["tile", "stream"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_conv_gpu_real_shape_bf16(case, variant, monkeypatch):
    from mambakit.ops.causal_conv1d import triton_conv

    # the launchers read their default variant at call time: the public op runs the one under test
    monkeypatch.setattr(triton_conv, "FWD_VARIANT", variant)
    monkeypatch.setattr(triton_conv, "BWD_VARIANT", variant)
    batch, seqlen, dim, wide, offset = case.get("layout", (2, 8192, 4096, 4096, 0))
    width = 4
    bf16 = torch.bfloat16
    inputs = dict(
        x=torch.randn(batch, seqlen, wide, device="cuda", dtype=bf16),
        weight=(torch.randn(dim, width, device="cuda") / 2).to(bf16),
        bias=torch.randn(dim, device="cuda", dtype=bf16),
        initial_state=torch.randn(batch, dim, width - 1, device="cuda", dtype=bf16) if case["init"] else None,
        seq_idx=_seq_idx(case["docs"]).cuda() if case["docs"] else None,
    )
    x_view = None if wide == dim else (lambda x: x[..., offset : offset + dim])
    names = _grad_names(inputs)
    upstream = [torch.randn(batch, seqlen, dim, device="cuda", dtype=bf16),
                torch.randn(batch, dim, width - 1, device="cuda", dtype=bf16)][: 2 if case["final"] else 1]
    inputs_32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    ref_outs, ref_grads = run_with_grads(_op("torch", "silu", case["final"], x_view), inputs_32, upstream, names)
    outs, grads = run_with_grads(_op("triton", "silu", case["final"], x_view), inputs, upstream, names)
    nat_outs, nat_grads = run_with_grads(
        lambda x, **kw: _native_conv(x if x_view is None else x_view(x), **kw, activation="silu")[: len(upstream)],
        inputs, upstream, names)
    assert_close(outs[0], ref_outs[0], name="y", rel=0.0, atol=low_precision_tolerance(nat_outs[0], ref_outs[0]))
    if case["final"]:
        assert_close(outs[1], ref_outs[1], name="final_state", rel=0.0)
    for name in names:
        assert_close(grads[name], ref_grads[name], name=f"d{name}", rel=0.0,
                     atol=low_precision_tolerance(nat_grads[name], ref_grads[name]))


@pytest.mark.gpu
def test_update_gpu_matches_torch():
    batch, dim, width = 64, 4096, 4
    state_t = torch.randn(batch, dim, width - 1, device="cuda")
    state_r = state_t.clone()
    weight = torch.randn(dim, width, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        x = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16)
        y_t = causal_conv1d_update(state_t, x, weight, bias, "silu", backend="triton")
        y_r = causal_conv1d_update(state_r, x, weight, bias, "silu", backend="torch")
        assert_close(y_t, y_r, name="y", rel=1e-2)
        assert_close(state_t, state_r, name="state", rel=0.0)
