"""The baseline mixers (S4D, ungated Mamba-1, attention) and hybrid models: against the recurrence / explicit
attention math, decoding consistency (prefill + steps == parallel forward), packing, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoints import CheckpointError, load_pretrained, save_pretrained
from mambakit.generation import prefill
from mambakit.generation.cuda_graph import CUDAGraphDecoder
from mambakit.modules import MHA, S4D, Mamba1Ungated
from mambakit.modules import s4d as s4d_module
from mambakit.modules.s4d import document_segments
from mambakit.ops import selective_scan

from .helpers import assert_close

VOCAB = 61
ATTN_ROPE = {"num_heads": 4, "rotary_emb_dim": 4}
SMALL = {
    "s4d-lin": dict(ssm_cfg={"layer": "S4D", "d_state": 4, "A_init": "S4D-Lin"}),
    "s4d-real-ungated": dict(ssm_cfg={"layer": "S4D", "d_state": 4, "A_init": "S4D-Real", "gated": False}),
    "mamba1-ungated": dict(ssm_cfg={"layer": "Mamba1Ungated", "d_state": 4}),
    "attention-rope-mlp": dict(attn_layer_idx=[0, 1], attn_cfg=ATTN_ROPE, d_intermediate=48),
    "attention-abs": dict(attn_layer_idx=[0, 1], attn_cfg={"num_heads": 4, "absolute_pos_emb": True}),
    "hybrid-mamba1-gqa-conv": dict(ssm_cfg={"layer": "Mamba1", "d_state": 4}, attn_layer_idx=[1],
                                   attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "d_conv": 3,
                                             "mlp_dim": 20, "rotary_emb_interleaved": True}),
    # attn_cfg as mamba_ssm's hybrid configs write it
    "hybrid-mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4}, n_layer=3,
                          attn_layer_idx=[1], attn_cfg={"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 4,
                                                        "out_proj_bias": True, "qkv_proj_bias": True,
                                                        "rotary_emb_dim": 8}),
}
CASES = [pytest.param(name, id=name) for name in SMALL]


def _model(name: str, dtype=torch.float64) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(**{"d_model": 32, "n_layer": 2, "vocab_size": VOCAB, **SMALL[name]})).to(dtype).eval()
    with torch.no_grad():  # D = 1, zero biases, B = 1 at init hide mistakes: randomise every parameter a little
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _s4d(A_init: str, gated: bool) -> S4D:
    layer = S4D(16, d_state=4, A_init=A_init, gated=gated).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


S4D_CASES = [pytest.param("S4D-Lin", True, id="lin-gated"), pytest.param("S4D-Real", True, id="real-gated"),
             pytest.param("S4D-Lin", False, id="lin-ungated"), pytest.param("S4D-Real", False, id="real-ungated")]


# ---------------------------------------------------------------- S4D against the recurrence


@pytest.mark.parametrize("seqlen", [1, 37, 64])
@pytest.mark.parametrize("A_init, gated", S4D_CASES)
def test_s4d_fft_convolution_equals_the_recurrence(A_init, gated, seqlen):
    """The FFT path (kernel K, initial-state term, closed-form final state, each factored over blocks of ~sqrt L
    positions: one block, a cut last block, whole blocks) equals selective_scan's sequential reference with Δ, B, C
    constant in time (complex A for S4D-Lin), outputs and final state, float64."""
    layer = _s4d(A_init, gated)
    batch, dim = 2, layer.d_inner
    x = torch.randn(batch, seqlen, dim, dtype=torch.float64)
    state = layer.allocate_state(batch)
    state.ssm_state.copy_(torch.randn_like(state.ssm_state))
    h0 = state.ssm_state.clone()
    y = layer._convolve(x, state)  # without D: the reference below gets D=None
    _, A, B, C = layer.ssm_params(torch.float64)
    y_ref, h_ref = selective_scan(
        x, torch.zeros_like(x), A, B[None, None].expand(batch, seqlen, dim, 4), C[None, None].expand(batch, seqlen, dim, 4),
        dt_bias=layer.dt_bias, dt_softplus=True, initial_state=h0, return_final_state=True, backend="reference")
    assert_close(y, y_ref, name="y", rel=1e-10)
    assert_close(state.ssm_state, h_ref, name="final state", rel=1e-10)


@pytest.mark.parametrize("A_init, gated", S4D_CASES)
def test_s4d_fft_path_gradients_equal_the_scan_path(A_init, gated, monkeypatch):
    """Every parameter's gradient through the FFT path (the kernel factored into blocks of 8 positions at L 29: 4
    blocks, the last one cut) equals the one through the scan op (the seq_idx path under compile or capture)."""
    monkeypatch.setattr(s4d_module, "_documents_by_convolution", lambda x, is_complex: False)
    layer = _s4d(A_init, gated)
    u = torch.randn(2, 29, 16, dtype=torch.float64)
    upstream = torch.randn(2, 29, 16, dtype=torch.float64)
    grads = []
    for seq_idx in (None, torch.zeros(2, 29, dtype=torch.int32)):
        layer.zero_grad()
        out = layer(u, seq_idx=seq_idx)
        (out * upstream).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        if seq_idx is None:
            y_fft = out.detach()
    assert_close(y_fft, out.detach(), name="output", rel=1e-10)
    assert set(grads[0]) == {n for n, _ in layer.named_parameters()}
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], name=f"grad {name}", rel=1e-9)


def test_document_segments():
    """Runs of one seq_idx value inside each row, as flat starts and lengths; every row starts one."""
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5], [7, 8, 8, 7, 7, 7]], dtype=torch.int32)
    starts, lengths = document_segments(seq_idx)
    assert starts.tolist() == [0, 2, 5, 6, 12, 13, 15]
    assert lengths.tolist() == [2, 3, 1, 6, 1, 2, 3]
    with pytest.raises(ValueError, match="batch, seqlen"):
        document_segments(seq_idx[0])


@pytest.mark.parametrize("with_cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("A_init, gated", S4D_CASES)
def test_s4d_documents_by_convolution_equal_the_scan(A_init, gated, with_cache, monkeypatch):
    """seq_idx through the per-document FFT convolution (documents of 1 to 23 tokens in buckets 1 .. 32, a row
    without a boundary, a cache with a random state reaching the first document only) equals the scan op with the
    state restarting at each document: output, the cache's final ssm and conv states, the input's and every
    parameter's gradient, float64."""
    layer = _s4d(A_init, gated)
    seq_idx = torch.tensor([[0] * 5 + [1] * 23 + [2] * 9, [4] * 37, [3] + [4] * 2 + [5] * 34, [1] * 36 + [2]],
                           dtype=torch.int32)
    u = torch.randn(4, 37, 16, dtype=torch.float64)
    upstream = torch.randn(4, 37, 16, dtype=torch.float64)
    state0 = layer.allocate_state(4)
    state0.ssm_state.copy_(torch.randn_like(state0.ssm_state))
    state0.conv_state.normal_()
    runs = {}
    for by_convolution in (True, False):
        monkeypatch.setattr(s4d_module, "_documents_by_convolution", lambda x, is_complex, on=by_convolution: on)
        layer.zero_grad()
        x = u.clone().requires_grad_(True)
        cache = None
        if with_cache:
            cache = layer.allocate_state(4)
            cache.ssm_state.copy_(state0.ssm_state)
            cache.conv_state.copy_(state0.conv_state)
        out = layer(x, cache=cache, seq_idx=seq_idx)
        (out * upstream).sum().backward()
        runs[by_convolution] = (out.detach(), cache, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
    (y1, c1, gx1, g1), (y0, c0, gx0, g0) = runs[True], runs[False]
    assert_close(y1, y0, name="output", rel=1e-10)
    assert_close(gx1, gx0, name="input grad", rel=1e-9)
    assert set(g1) == {n for n, _ in layer.named_parameters()}
    for name in g1:
        assert_close(g1[name], g0[name], name=f"grad {name}", rel=1e-9)
    if with_cache:
        assert_close(c1.ssm_state, c0.ssm_state, name="final ssm state", rel=1e-10)
        assert_close(c1.conv_state, c0.conv_state, name="final conv state", rel=1e-12)
        assert not torch.allclose(c1.ssm_state, state0.ssm_state)


def test_s4d_documents_under_compile():
    """S4D-Real with seq_idx compiles in one graph (torch.compile(fullgraph=True): the scan, no host read of the
    documents' bounds); S4D-Lin compiles with graph breaks around the per-document convolution (its scan traces in
    no graph). Output and input gradient equal eager's."""
    seq_idx = torch.tensor([[0] * 7 + [1] * 17, [2] * 24], dtype=torch.int32)
    for A_init, fullgraph in (("S4D-Real", True), ("S4D-Lin", False)):
        layer = _s4d(A_init, True).float()
        u = torch.randn(2, 24, 16, requires_grad=True)
        eager = layer(u, seq_idx=seq_idx)
        (g_eager,) = torch.autograd.grad(eager.sum(), u)
        compiled = torch.compile(layer, fullgraph=fullgraph, backend="eager")(u, seq_idx=seq_idx)
        (g_compiled,) = torch.autograd.grad(compiled.sum(), u)
        assert_close(compiled, eager, name=f"{A_init} compiled vs eager", rel=1e-4)
        assert_close(g_compiled, g_eager, name=f"{A_init} input grad, compiled vs eager", rel=1e-4)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("seqlen, block", [(1, None), (29, None), (64, None), (100, 7), (1000, None), (1000, 1000)])
def test_s4d_kernel_equals_the_powers_summed(complex_, seqlen, block):
    """ssm_kernel's factored product equals Re sum_n coef exp(dtA l) built directly, at lengths that are and are not
    a multiple of the block, one block, one position, and with gradients for coef and dtA."""
    from mambakit.modules.s4d import ssm_kernel

    torch.manual_seed(0)
    shape = (3, 4)
    if complex_:
        coef = torch.complex(torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64))
        dtA = torch.complex(-torch.rand(shape, dtype=torch.float64) * 0.1, torch.randn(shape, dtype=torch.float64))
    else:
        coef, dtA = torch.randn(shape, dtype=torch.float64), -torch.rand(shape, dtype=torch.float64) * 0.1
    coef.requires_grad_(), dtA.requires_grad_()
    l = torch.arange(seqlen, dtype=torch.float64)
    direct = (coef[..., None] * torch.exp(dtA[..., None] * l)).sum(1).real
    fast = ssm_kernel(coef, dtA, seqlen, block)
    assert fast.shape == (3, seqlen)
    assert_close(fast, direct, name="kernel", rel=1e-12)
    upstream = torch.randn_like(direct)
    g_direct = torch.autograd.grad((direct * upstream).sum(), (coef, dtA))
    g_fast = torch.autograd.grad((fast * upstream).sum(), (coef, dtA))
    for a, b, name in zip(g_fast, g_direct, ("coef", "dtA")):
        assert_close(a, b, name=f"grad {name}", rel=1e-10)


def test_s4d_initialisations():
    lin, real = S4D(8, d_state=4, A_init="S4D-Lin"), S4D(8, d_state=4, A_init="S4D-Real")
    _, A_lin, B_lin, _ = lin.ssm_params()
    _, A_real, B_real, _ = real.ssm_params()
    n = torch.arange(4, dtype=torch.float32)
    assert A_lin.is_complex() and not A_real.is_complex()
    assert_close(A_lin[3], torch.complex(torch.full((4,), -0.5), math.pi * n), name="S4D-Lin A")
    assert_close(A_real[3], -(n + 1), name="S4D-Real A")
    assert torch.equal(B_lin, torch.ones_like(B_lin)) and torch.equal(B_real, torch.ones_like(B_real))
    assert lin.in_proj.out_features == 2 * lin.d_inner
    assert S4D(8, gated=False).in_proj.out_features == lin.d_inner
    dt = F.softplus(lin.dt_bias.detach())
    assert float(dt.min()) >= 1e-4 and float(dt.max()) <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="A_init must be one of"):
        S4D(8, A_init="S4D-Inv")


@pytest.mark.slow
def test_mamba1_ungated_is_mamba1_without_the_gate():
    """Same parameters but in_proj (D wide, no z half); output = out_proj(scan) with no silu(z) factor."""
    torch.manual_seed(0)
    layer = Mamba1Ungated(16, d_state=4).double()
    assert layer.in_proj.weight.shape == (layer.d_inner, 16)
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    x = torch.randn(2, 11, layer.d_inner, dtype=torch.float64)
    with torch.no_grad():
        x = F.silu(F.conv1d(layer.in_proj(u).transpose(1, 2), layer.conv1d.weight, layer.conv1d.bias,
                            padding=layer.d_conv - 1, groups=layer.d_inner)[..., :11]).transpose(1, 2)
        dt, B, C, dt_bias = layer._ssm_params(x)
        y = selective_scan(x, dt, -torch.exp(layer.A_log.double()), B, C, D=layer.D, dt_bias=dt_bias,
                           dt_softplus=True, backend="reference")
        assert_close(layer(u), layer.out_proj(y), name="ungated output", rel=1e-10)


# ---------------------------------------------------------------- attention against explicit math


def _rotate(x, pos, dim, interleaved):
    """Rotary embedding written pair by pair (the definition), x (B, L, H, E), pos (L,)."""
    out = x.clone()
    for i in range(dim // 2):
        theta = pos.double() * 10000.0 ** (-2 * i / dim)
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + dim // 2)
        c, s = torch.cos(theta)[None, :, None], torch.sin(theta)[None, :, None]
        out[..., a], out[..., b] = x[..., a] * c - x[..., b] * s, x[..., a] * s + x[..., b] * c
    return out


@pytest.mark.parametrize("heads_kv, rotary, interleaved", [
    pytest.param(4, 0, False, id="mha-nopos"), pytest.param(4, 8, False, id="mha-rope"),
    pytest.param(2, 4, True, id="gqa-rope-interleaved-partial")])
def test_attention_equals_explicit_softmax(heads_kv, rotary, interleaved):
    torch.manual_seed(0)
    attn = MHA(32, num_heads=4, num_heads_kv=heads_kv, rotary_emb_dim=rotary, rotary_emb_interleaved=interleaved).double()
    u = torch.randn(2, 13, 32, dtype=torch.float64)
    qkv = attn.in_proj(u)
    q, k, v = qkv.split([32, 8 * heads_kv, 8 * heads_kv], dim=-1)  # the fused layout [q | k | v]
    q, k, v = q.view(2, 13, 4, 8), k.view(2, 13, heads_kv, 8), v.view(2, 13, heads_kv, 8)
    pos = torch.arange(13)
    if rotary:
        q, k = _rotate(q, pos, rotary, interleaved), _rotate(k, pos, rotary, interleaved)
    k, v = k.repeat_interleave(4 // heads_kv, dim=2), v.repeat_interleave(4 // heads_kv, dim=2)
    scores = torch.einsum("bihe,bjhe->bhij", q, k) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(13, 13, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhij,bjhe->bihe", scores.softmax(-1), v).reshape(2, 13, 32)
    assert_close(attn(u), attn.out_proj(o), name="attention output", rel=1e-10)


def test_attention_parameters_follow_mamba_ssm_mha():
    attn = MHA(64, num_heads=4, num_heads_kv=2, head_dim=32, mlp_dim=100, d_conv=4, rotary_emb_dim=16)
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    qkv = 32 * (4 + 2 * 2)
    assert shapes == {"in_proj.weight": (qkv + 256, 64), "in_proj.bias": (qkv + 256,),  # mlp_dim rounds up to 256
                      "conv1d.weight": (qkv, 1, 4), "conv1d.bias": (qkv,),
                      "out_proj.weight": (64, 4 * 32 + 128), "out_proj.bias": (64,)}
    with pytest.raises(ValueError, match="causal must be True"):
        MHA(64, num_heads=4, causal=False)
    with pytest.raises(ValueError, match="num_heads_kv"):
        MHA(64, num_heads=4, num_heads_kv=3)


def test_absolute_positions_are_sinusoidal_and_added_to_the_input():
    torch.manual_seed(0)
    with_pos = MHA(16, num_heads=2, absolute_pos_emb=True).double()
    plain = MHA(16, num_heads=2).double()
    plain.load_state_dict(with_pos.state_dict())
    u = torch.randn(1, 5, 16, dtype=torch.float64)
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    i = torch.arange(0, 16, 2, dtype=torch.float64)
    pe = torch.zeros(5, 16, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / 10000 ** (i / 16)), torch.cos(pos / 10000 ** (i / 16))
    assert_close(with_pos(u), plain(u + pe), name="absolute positions", rel=1e-12)


# ---------------------------------------------------------------- models: decoding, packing, ragged prefill


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("prefix", [pytest.param(1, id="prefix1"), pytest.param(7, id="prefix7")])
def test_decoding_consistency_float64(name, prefix):
    """Prefill `prefix` tokens, then one token at a time: every logit equals the parallel forward's."""
    model = _model(name)
    ids = torch.randint(0, VOCAB, (3, 19))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(3, dtype=torch.float64)
        parts = [model(ids[:, :prefix], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(prefix, 19)]
    assert cache.seqlen_offset == 19
    assert_close(torch.cat(parts, dim=1), full, name="logits, prefill + steps", rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("s4d-lin", id="s4d-lin"), pytest.param("hybrid-mamba1-gqa-conv", id="hybrid")])
def test_decoding_consistency_float32_chunked_prefill(name):
    model = _model(name, torch.float32)
    ids = torch.randint(0, VOCAB, (2, 70))  # past the KV cache's first capacity (64): it grows mid-sequence
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 13), (13, 14), (14, 66), (66, 70))]
    assert_close(torch.cat(parts, dim=1), full, name="logits, chunked prefill", rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_seq_idx_packing_equals_separate_sequences(name):
    """Two documents in one row with seq_idx give each one's logits alone (positions restart too)."""
    model = _model(name)
    a, b = torch.randint(0, VOCAB, (1, 11)), torch.randint(0, VOCAB, (1, 6))
    seq_idx = torch.tensor([[0] * 11 + [1] * 6], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_idx=seq_idx)
        assert_close(packed[:, :11], model(a), name="first document", rel=1e-10)
        assert_close(packed[:, 11:], model(b), name="second document", rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("attention-abs", id="attention-abs"),
                                  pytest.param("hybrid-mamba1-gqa-conv", id="hybrid")])
def test_ragged_prefill_and_continuation_equal_each_row_alone(name):
    """Left-padded ragged prompts in chunks, then a ragged continuation of the cached rows: each row's last
    logits equal those of its own tokens run alone (padding is never attended to, positions are per row)."""
    model = _model(name)
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    more = [[14, 15], [16, 17, 18, 19], [20]]
    cache, logits = prefill(model, rows, tokens_per_call=3)
    _, more_logits = prefill(model, more, cache, tokens_per_call=2)
    for i in range(3):
        with torch.no_grad():
            alone = model(torch.tensor([rows[i]]))[0, -1].float()
            alone_more = model(torch.tensor([rows[i] + more[i]]))[0, -1].float()
        assert_close(logits[i], alone, name=f"row {i} after the prompt", rel=1e-5)
        assert_close(more_logits[i], alone_more, name=f"row {i} after the continuation", rel=1e-5)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", [
    pytest.param("s4d-lin", "mambakit", id="s4d-lin"), pytest.param("mamba1-ungated", "mambakit", id="mamba1-ungated"),
    pytest.param("hybrid-mamba1-gqa-conv", "mambakit", id="hybrid-mambakit"),
    pytest.param("hybrid-mamba2", "mamba_ssm", id="hybrid-mamba_ssm")])
def test_checkpoint_round_trip(tmp_path, name, fmt):
    model = _model(name, torch.float32)
    save_pretrained(model, tmp_path, format=fmt)
    loaded = MambaLM.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_hugging_face_and_mamba_ssm_formats_refuse_what_they_cannot_hold(tmp_path):
    with pytest.raises(CheckpointError, match="transformers has no S4D mixer"):
        save_pretrained(_model("s4d-lin", torch.float32), tmp_path, format="hf")
    with pytest.raises(CheckpointError, match=r"cannot express ssm_cfg\['layer'\]='Mamba1Ungated'"):
        save_pretrained(_model("mamba1-ungated", torch.float32), tmp_path, format="mamba_ssm")
    with pytest.raises(CheckpointError, match=r"cannot express attn_cfg\['absolute_pos_emb'\]=True"):
        save_pretrained(_model("attention-abs", torch.float32), tmp_path, format="mamba_ssm")
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_mamba_ssm_hybrid_state_dict_names_load(tmp_path):
    """A hybrid checkpoint written with mamba_ssm's names (its MHA: in_proj / conv1d / out_proj with biases)
    loads, attention weights included, and its config builds the same layers."""
    model = _model("hybrid-mamba1-gqa-conv", torch.float32)
    names = set(model.state_dict())
    assert {"backbone.layers.1.mixer.in_proj.weight", "backbone.layers.1.mixer.in_proj.bias",
            "backbone.layers.1.mixer.conv1d.weight", "backbone.layers.1.mixer.out_proj.bias"} <= names
    save_pretrained(model, tmp_path, format="mamba_ssm")
    state = torch.load(tmp_path / "pytorch_model.bin")
    assert state["backbone.layers.1.mixer.in_proj.weight"].shape == (4 * 8 + 2 * 2 * 8 + 256, 32)
    assert_close(load_pretrained(tmp_path).backbone.layers[1].mixer.in_proj.weight,
                 model.backbone.layers[1].mixer.in_proj.weight, name="attention in_proj", rel=0)


def test_cuda_graph_decoder_of_an_attention_model_needs_the_length_its_kv_caches_are_fixed_at():
    with pytest.raises(ValueError, match="needs max_length"):
        CUDAGraphDecoder(_model("hybrid-mamba2", torch.float32), batch_size=1)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_hybrid_decodes_from_fixed_capacity_kv_caches_as_from_growing_ones(sampled):
    """CUDAGraphDecoder's caches (on a CPU model it runs the step eagerly on them): the attention layer's KV cache
    at a fixed capacity, one-token steps writing at a device-side slot. A ragged batch, chunked prefill: the same
    tokens and log-probabilities as the growing caches of a plain generate call, and the decoder serves a
    second call after its reset."""
    from mambakit.generation import generate
    from mambakit.modules.attention import KVState

    model = _model("hybrid-mamba2")
    prompts = [[5, 9, 2, 7, 7, 1, 30], [4], [11, 12, 13]]
    kw = dict(prefill_tokens_per_call=3, return_logprobs=True, **({"temperature": 0.8, "seed": 3} if sampled else {}))
    decoder = CUDAGraphDecoder(model, batch_size=3, max_length=7 + 9)
    kv = [s for s in decoder.cache.layers if isinstance(s, KVState)]
    assert len(kv) == 1 and kv[0].capacity == 16 and kv[0].slot is not None
    for _ in range(2):
        fixed, fixed_lp = generate(model, prompts, 9, cuda_graph=decoder, **kw)
        grown, grown_lp = generate(model, prompts, 9, **kw)
        assert fixed == grown
        assert_close(torch.tensor(fixed_lp), torch.tensor(grown_lp), name="log-probabilities", rel=1e-10)
        assert kv[0].capacity == 16 and kv[0].length == 7 + 8 and int(kv[0].slot) == 15
    with pytest.raises(ValueError, match="hold 16 tokens a row; this call needs 17"):
        generate(model, prompts, 10, cuda_graph=decoder)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_decoding_consistency_and_autocast(name):
    """On the GPU (Triton kernels, SDPA's fused kernels): prefill + steps equal the parallel forward in float32,
    the bf16-autocast forward stays close to it, and the CUDA model matches the CPU one."""
    model = _model(name, torch.float32)
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        cpu = model(ids)
        model = model.cuda()
        full = model(ids.cuda())
        cache = model.allocate_cache(2)
        parts = [model(ids[:, :9].cuda(), cache=cache)] + [model(ids[:, t:t + 1].cuda(), cache=cache) for t in range(9, 40)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(ids.cuda()).float()
    assert_close(full, cpu, name="cuda vs cpu", rel=1e-3)
    assert_close(torch.cat(parts, dim=1), full, name="cuda prefill + steps", rel=1e-3)
    assert_close(low, full, name="bf16 autocast", rel=5e-2)
