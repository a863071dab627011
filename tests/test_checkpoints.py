"""Checkpoint directories: bit-exact round trips in each format, sharding, tokenizers, `mambakit convert`,
and a clear error for every kind of bad checkpoint (the transformers parity tests are in
test_parity_transformers.py)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoints import (CheckpointError, convert_checkpoint, load_checkpoint_tokenizer, load_pretrained,
                                  save_pretrained)
from mambakit.cli import UsageError
from mambakit.cli import convert as convert_cli
from mambakit.data import ByteTokenizer, HFTokenizer, load_tokenizer

CONFIGS = {
    "mamba1-tied-vocab37": dict(d_model=32, n_layer=2, vocab_size=37, ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba1-untied-vocab101-bias": dict(
        d_model=16, n_layer=2, vocab_size=101, pad_vocab_size_multiple=1, tie_embeddings=False,
        ssm_cfg={"layer": "Mamba1", "d_state": 4, "dt_rank": 3, "bias": True, "conv_bias": False}),
    "mamba2-untied-vocab37": dict(d_model=32, n_layer=2, vocab_size=37, tie_embeddings=False,
                                  ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}),
    # what only the reference formats hold: gated MLP, LayerNorm, d_ssm < d_inner, per-channel D, grouped norm
    "mamba2-mlp-layernorm-groups": dict(
        d_model=32, n_layer=2, vocab_size=101, d_intermediate=48, rms_norm=False, residual_in_fp32=False,
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "d_ssm": 32, "D_has_hdim": True,
                 "chunk_size": 8}),
}
HF_EXPRESSIBLE = ["mamba1-tied-vocab37", "mamba1-untied-vocab101-bias", "mamba2-untied-vocab37"]


def make_model(name: str, dtype: torch.dtype = torch.float32) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(**CONFIGS[name]), dtype=dtype).eval()
    with torch.no_grad():  # D = 1 and zero biases at init would hide a swapped tensor: move every parameter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_bpe(directory) -> HFTokenizer:
    """A tiny byte-level BPE tokenizer.json trained here (no hub), with <|endoftext|> as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["To be, or not to be: that is the question."] * 50, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory / "tokenizer.json")


def assert_same_model(loaded: MambaLM, original: MambaLM) -> None:
    """Bit-exact: config, every tensor and its dtype, the tying, and the logits."""
    assert loaded.config.to_dict() == original.config.to_dict()
    a, b = loaded.state_dict(), original.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == original.config.tie_embeddings
    ids = torch.randint(0, original.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids), original(ids))


ROUND_TRIPS = [pytest.param(name, fmt, torch.float32, id=f"{fmt}-{name}") for fmt in ("mambakit", "mamba_ssm")
               for name in CONFIGS]
ROUND_TRIPS += [pytest.param(name, "hf", torch.float32, id=f"hf-{name}") for name in HF_EXPRESSIBLE]
ROUND_TRIPS += [pytest.param("mamba2-mlp-layernorm-groups", fmt, torch.bfloat16, id=f"{fmt}-bf16")
                for fmt in ("mambakit", "mamba_ssm")]
ROUND_TRIPS += [pytest.param("mamba1-tied-vocab37", "hf", torch.bfloat16, id="hf-bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt, dtype", ROUND_TRIPS)
def test_round_trip_is_bit_exact(tmp_path, name, fmt, dtype):
    model = make_model(name, dtype)
    save_pretrained(model, tmp_path / "ckpt", format=fmt)
    loaded = MambaLM.from_pretrained(tmp_path / "ckpt")
    assert_same_model(loaded, model)
    assert not loaded.training


def test_mamba_ssm_layout_is_what_mamba_ssm_reads(tmp_path):
    """config.json with mamba_ssm's fields only; pytorch_model.bin with every key (its load is strict), tied once."""
    model = make_model("mamba1-tied-vocab37")
    save_pretrained(model, tmp_path, format="mamba_ssm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert set(cfg) == {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                        "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert state["lm_head.weight"].untyped_storage().data_ptr() == \
        state["backbone.embedding.weight"].untyped_storage().data_ptr()


def test_hf_layout(tmp_path):
    """transformers' names and fields; a tied head left out; padded vocabulary rows listed in suppress_tokens."""
    model = make_model("mamba1-tied-vocab37")
    save_pretrained(model, tmp_path, format="hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["vocab_size"]) == ("mamba", ["MambaForCausalLM"], 40)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["state_size"]) == (32, 2, 8)
    assert cfg["tie_word_embeddings"] is True
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "backbone.embeddings.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((tmp_path / "generation_config.json").read_text())["suppress_tokens"] == [37, 38, 39]


@pytest.mark.parametrize("fmt", [pytest.param("hf", id="hf"), pytest.param("mambakit", id="mambakit")])
def test_sharded_safetensors(tmp_path, fmt):
    model = make_model("mamba2-untied-vocab37")
    save_pretrained(model, tmp_path, format=fmt, max_shard_size=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_model(load_pretrained(tmp_path), model)


@pytest.mark.slow
def test_saving_again_replaces_stale_weight_files(tmp_path):
    """A sharded save followed by a single-file one leaves no shard or index behind; other files stay."""
    model = make_model("mamba2-untied-vocab37")
    (tmp_path / "train_state.pt").write_bytes(b"keep me")
    save_pretrained(model, tmp_path, format="hf", max_shard_size=20_000)
    save_pretrained(model, tmp_path, format="mamba_ssm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin", "train_state.pt"]
    assert_same_model(load_pretrained(tmp_path), model)


def test_reads_older_hf_embedding_name_and_pytorch_bin(tmp_path):
    """Older transformers files: backbone.embedding.weight (no s), in a pytorch_model.bin."""
    model = make_model("mamba1-untied-vocab101-bias")
    save_pretrained(model, tmp_path, format="hf")
    state = load_file(tmp_path / "model.safetensors")
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_model(load_pretrained(tmp_path), model)


def test_reads_published_mamba_ssm_layout(tmp_path):
    """state-spaces/mamba-130m's files: an older config.json (no tie_embeddings, d_intermediate, attn_*) and a
    torch.save'd state dict that holds the tied head under both names."""
    model = make_model("mamba1-tied-vocab37")
    (tmp_path / "config.json").write_text(json.dumps(
        {"d_model": 32, "n_layer": 2, "vocab_size": 37, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
         "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_pretrained(tmp_path)
    assert loaded.config.layer == "Mamba1" and loaded.config.tie_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_key_map_aliases_are_read_only():
    """An older spelling listed after the canonical rule is accepted on read, never written."""
    from mambakit.checkpoints.huggingface import KEY_MAP

    assert KEY_MAP.to_ours("backbone.embeddings.weight") == KEY_MAP.to_ours("backbone.embedding.weight") \
        == "backbone.embedding.weight"
    assert KEY_MAP.to_theirs("backbone.embedding.weight") == "backbone.embeddings.weight"
    assert KEY_MAP.to_ours("backbone.layers.11.mixer.conv1d.weight") == "backbone.layers.11.mixer.conv1d.weight"
    assert KEY_MAP.to_ours("backbone.layers.x.mixer.D") is None and KEY_MAP.to_ours("model.embed_tokens.weight") is None


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float64, id="fp64")])
def test_load_with_dtype(tmp_path, dtype):
    model = make_model("mamba2-untied-vocab37")
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=dtype)
    assert loaded.backbone.embedding.weight.dtype == dtype
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].to(v.dtype)), k


# ---------------------------------------------------------------- bad checkpoints


def _edit_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(directory, edit) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    edit(cfg)
    (directory / "config.json").write_text(json.dumps(cfg))


def _truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _replace_norm_f(state):
    state["backbone.norm_f.weight"] = torch.ones(31)


def _untie_head(state):
    state["lm_head.weight"] = state["backbone.embedding.weight"] + 1


def _drop_shard(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    (directory / sorted(set(index["weight_map"].values()))[-1]).unlink()


BAD = [
    pytest.param("mamba1-tied-vocab37", "mambakit",
                 lambda d: _edit_weights(d, lambda s: s.pop("backbone.layers.1.mixer.D")),
                 r"missing keys \['backbone\.layers\.1\.mixer\.D'\], unexpected keys \[\]", id="missing-key"),
    pytest.param("mamba1-tied-vocab37", "hf",
                 lambda d: _edit_weights(d, lambda s: s.pop("backbone.embeddings.weight")),
                 r"missing keys \['backbone\.embeddings\.weight'\]", id="missing-key-named-as-in-hf-file"),
    pytest.param("mamba2-untied-vocab37", "mambakit", lambda d: _edit_weights(d, lambda s: s.pop("lm_head.weight")),
                 r"missing keys \['lm_head\.weight'\]", id="untied-head-missing"),
    pytest.param("mamba1-tied-vocab37", "mambakit",
                 lambda d: _edit_weights(d, lambda s: s.update({"backbone.layers.0.mixer.extra": torch.ones(2),
                                                                "rotary.inv_freq": torch.ones(2)})),
                 r"missing keys \[\], unexpected keys \['backbone\.layers\.0\.mixer\.extra', 'rotary\.inv_freq'\]",
                 id="unexpected-keys"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: _edit_weights(d, _replace_norm_f),
                 r"backbone\.norm_f\.weight has shape \(31,\), config\.json needs \(32,\)", id="shape-mismatch"),
    pytest.param("mamba1-tied-vocab37", "mambakit",
                 lambda d: _edit_config(d, lambda c: c["ssm_cfg"].update(d_state=4)),
                 r"backbone\.layers\.0\.mixer\.A_log has shape \(64, 8\), config\.json needs \(64, 4\)",
                 id="config-disagrees-with-weights"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: _edit_weights(d, _untie_head),
                 r"ties the LM head to the embedding, but lm_head\.weight holds different values",
                 id="tied-head-differs"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: _truncate(d / "model.safetensors", 0.5),
                 r"model\.safetensors: cannot read this safetensors file .*truncated or corrupt",
                 id="truncated-safetensors"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: (d / "model.safetensors").write_bytes(b"\x93garbage" * 9),
                 r"model\.safetensors: cannot read this safetensors file .*truncated or corrupt",
                 id="garbage-safetensors"),
    pytest.param("mamba1-tied-vocab37", "mamba_ssm", lambda d: _truncate(d / "pytorch_model.bin", 0.6),
                 r"pytorch_model\.bin: cannot read this PyTorch weights file .*truncated or corrupt",
                 id="truncated-bin"),
    pytest.param("mamba2-untied-vocab37", "hf-sharded", _drop_shard, r"shard files listed but not found: \['model-0000",
                 id="missing-shard"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: (d / "model.safetensors").unlink(),
                 r"no weights found: expected model\.safetensors", id="no-weights"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: (d / "config.json").write_text("{\"d_model\": 32,"),
                 r"config\.json: not a readable JSON file", id="corrupt-config"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: (d / "config.json").unlink(), r"no config\.json found",
                 id="no-config"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: (d / "config.json").write_text('{"hidden": 3}'),
                 r"neither a mamba_ssm/mambakit config .* nor a Hugging Face one", id="unknown-config-schema"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: _edit_config(d, lambda c: c.update(n_heads=4)),
                 r"unknown config keys \['n_heads'\]", id="unknown-config-key"),
    pytest.param("mamba1-tied-vocab37", "mambakit", lambda d: _edit_config(d, lambda c: c["ssm_cfg"].update(d_stat=4)),
                 r"ssm_cfg holds \['d_stat'\], which mambakit's Mamba1 does not take", id="unknown-ssm-cfg-key"),
    pytest.param("mamba2-untied-vocab37", "mambakit",
                 lambda d: _edit_config(d, lambda c: c.update(attn_layer_idx=[1], attn_cfg={"num_heads": 4})),
                 r"missing keys \['backbone\.layers\.1\.mixer\.in_proj\.bias', .*unexpected keys "
                 r"\['backbone\.layers\.1\.mixer\.A_log'", id="attention-layer-over-mamba-weights"),
    pytest.param("mamba2-untied-vocab37", "mambakit",
                 lambda d: _edit_config(d, lambda c: c.update(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "window": 3})),
                 r"attn_cfg \{'num_heads': 4, 'window': 3\} does not build an attention layer .*'window'",
                 id="unknown-attn-cfg-key"),
    pytest.param("mamba1-tied-vocab37", "hf", lambda d: _edit_config(d, lambda c: c.update(model_type="falcon_mamba")),
                 r"model_type 'falcon_mamba' .* is not supported: mambakit reads 'mamba' \(MambaForCausalLM\)",
                 id="hf-unsupported-model-type"),
]


@pytest.mark.parametrize("name, fmt, damage, message", BAD)
def test_bad_checkpoint_is_a_clear_error(tmp_path, name, fmt, damage, message):
    sharded = fmt == "hf-sharded"
    save_pretrained(make_model(name), tmp_path, format="hf" if sharded else fmt,
                    max_shard_size=20_000 if sharded else None)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)  # the message says which checkpoint


def test_hub_id_is_a_clear_error_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    from huggingface_hub import constants  # offline, an empty cache: tests/test_hub.py has the full story

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    message = r"'state-spaces/mamba-130m' \(revision 'main', Hugging Face cache .*\) is not a local directory"
    with pytest.raises(CheckpointError, match=message):
        MambaLM.from_pretrained("state-spaces/mamba-130m")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"'file\.bin' is a file, not a directory"):
        load_pretrained("file.bin")


HF_REFUSED = [
    pytest.param(dict(d_intermediate=48), r"a gated MLP after each mixer \(d_intermediate=48\)", id="mlp"),
    pytest.param(dict(rms_norm=False), r"LayerNorm instead of RMSNorm \(rms_norm=False\)", id="layernorm"),
    pytest.param(dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "norm_ngroups": 4}),
                 r"a gated RMSNorm over 4 groups \(transformers normalises the whole width or each of the n_groups=2",
                 id="gated-norm-groups-not-ssd-groups"),
    pytest.param(dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "D_has_hdim": True}),
                 r"D per channel", id="D-per-channel"),
    pytest.param(dict(ssm_cfg={"layer": "Mamba1", "expand": 1.5}), r"a fractional expand=1\.5", id="fractional-expand"),
]


@pytest.mark.parametrize("change, message", HF_REFUSED)
def test_hf_format_refuses_what_transformers_cannot_compute(tmp_path, change, message):
    model = MambaLM(MambaConfig(**{**CONFIGS["mamba1-tied-vocab37"], **change}))
    with pytest.raises(CheckpointError, match=message):
        save_pretrained(model, tmp_path / "out", format="hf")
    assert not (tmp_path / "out" / "config.json").exists()


def test_mamba_ssm_format_refuses_shards_and_unknown_formats(tmp_path):
    model = make_model("mamba1-tied-vocab37")
    with pytest.raises(CheckpointError, match=r"mamba_ssm reads no shards"):
        save_pretrained(model, tmp_path, format="mamba_ssm", max_shard_size=1000)
    with pytest.raises(CheckpointError, match=r"format must be one of \('mambakit', 'mamba_ssm', 'hf'\), got 'gguf'"):
        save_pretrained(model, tmp_path, format="gguf")


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("fmt", [pytest.param(f, id=f) for f in ("mambakit", "mamba_ssm", "hf")])
@pytest.mark.parametrize("kind", [pytest.param("bytes", id="bytes"), pytest.param("bpe", id="bpe")])
def test_tokenizer_travels_with_the_checkpoint(tmp_path, fmt, kind):
    tok = ByteTokenizer() if kind == "bytes" else make_bpe(tmp_path / "tok")
    save_pretrained(make_model("mamba1-untied-vocab101-bias"), tmp_path / "ckpt", format=fmt, tokenizer=tok)
    for loader in (load_checkpoint_tokenizer, load_tokenizer):  # mambakit.data's own loader reads it as well
        back = loader(tmp_path / "ckpt")
        assert type(back) is type(tok) and back.eos_id == tok.eos_id
        assert back.encode("To be, or not") == tok.encode("To be, or not")
    if fmt == "hf":
        cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        assert cfg["eos_token_id"] == tok.eos_id


def test_hf_folder_tokenizer_config_is_read(tmp_path):
    """A Hugging Face model folder: transformers' tokenizer_config.json (no "type", eos as an AddedToken dict)."""
    tok = make_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPTNeoXTokenizer", "eos_token": {"content": "<|endoftext|>", "special": True}}))
    back = load_checkpoint_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer) and back.eos_id == tok.eos_id == 0


def test_convert_copies_tokenizer_files_and_completes_their_config(tmp_path):
    src = tmp_path / "src"
    tok = make_bpe(src)
    save_pretrained(make_model("mamba2-untied-vocab37"), src, format="hf")
    hf_fields = {"tokenizer_class": "GPTNeoXTokenizer", "eos_token": "<|endoftext|>", "model_max_length": 2048}
    (src / "tokenizer_config.json").write_text(json.dumps(hf_fields))
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    convert_checkpoint(src, tmp_path / "dst", to="mambakit")
    dst = tmp_path / "dst"
    assert (dst / "special_tokens_map.json").read_text() == (src / "special_tokens_map.json").read_text()
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {**hf_fields, "type": "hf"}
    assert load_tokenizer(dst).encode("not to be") == tok.encode("not to be")


# ---------------------------------------------------------------- mambakit convert


def test_convert_cli_through_every_format_is_exact(tmp_path, capsys):
    model = make_model("mamba1-tied-vocab37")
    save_pretrained(model, tmp_path / "a", tokenizer=ByteTokenizer())
    assert convert_cli.main(str(tmp_path / "a"), str(tmp_path / "b"), to="hf") == 0
    assert convert_cli.main(str(tmp_path / "b"), str(tmp_path / "c"), to="mamba_ssm") == 0
    assert convert_cli.main(str(tmp_path / "c"), str(tmp_path / "d"), to="mambakit") == 0
    assert_same_model(load_pretrained(tmp_path / "d"), model)
    assert isinstance(load_tokenizer(tmp_path / "d"), ByteTokenizer)
    first = capsys.readouterr().err.splitlines()[0]
    assert first == (f"wrote {tmp_path / 'b'} in the hf format: "
                     "config.json, generation_config.json, model.safetensors, tokenizer_config.json")


def test_convert_cli_casts_and_shards(tmp_path):
    model = make_model("mamba2-untied-vocab37")
    save_pretrained(model, tmp_path / "a")
    args = convert_cli.build_parser().parse_args([str(tmp_path / "a"), str(tmp_path / "b"), "--to", "hf",
                                                  "--dtype", "bfloat16", "--max-shard-size", "10KB"])
    assert convert_cli.main(**vars(args)) == 0
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 2
    loaded = load_pretrained(tmp_path / "b")
    assert loaded.backbone.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


CLI_ERRORS = [
    pytest.param(["convert", "{tmp}/missing", "{tmp}/out", "--to", "hf"],
                 "mambakit convert: error: '{tmp}/missing' is not a local directory", id="missing-source"),
    pytest.param(["convert", "{tmp}/a", "{tmp}/a", "--to", "hf"],
                 "mambakit convert: error: the destination {tmp}/a is the source directory", id="same-directory"),
    pytest.param(["convert", "{tmp}/a", "{tmp}/out", "--to", "hf"],
                 "mambakit convert: error: this model cannot be written in the Hugging Face format (transformers' "
                 "Mamba and Mamba-2 cannot compute it): a gated MLP", id="not-expressible"),
    pytest.param(["convert", "{tmp}/a", "{tmp}/out", "--to", "gguf"],
                 "mambakit convert: error: argument --to: invalid choice", id="bad-format"),
    pytest.param(["convert", "{tmp}/a", "{tmp}/out", "--to", "hf", "--max-shard-size", "lots"],
                 "mambakit convert: error: argument --max-shard-size: expected a size such as 5GB",
                 id="bad-shard-size"),
]


@pytest.mark.parametrize("argv, message", CLI_ERRORS)
def test_convert_cli_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    from mambakit.cli.__main__ import main

    save_pretrained(MambaLM(MambaConfig(**CONFIGS["mamba2-mlp-layernorm-groups"])), tmp_path / "a")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{tmp}", str(tmp_path))), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_convert_main_raises_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is not a local directory"):
        convert_cli.main(str(tmp_path / "missing"), str(tmp_path / "out"), to="mambakit")


@pytest.mark.slow
def test_hf_mamba2_gated_norm_grouping_follows_the_writing_transformers_version(tmp_path):
    """transformers < 5.23 normalises Mamba-2's gated output over the whole width, >= 5.23 per group (as
    mamba_ssm): the reader follows config.json's transformers_version, the writer stamps 5.23.0 on a
    per-group model, and both kinds round-trip with identical logits."""
    ids = torch.randint(0, 37, (2, 9))
    per_group = MambaLM(MambaConfig(**{**CONFIGS["mamba1-tied-vocab37"],
                                       "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2}}))
    save_pretrained(per_group, tmp_path / "new", format="hf")
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["transformers_version"] == "5.23.0" and cfg["n_groups"] == 2
    back = load_pretrained(tmp_path / "new")
    assert back.backbone.layers[0].mixer.norm.group_size == back.backbone.layers[0].mixer.d_ssm // 2
    with torch.no_grad():
        assert torch.equal(back(ids), per_group(ids))

    # the same file as transformers 5.22 would have written it: read with one norm group
    _edit_config(tmp_path / "new", lambda c: c.update(transformers_version="5.22.0"))
    old = load_pretrained(tmp_path / "new")
    assert old.backbone.layers[0].mixer.norm.group_size in (None, old.backbone.layers[0].mixer.d_ssm)
    _edit_config(tmp_path / "new", lambda c: c.pop("transformers_version"))
    assert load_pretrained(tmp_path / "new").backbone.layers[0].mixer.norm.group_size in (
        None, old.backbone.layers[0].mixer.d_ssm)

    # a whole-width model is written without a version stamp and reads back as it was
    whole = MambaLM(MambaConfig(**{**CONFIGS["mamba1-tied-vocab37"],
                                   "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2,
                                               "norm_ngroups": 1}}))
    save_pretrained(whole, tmp_path / "old", format="hf")
    assert "transformers_version" not in json.loads((tmp_path / "old" / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "old")(ids), whole(ids))
