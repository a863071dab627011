"""MambaLM: decoding consistency (prefill + steps == parallel forward), packing, config, presets, init."""

import math

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.models import PRESETS, preset

from .helpers import assert_close

SMALL = {
    "mamba1": dict(d_model=32, n_layer=2, vocab_size=61, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba1-mlp-untied": dict(d_model=32, n_layer=2, vocab_size=61, d_intermediate=64, tie_embeddings=False,
                              ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba2": dict(d_model=32, n_layer=2, vocab_size=61,
                   ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}),
    "mamba2-groups-mlp": dict(d_model=64, n_layer=2, vocab_size=61, d_intermediate=96,
                              ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 4}),
    "mamba2-dssm-nonorm-Dhdim": dict(d_model=32, n_layer=2, vocab_size=61,
                                     ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "d_ssm": 32,
                                              "rmsnorm": False, "D_has_hdim": True, "chunk_size": 8}),
    "layernorm-no-fp32-residual": dict(d_model=32, n_layer=2, vocab_size=61, rms_norm=False, residual_in_fp32=False,
                                       ssm_cfg={"layer": "Mamba1", "d_state": 4}),
}
CASES = [pytest.param(name, id=name) for name in SMALL]


def _model(name: str, dtype=torch.float64) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(**SMALL[name])).to(dtype).eval()
    with torch.no_grad():  # D = 1 and zero biases at init hide mistakes: randomise every parameter a little
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("prefix", [pytest.param(1, id="prefix1"), pytest.param(7, id="prefix7")])
def test_decoding_consistency_float64(name, prefix):
    """Prefill `prefix` tokens, then one token at a time: every logit equals the parallel forward's."""
    model = _model(name)
    ids = torch.randint(0, 61, (3, 19))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(3, dtype=torch.float64)
        parts = [model(ids[:, :prefix], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(prefix, 19)]
    assert cache.seqlen_offset == 19
    assert_close(torch.cat(parts, dim=1), full, name="logits, prefill + steps", rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param("mamba1", id="mamba1"), pytest.param("mamba2", id="mamba2")])
def test_decoding_consistency_float32_and_chunked_prefill(name):
    """float32, and prefill in several chunks of many tokens (the cache continues across calls)."""
    model = _model(name, torch.float32)
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 13), (13, 14), (14, 31), (31, 40))]
    assert_close(torch.cat(parts, dim=1), full, name="logits, chunked prefill", rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_seq_idx_packing_equals_separate_sequences(name):
    """Two documents packed in one row with seq_idx give the logits of each run alone."""
    model = _model(name)
    a, b = torch.randint(0, 61, (1, 11)), torch.randint(0, 61, (1, 6))
    seq_idx = torch.tensor([[0] * 11 + [1] * 6], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_idx=seq_idx)
        assert_close(packed[:, :11], model(a), name="first document", rel=1e-10)
        assert_close(packed[:, 11:], model(b), name="second document", rel=1e-10)


def test_logits_shape_padded_vocab_and_logits_to_keep():
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=61, ssm_cfg={"d_state": 4}))
    assert model.config.padded_vocab_size == 64
    ids = torch.randint(0, 61, (2, 5))
    logits = model(ids)
    assert logits.shape == (2, 5, 64)
    assert_close(model(ids, logits_to_keep=1), logits[:, -1:], name="last logits", rel=1e-6)


def test_tied_and_untied_heads():
    tied = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=40))
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    untied = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=40, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.backbone.embedding.weight


def test_lm_initialisation_matches_reference_scheme():
    """Embedding N(0, 0.02); out_proj kaiming-uniform / sqrt(n_layer); zero biases but dt_proj's kept."""
    torch.manual_seed(0)
    n_layer = 4
    model = MambaLM(MambaConfig(d_model=256, n_layer=n_layer, vocab_size=4096, ssm_cfg={"layer": "Mamba1"}))
    model.requires_grad_(False)
    assert abs(float(model.backbone.embedding.weight.std()) - 0.02) < 0.001
    out = model.backbone.layers[0].mixer.out_proj.weight
    expected_std = 1 / math.sqrt(out.shape[1]) / math.sqrt(3) / math.sqrt(n_layer)
    assert abs(float(out.std()) / expected_std - 1) < 0.05
    dt_bias = model.backbone.layers[0].mixer.dt_proj.bias
    assert float(dt_bias.abs().min()) > 0  # _no_reinit: the inverse-softplus dt init survives the LM init
    assert float(model.backbone.layers[0].mixer.conv1d.bias.abs().max()) > 0  # convs keep their default init


def test_residual_kept_in_float32_under_bf16():
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 4})).to(torch.bfloat16)
    seen = []
    model.backbone.layers[1].register_forward_hook(lambda mod, args, out: seen.append(out[1].dtype))
    model(torch.randint(0, 50, (1, 8)))
    assert seen == [torch.float32]


def test_config_round_trip_and_errors():
    cfg = MambaConfig(d_model=64, n_layer=3, vocab_size=100, ssm_cfg={"layer": "Mamba2", "headdim": 32})
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown config keys \['hidden_size'\]"):
        MambaConfig.from_dict({**cfg.to_dict(), "hidden_size": 64})
    with pytest.raises(ValueError, match="ssm_cfg"):
        MambaConfig(ssm_cfg={"layer": "Mamba3"})
    # a key the mixer does not take fails here, naming it and what the mixer takes (not a TypeError at build time)
    with pytest.raises(ValueError, match=r"ssm_cfg holds \['headdim'\], which mambakit's S4D does not take "
                                         r"\(it takes \['A_init'"):
        MambaConfig(ssm_cfg={"layer": "S4D", "headdim": 64})
    with pytest.raises(ValueError, match=r"\['nheads'\], which mambakit's Mamba1 does not take"):
        MambaConfig(ssm_cfg={"nheads": 4})
    with pytest.raises(ValueError, match="d_model"):
        MambaConfig(d_model=0)
    with pytest.raises(ValueError, match="attn_layer_idx"):
        MambaConfig(n_layer=2, attn_layer_idx=[5])
    with pytest.raises(ValueError, match=r"attn_cfg \{\} does not build an attention layer"):
        MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=10, attn_layer_idx=[1]))


def test_presets_build_configs_with_published_sizes():
    assert preset("mamba-130m").d_model == 768 and preset("mamba-130m").n_layer == 24
    assert preset("mamba2-2.7b").layer == "Mamba2"
    assert all(isinstance(PRESETS[n](), MambaConfig) for n in PRESETS)
    with pytest.raises(ValueError, match="unknown model preset 'mamba-9b'"):
        preset("mamba-9b")


def test_input_ids_validation():
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=10))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="cache holds 2 sequences"):
        model(torch.zeros(3, 4, dtype=torch.long), cache=model.allocate_cache(2))


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_triton_path_of_a_whole_model_equals_the_torch_path(layer):
    """Every op of a small float32 LM on its Triton kernels (CPU interpreter here; CUDA on a GPU),
    including the fused residual add + norm of each block, gives the torch path's logits."""
    from mambakit.ops import use_backend

    torch.manual_seed(0)
    cfg = {"layer": layer, "d_state": 8} if layer == "Mamba1" else {"layer": layer, "d_state": 16, "headdim": 16,
                                                                     "chunk_size": 16}
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=40, ssm_cfg=cfg)).eval()
    ids = torch.randint(0, 40, (2, 21))
    with torch.no_grad():
        with use_backend("torch"):
            want = model(ids)
        with use_backend("triton"):
            got = model(ids)
    want, got = (t.logits if hasattr(t, "logits") else t for t in (want, got))
    assert_close(got, want, name="logits", rel=1e-5)
