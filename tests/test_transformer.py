"""TransformerLM (models/transformer.py): decoding consistency, ragged prefill, checkpoints, config checks, training."""

import json
import math

import pytest
import torch

from mambakit.checkpoints import CheckpointError
from mambakit.generation import generate
from mambakit.models import MambaConfig, MambaLM, TransformerConfig, TransformerLM, build_model

from .helpers import assert_close

SMALL = {
    "transformer++": dict(arch="transformer++", d_model=32, n_layer=2, vocab_size=61, num_heads=4),
    "transformer++-gqa-half-rotary": dict(arch="transformer++", d_model=32, n_layer=2, vocab_size=61, num_heads=4,
                                          num_heads_kv=2, rotary_emb_fraction=0.5, tie_embeddings=False),
    "gpt3": dict(arch="gpt3", d_model=32, n_layer=2, vocab_size=61, num_heads=4, max_position_embeddings=64),
}
CASES = [pytest.param(name, id=name) for name in SMALL]


def _model(name: str, dtype=torch.float64) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**SMALL[name])).to(dtype).eval()
    with torch.no_grad():  # zero biases and unit norms at init hide mistakes: randomise every parameter a little
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("prefix", [pytest.param(1, id="prefix1"), pytest.param(7, id="prefix7")])
def test_decode_equals_parallel_forward(name, prefix):
    """Prefill `prefix` tokens into the KV cache, then one token at a time: every logit equals the parallel forward's."""
    model = _model(name)
    ids = torch.randint(0, 61, (3, 19))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(3, dtype=torch.float64)
        parts = [model(ids[:, :prefix], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(prefix, 19)]
    assert cache.seqlen_offset == 19
    assert_close(torch.cat(parts, dim=1), full, name="logits, prefill + steps", rel=1e-10)


def test_attention_with_a_cache_sees_keys_of_the_capacity_so_its_shape_changes_only_when_the_cache_grows(monkeypatch):
    """Decode steps give SDPA the whole capacity (unused slots masked), so its key length changes only when the
    capacity doubles: on CUDA the cuDNN backend built a plan per new length (46 ms a token at the e2e shape)."""
    model = _model("transformer++")
    lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        lengths.append(k.shape[2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 61, (2, 150))
    with torch.no_grad():
        cache = model.allocate_cache(2, dtype=torch.float64)
        parts = [model(ids[:, :40], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(40, 150)]
    per_call = lengths[::model.config.n_layer]
    assert sorted(set(per_call)) == [64, 128, 256]  # the capacities (at least 64, doubling), not 40, 41, ... 149
    monkeypatch.undo()
    assert_close(torch.cat(parts, dim=1), model(ids), name="logits, prefill + steps over a padded cache", rel=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_ragged_batch_generates_what_each_prompt_generates_alone(name):
    """Left padding (seq_idx) leaks into no row: a batch of prompts of different lengths, chunked prefill included,
    generates per row exactly the tokens of that prompt alone (positions count from each row's first token)."""
    model = _model(name)
    prompts = [[5, 9, 2, 7, 7, 1, 30], [4], [11, 12, 13]]
    together = generate(model, prompts, 8, prefill_tokens_per_call=2)
    alone = [generate(model, [p], 8)[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("name", CASES)
def test_fixed_capacity_kv_cache_decodes_as_the_growing_one(name):
    """`KVState.fix_capacity` (what CUDAGraphDecoder gives a Transformer's caches): prefill, then one-token steps
    at the device-side slot, logits equal to the growing cache's; the cached tokens survive the change of
    capacity; a token past it raises instead of reallocating (a graph would go on reading the old buffers)."""
    from mambakit.modules.attention import KVState

    model = _model(name)
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        grown = model.allocate_cache(2, dtype=torch.float64)
        fixed = model.allocate_cache(2, dtype=torch.float64)
        expected = [model(ids[:, :6], cache=grown)] + [model(ids[:, t:t + 1], cache=grown) for t in range(6, 20)]
        got = [model(ids[:, :6], cache=fixed)]
        for state in fixed.layers:
            assert isinstance(state, KVState) and state.length == 6
            state.fix_capacity(20)
        got += [model(ids[:, t:t + 1], cache=fixed) for t in range(6, 20)]
        assert all(s.capacity == 20 and s.length == 20 and int(s.slot) == 20 for s in fixed.layers)
        assert_close(torch.cat(got, 1), torch.cat(expected, 1), name="logits, fixed capacity", rel=1e-10)
        with pytest.raises(ValueError, match="fixed capacity of 20"):
            model(ids[:, :1], cache=fixed)
        fixed.reset()
        assert all(s.length == 0 and int(s.slot) == 0 for s in fixed.layers)
        assert_close(model(ids[:, :3], cache=fixed), model(ids[:, :3]), name="after reset", rel=1e-10)
    with pytest.raises(ValueError, match="at least the 3 cached tokens"):
        fixed.layers[0].fix_capacity(2)
    if name == "gpt3":  # a replay would index past the learned position table, which the forward checks on the host
        from mambakit.generation import CUDAGraphDecoder

        with pytest.raises(ValueError, match="max_length 65 passes the model's 64 learned positions"):
            CUDAGraphDecoder(model, 1, max_length=65)
        assert CUDAGraphDecoder(model, 1, max_length=64).cache.layers[0].capacity == 64


@pytest.mark.parametrize("name", CASES)
def test_save_and_load_give_the_same_logits(tmp_path, name):
    model = _model(name, torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["arch"] == SMALL[name]["arch"]
    loaded = MambaLM.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is TransformerLM and loaded.config == model.config
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("fmt", [pytest.param("hf", id="hf"), pytest.param("mamba_ssm", id="mamba_ssm")])
def test_formats_without_transformers_are_refused(tmp_path, fmt):
    model = _model("transformer++", torch.float32)
    with pytest.raises(CheckpointError, match=f"mambakit format only.*format='{fmt}'"):
        model.save_pretrained(tmp_path / "ckpt", format=fmt)
    assert not (tmp_path / "ckpt").exists()


def test_transformer_pp_has_no_biases_and_rms_norms_gpt3_has_both():
    tpp = build_model(TransformerConfig(**SMALL["transformer++"]))
    gpt3 = build_model(TransformerConfig(**SMALL["gpt3"]))
    assert isinstance(tpp, TransformerLM) and isinstance(gpt3, TransformerLM)
    assert not [n for n, _ in tpp.named_parameters() if n.endswith(".bias")]
    assert tpp.backbone.pos_embedding is None and tpp.backbone.layers[0].mixer.rotary_emb_dim == 8
    assert type(tpp.backbone.norm_f).__name__ == "RMSNorm"
    assert {"backbone.layers.0.mixer.in_proj.bias", "backbone.layers.0.mlp.fc1.bias", "backbone.norm_f.bias"} <= \
        {n for n, _ in gpt3.named_parameters()}
    assert gpt3.backbone.layers[0].mixer.rotary_emb_dim == 0 and gpt3.backbone.pos_embedding.num_embeddings == 64
    # the MLPs hold the same 8 d_model^2 weights per layer: SwiGLU at 8/3 d_model (rounded to 128), GELU at 4 d_model
    assert TransformerConfig(arch="transformer++", d_model=384, num_heads=6).mlp_hidden == 1024
    assert TransformerConfig(arch="gpt3", d_model=384, num_heads=6).mlp_hidden == 1536


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(arch="llama"), "arch must be one of", id="bad-arch"),
    pytest.param(dict(d_model=30, num_heads=4), r"d_model \(30\) must be divisible by num_heads \(4\)", id="heads"),
    pytest.param(dict(num_heads=4, num_heads_kv=3), r"num_heads \(4\) must be a multiple of num_heads_kv \(3\)",
                 id="kv-heads"),
    pytest.param(dict(n_layer=0), "n_layer must be a positive int, got 0", id="n-layer"),
    pytest.param(dict(rotary_emb_fraction=1.5), r"rotary_emb_fraction must be in \[0, 1\]", id="rotary"),
])
def test_bad_config_names_the_field(kwargs, message):
    base = dict(d_model=32, n_layer=2, vocab_size=61, num_heads=4)
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**base, **kwargs})


def test_gpt3_beyond_its_learned_positions_is_a_clear_error():
    model = _model("gpt3")
    cache = model.allocate_cache(1, dtype=torch.float64)
    with torch.no_grad():
        model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="64 learned positions .* reaches position 64"):
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("arch", [pytest.param("transformer++", id="transformer++"), pytest.param("gpt3", id="gpt3")])
def test_mambakit_train_arch_trains_saves_and_generates(tmp_path, capsys, arch):
    """`mambakit train --arch ARCH`: the shared trainer, checkpoint and generate command run a Transformer."""
    from mambakit.cli.__main__ import main

    (tmp_path / "data").mkdir()
    for i in range(12):
        (tmp_path / "data" / f"d{i}.txt").write_text("the rest is silence\n" * 20)
    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny", "--arch", arch, "--data", str(tmp_path / "data"), "--max-steps", "4",
                 "--seqlen", "32", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"recipe data: {arch}" in printed and "bits/byte" in printed
    model = MambaLM.from_pretrained(out)
    assert type(model) is TransformerLM and model.config.arch == arch
    assert main(["generate", "--model", str(out), "--prompt", "the rest", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the rest")
    # its KV cache grows, so no CUDA graph: asked for by name it is a usage error, by default it decodes eagerly
    # (on CUDA the default used to capture a graph and raise, session 23)
    assert main(["generate", "--model", str(out), "--prompt", "the rest", "--max-new-tokens", "5", "--cuda-graph"]) == 2
    assert "attention layers" in capsys.readouterr().err


def test_generate_command_captures_cuda_graphs_by_default_only_without_attention(tmp_path, monkeypatch):
    """What `mambakit generate` passes to `stream` as cuda_graph, without --cuda-graph: True for a Mamba model, False
    for a Transformer (a graph of its decode step raised on CUDA, where the default took it)."""
    import mambakit.generation as generation
    from mambakit.cli.__main__ import main
    from mambakit.data import ByteTokenizer

    seen = []

    def fake_stream(model, prompt_ids, max_new_tokens, **kw):
        seen.append(kw["cuda_graph"])
        return iter(())

    monkeypatch.setattr(generation, "stream", fake_stream)
    transformer = TransformerConfig(**{**SMALL["transformer++"], "vocab_size": 256})
    for name, model in [("mamba", MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=256))),
                        ("transformer", build_model(transformer))]:
        model.save_pretrained(tmp_path / name, tokenizer=ByteTokenizer())
        assert main(["generate", "--model", str(tmp_path / name), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    assert seen == [True, False]


# ---------------------------------------------------------------- the ablation mixer (modules/mamba1_ablation.py)

SELECTIVITY = [pytest.param(dt, b, c, id=f"dt{int(dt)}-B{int(b)}-C{int(c)}")
               for dt, b, c in [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
                                (True, True, False), (True, True, True)]]


@pytest.mark.parametrize("dt, b, c", SELECTIVITY)
def test_ablation_mixer_decode_equals_parallel_forward(dt, b, c):
    """Mamba1Ablation in a MambaLM: prefill + steps equal the parallel forward, and every used parameter gets a
    gradient (the constant B, C and the dt bias of a non-selective Δ included)."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=61,
                      ssm_cfg={"layer": "Mamba1Ablation", "d_state": 8, "selective_dt": dt, "selective_B": b,
                               "selective_C": c})
    model = MambaLM(cfg).double().eval()
    ids = torch.randint(0, 61, (3, 13))
    full = model(ids)
    with torch.no_grad():
        cache = model.allocate_cache(3, dtype=torch.float64)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 13)]
    assert_close(torch.cat(parts, dim=1), full, name="logits, prefill + steps", rel=1e-10)
    full.square().mean().backward()
    mixer = model.backbone.layers[0].mixer
    used = [mixer.dt_proj.bias] + ([mixer.B_param] if not b else []) + ([mixer.C_param] if not c else []) \
        + ([mixer.dt_proj.weight] if dt else []) + ([mixer.x_proj.weight] if (dt or b or c) else [])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)
    assert (mixer.x_proj is None) == (not (dt or b or c))


def test_ablation_mixer_with_every_flag_on_is_mamba1():
    from mambakit.modules import Mamba1, Mamba1Ablation

    reference = Mamba1(32, d_state=8).double()
    ablation = Mamba1Ablation(32, d_state=8).double()
    ablation.load_state_dict(reference.state_dict())  # the same parameters, names and shapes
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    assert_close(ablation(x), reference(x), name="Mamba1Ablation(all selective) vs Mamba1", rel=1e-12)

# ---------------------------------------------------------------- reproduce lm-scaling / ablations (--quick)


@pytest.mark.slow
def test_reproduce_lm_scaling_quick_through_the_cli(tmp_path, capsys):
    """Four families at two sizes, a learning-rate sweep, the table and the plot: the whole pipeline on CPU."""
    from mambakit.cli.__main__ import main

    out = tmp_path / "lm-scaling"
    assert main(["reproduce", "lm-scaling", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = [r for r in results["rows"] if not r.get("sweep")]
    assert {r["family"] for r in rows} == {"mamba1", "mamba2", "transformer++", "hybrid"}
    assert len(rows) == 8 and all(r["val_ppl"] > 1 and r["flops"] > 0 and r["steps"] >= 2 for r in rows)
    # the swept family used the rate with the lowest held-out loss at the smallest size, for both sizes
    sweep = [r for r in results["rows"] if r["family"] == "transformer++" and r["d_model"] == 16]
    best = min(sweep, key=lambda r: r["val_loss"])["lr"]
    assert len(sweep) == 2 and results["settings"]["chosen_lr"]["transformer++"] == best
    assert {r["lr"] for r in rows if r["family"] == "transformer++"} == {best}
    readme = (out / "README.md").read_text()
    assert "| Transformer++ |" in readme and "Tokenizer: bytes" in readme and "--quick" in readme
    # a rate chosen at the top of its grid is flagged (only the swept family has more than one rate)
    assert ("The rate chosen for Transformer++ is its grid's largest" in readme) == (best == 6e-3)
    assert "The rate chosen for Mamba" not in readme
    assert (out / "perplexity_vs_flops.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_ablations_quick(tmp_path):
    from mambakit.reproduce import FINISHED, reproduce

    assert reproduce("ablations", tmp_path, quick=True, device="cpu", progress=False) == FINISHED
    results = json.loads((tmp_path / "results.json").read_text())
    tables = {r["table"] for r in results["rows"]}
    assert tables == {"Table 6", "Table 7", "Table 8", "Table 9", "Table 10"}
    selective = [r["ssm_cfg"] for r in results["rows"] if r["table"] == "Table 7"]
    assert {(c["selective_dt"], c["selective_B"], c["selective_C"]) for c in selective} == {
        (False, False, False), (True, False, False), (False, True, False), (False, False, True), (False, True, True),
        (True, True, True)}
    assert all(math.isfinite(r["val_ppl"]) for r in results["rows"])
    readme = (tmp_path / "README.md").read_text()
    assert "## Table 10: state size N" in readme and "N = 4, constant B, C" in readme
    assert "](bits_per_byte_by_row.png)" in readme and (tmp_path / "bits_per_byte_by_row.png").stat().st_size > 0


def test_ablations_train_a_config_spelled_with_its_defaults_once():
    """Full size (d_model 128): Table 9's R = 8 and R = auto are the default Mamba of Tables 6 and 8, and Table 10's
    N = 16 rows are Table 7's; every other row is a model of its own."""
    from mambakit.reproduce import ablations

    s = ablations.settings(False)
    key = {(table, label): ablations._key(ablations.normalised(cfg, s["d_model"]))
           for table, _, rows in ablations.groups(s) for label, cfg in rows}
    mamba = key[("Table 6", "Mamba block, S6 (Mamba)")]
    assert key[("Table 9", "R = 8")] == key[("Table 9", "R = 8 (auto: d_model / 16)")] == mamba
    assert key[("Table 10", "N = 16, selective B, C")] == key[("Table 7", "Δ, B, C (Mamba)")] != mamba
    assert key[("Table 10", "N = 16, constant B, C")] == key[("Table 7", "Δ")]
    assert key[("Table 9", "R = 4")] != mamba and key[("Table 10", "N = 8, selective B, C")] != mamba
    assert (len(key), len(set(key.values()))) == (29, 22)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["transformer++", "gpt3"])
def test_cuda_graph_decoding_of_a_transformer_equals_eager(name):
    """On CUDA: the decode step of a Transformer captured with fixed-capacity KV caches and replayed gives the
    eager (growing-cache) tokens and log-probabilities for a ragged batch, twice from the same decoder; a replay
    past the capacity raises before it runs."""
    from mambakit.generation import CUDAGraphDecoder

    model = _model(name, torch.float32).cuda()
    prompts = [[5, 9, 2, 7, 7, 1, 30], [4], [11, 12, 13]]
    decoder = CUDAGraphDecoder(model, batch_size=3, max_length=7 + 12)
    assert decoder.graphed
    eager, eager_lp = generate(model, prompts, 12, return_logprobs=True)
    for _ in range(2):
        graphed, graphed_lp = generate(model, prompts, 12, cuda_graph=decoder, return_logprobs=True)
        assert graphed == eager
        assert_close(torch.tensor(graphed_lp), torch.tensor(eager_lp), name="log-probabilities", rel=1e-4)
    assert all(s.length == 7 + 11 for s in decoder.cache.layers)
    decoder(torch.zeros(3, dtype=torch.long, device="cuda"))  # the last slot
    with pytest.raises(ValueError, match="fixed capacity of 19 tokens is full"):
        decoder(torch.zeros(3, dtype=torch.long, device="cuda"))
