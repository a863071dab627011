"""Parity with transformers' MambaForCausalLM / Mamba2ForCausalLM (the `test` extra installs transformers).

Both ways: models built and saved by transformers itself load into mambakit with the same logits
(float32) and the same greedy tokens; models saved by mambakit in the "hf" format load into
transformers (no missing or unexpected key) with the same logits and tokens. transformers runs its
PyTorch path here (no mamba_ssm / causal_conv1d kernels).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoints import convert_checkpoint, load_checkpoint_tokenizer, load_pretrained, save_pretrained

from .helpers import assert_close

RTOL = 1e-5  # float32 against float32: both sides compute the same sums in a different order

# transformers configs, built and saved by transformers. Odd vocabularies (transformers does not pad them).
HF_CASES = {
    "mamba1-tied-vocab37": lambda: MambaForCausalLM(HFMambaConfig(
        vocab_size=37, hidden_size=32, num_hidden_layers=2, state_size=8)),
    "mamba1-untied-vocab101-bias-rank3": lambda: MambaForCausalLM(HFMambaConfig(
        vocab_size=101, hidden_size=16, num_hidden_layers=2, state_size=4, tie_word_embeddings=False,
        use_bias=True, use_conv_bias=False, time_step_rank=3, expand=3)),
    "mamba1-eps1e-6-residual-not-fp32": lambda: MambaForCausalLM(HFMambaConfig(
        vocab_size=37, hidden_size=32, num_hidden_layers=2, state_size=8, layer_norm_epsilon=1e-6,
        residual_in_fp32=False)),
    "mamba2-untied-vocab37-groups1": lambda: Mamba2ForCausalLM(HFMamba2Config(
        vocab_size=37, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=8, head_dim=8, n_groups=1,
        chunk_size=8)),
    "mamba2-tied-vocab101-groups2": lambda: Mamba2ForCausalLM(HFMamba2Config(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=8, head_dim=8, n_groups=2,
        chunk_size=8, tie_word_embeddings=True)),
    "mamba2-groups4-eps1e-6-convk3": lambda: Mamba2ForCausalLM(HFMamba2Config(
        vocab_size=53, hidden_size=32, num_hidden_layers=2, state_size=4, num_heads=4, head_dim=16, n_groups=4,
        chunk_size=4, conv_kernel=3, layer_norm_epsilon=1e-6, use_bias=True)),
    # transformers' one-token step ignores time_step_limit (only its chunked path clamps dt), so this
    # case is compared on the parallel forward only
    "mamba2-dt-limit": lambda: Mamba2ForCausalLM(HFMamba2Config(
        vocab_size=37, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=4, head_dim=16, n_groups=1,
        chunk_size=8, time_step_limit=(0.0, 0.02))),
}
GREEDY_CASES = [name for name in HF_CASES if name != "mamba2-dt-limit"]

# mambakit configs saved by mambakit in the "hf" format
MK_CASES = {
    "mamba1-tied-vocab37-padded40": dict(d_model=32, n_layer=2, vocab_size=37,
                                         ssm_cfg={"layer": "Mamba1", "d_state": 8}),
    "mamba1-untied-vocab101": dict(d_model=16, n_layer=2, vocab_size=101, pad_vocab_size_multiple=1,
                                   tie_embeddings=False, ssm_cfg={"layer": "Mamba1", "d_state": 4, "bias": True}),
    "mamba2-untied-vocab37-padded48": dict(d_model=32, n_layer=2, vocab_size=37, pad_vocab_size_multiple=16,
                                           tie_embeddings=False,
                                           ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}),
    "mamba2-tied-groups2": dict(d_model=32, n_layer=2, vocab_size=101, pad_vocab_size_multiple=1,
                                ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8,
                                         "norm_ngroups": 1}),
}


def _randomise(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter (D = 1, zero biases, unit norms would hide swapped or dropped tensors)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _hf_model(name: str, tmp_path):
    torch.manual_seed(0)
    hf = HF_CASES[name]().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    return hf


def _hf_greedy(hf, ids: torch.Tensor, n: int) -> list[list[int]]:
    hf.generation_config.eos_token_id = None  # run the full n tokens, as mambakit does without an EOS
    with torch.no_grad():
        # an explicit mask: transformers would otherwise mask every prompt token equal to pad_token_id
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _assert_nontrivial(tokens: list[list[int]]) -> None:
    # identical greedy tokens mean little if the model repeats one token forever
    assert len({t for row in tokens for t in row}) > 3, tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in HF_CASES])
def test_transformers_checkpoint_gives_the_same_logits(tmp_path, name):
    hf = _hf_model(name, tmp_path)
    model = MambaLM.from_pretrained(tmp_path)
    assert model.config.padded_vocab_size == hf.config.vocab_size
    ids = torch.randint(0, hf.config.vocab_size, (2, 21))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert_close(got, expected, name=f"logits {name}", rel=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in GREEDY_CASES])
def test_transformers_checkpoint_gives_the_same_greedy_tokens(tmp_path, name):
    hf = _hf_model(name, tmp_path)
    model = MambaLM.from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 6))
    expected = _hf_greedy(hf, ids, 16)
    _assert_nontrivial(expected)
    assert model.generate(ids, 16) == expected


def _mk_model(name: str) -> MambaLM:
    """MK_CASES[name]; a Mamba-2 gated norm over the whole width (norm_ngroups 1) is what transformers < 5.23
    computes, per group what 5.23+ computes: the installed version decides which model is written."""
    from mambakit.checkpoints.huggingface import _norm_per_group

    torch.manual_seed(0)
    fields = {**MK_CASES[name], "ssm_cfg": dict(MK_CASES[name]["ssm_cfg"])}
    if _norm_per_group({"transformers_version": transformers.__version__}):
        fields["ssm_cfg"].pop("norm_ngroups", None)
    model = MambaLM(MambaConfig(**fields)).eval()
    _randomise(model)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in MK_CASES])
def test_mambakit_hf_checkpoint_loads_in_transformers(tmp_path, name):
    model = _mk_model(name)
    save_pretrained(model, tmp_path, format="hf")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched key
    assert isinstance(hf, MambaForCausalLM if model.config.layer == "Mamba1" else Mamba2ForCausalLM)
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids), name=f"logits {name}", rel=RTOL)
    # padded vocabulary rows: mambakit never samples them, and transformers is told not to either
    suppressed = list(range(model.config.vocab_size, model.config.padded_vocab_size))
    assert list(hf.generation_config.suppress_tokens or []) == suppressed
    prompt = ids[:, :6]
    expected = model.generate(prompt, 16)
    _assert_nontrivial(expected)
    assert _hf_greedy(hf, prompt, 16) == expected


def test_sharded_transformers_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = HF_CASES["mamba2-untied-vocab37-groups1"]().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 37, (2, 13))
    with torch.no_grad():
        assert_close(load_pretrained(tmp_path)(ids), hf(ids).logits, name="logits", rel=RTOL)


def test_conversion_chain_is_lossless_for_transformers(tmp_path):
    """transformers -> mambakit -> mamba_ssm -> hf: transformers reads back exactly the logits it started with."""
    hf = _hf_model("mamba1-untied-vocab101-bias-rank3", tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "kit", to="mambakit")
    convert_checkpoint(tmp_path / "kit", tmp_path / "ref", to="mamba_ssm")
    convert_checkpoint(tmp_path / "ref", tmp_path / "back", to="hf")
    back = MambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["To be, or not to be: that is the question."] * 50, trainer)
    return tok


def test_tokenizers_cross_both_ways(tmp_path):
    """A tokenizer saved by transformers loads with the checkpoint in mambakit, and mambakit's "hf" save loads
    in transformers."""
    text = "To be, or not to be"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(), eos_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "from_hf")
    _hf_model("mamba1-tied-vocab37", tmp_path / "from_hf")
    ours = load_checkpoint_tokenizer(tmp_path / "from_hf")
    assert ours.encode(text) == hf_tok(text)["input_ids"] and ours.eos_id == hf_tok.eos_token_id

    save_pretrained(MambaLM.from_pretrained(tmp_path / "from_hf"), tmp_path / "to_hf", format="hf", tokenizer=ours)
    back = AutoTokenizer.from_pretrained(tmp_path / "to_hf")
    assert back(text)["input_ids"] == ours.encode(text) and back.eos_token_id == ours.eos_id
    assert json.loads((tmp_path / "to_hf" / "config.json").read_text())["eos_token_id"] == ours.eos_id
