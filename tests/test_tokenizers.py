"""Every tokenizer a checkpoint ships (tokenizer.json, sentencepiece tokenizer.model, transformers-only folders),
special tokens from the checkpoint's configs, chat templates rendered as transformers renders them, and
streaming detokenization in linear time."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoints import CheckpointError, convert_checkpoint, load_checkpoint_tokenizer
from mambakit.cli.__main__ import main
from mambakit.data import (ByteTokenizer, DataError, HFTokenizer, IncrementalDecoder, SentencePieceTokenizer,
                           TransformersTokenizer, load_tokenizer)
from mambakit.data.chat import apply_chat_template, render_chat_template
from mambakit.generation import generate

CORPUS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
          "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
          "Café au lait, naïve façade, Tōkyō 東京 and 🐍 snakes."] * 20
TEXTS = [
    pytest.param("To be, or not to be", id="ascii"),
    pytest.param("naïve café, Tōkyō 東京 🐍!", id="multibyte"),
    pytest.param("  leading spaces and\ttabs\nnew lines  ", id="whitespace"),
]


# ---------------------------------------------------------------- tokenizers laid out as checkpoints ship them


SP_VOCAB = 400  # byte fallback alone takes 256 pieces


def _sentencepiece_model(path, model_type: str = "bpe") -> None:
    """Train a small sentencepiece model (byte fallback: every character round-trips) and write it to `path`."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=SP_VOCAB, model_type=model_type,
        hard_vocab_limit=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        user_defined_symbols=["<|user|>"], minloglevel=2)
    path.write_bytes(model.getvalue())


def _bpe(directory=None, normalize: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if normalize:
        tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "</s>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.mark.parametrize("model_type", [pytest.param("bpe", id="bpe"), pytest.param("unigram", id="unigram")])
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_trained_here_loads_and_round_trips(tmp_path, model_type, text):
    _sentencepiece_model(tmp_path / "tokenizer.model", model_type)
    tok = SentencePieceTokenizer(tmp_path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ids = tok.encode(text)
    assert ids == reference.encode(text)  # the text between special tokens goes to sentencepiece unchanged
    assert tok.decode(ids) == text
    assert tok.eos_id == 2 and tok.vocab_size == reference.get_piece_size()
    assert tok.count_bytes(ids + [tok.eos_id] + ids) == 2 * len(text.encode()) + 1


def test_sentencepiece_special_tokens_in_text_and_added_tokens(tmp_path):
    _sentencepiece_model(tmp_path / "tokenizer.model")
    n = SentencePieceTokenizer(tmp_path).vocab_size
    tok = SentencePieceTokenizer(tmp_path, added_tokens={"<|im_start|>": n, "<|im_end|>": n + 1})
    ids = tok.encode("<s><|im_start|>user To be<|im_end|></s>")
    assert ids[:2] == [1, n] and ids[-2:] == [n + 1, 2] and tok.vocab_size == n + 2
    assert tok.decode(ids) == "<s><|im_start|>user To be<|im_end|></s>"
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("no-such-piece") is None
    tok.save(tmp_path / "saved")  # mambakit's own layout: {"type": "sentencepiece"} + tokenizer.model
    back = load_tokenizer(tmp_path / "saved")
    assert isinstance(back, SentencePieceTokenizer) and back.encode("<|im_end|>To be") == tok.encode("<|im_end|>To be")


def test_sentencepiece_checkpoint_folder_reads_its_configs(tmp_path):
    """A Hugging Face folder with only tokenizer.model and transformers' configs (a Llama-style checkpoint) loads
    with sentencepiece; special tokens, added tokens and ids come from the configs."""
    _sentencepiece_model(tmp_path / "tokenizer.model")
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    n = reference.get_piece_size()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {str(n): {"content": "<|im_end|>", "special": True}}}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, n]}))
    tok = load_checkpoint_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size) == (1, 2, (2, n), n + 1)
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for text in ("To be, or not to be", "naïve café 東京"):
        assert tok.encode(text) == reference.encode(text)
        assert tok.encode(text + "<|im_end|>") == reference.encode(text) + [n]
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_travels_through_save_and_convert(tmp_path):
    _sentencepiece_model(tmp_path / "tokenizer.model")
    tok = SentencePieceTokenizer(tmp_path / "tokenizer.model")
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=tok.vocab_size,
                                ssm_cfg={"layer": "Mamba1", "d_state": 4}))
    model.save_pretrained(tmp_path / "kit", tokenizer=tok)
    convert_checkpoint(tmp_path / "kit", tmp_path / "hf", to="hf")
    for directory in ("kit", "hf"):
        back = load_checkpoint_tokenizer(tmp_path / directory)
        assert isinstance(back, SentencePieceTokenizer) and back.eos_id == 2
        assert back.encode("Tōkyō 東京") == tok.encode("Tōkyō 東京")


def test_transformers_only_folder_loads_through_autotokenizer(tmp_path):
    """vocab.json + merges.txt, no tokenizer.json: transformers' AutoTokenizer reads it."""
    bpe = _bpe()
    bpe.model.save(str(tmp_path))  # vocab.json, merges.txt
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    tok = load_checkpoint_tokenizer(tmp_path)
    assert isinstance(tok, TransformersTokenizer)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    text = "To be, or not to be"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == reference.eos_token_id == tok.bos_id


# ---------------------------------------------------------------- special tokens from the configs


def test_special_tokens_come_from_the_configs(tmp_path):
    bpe = _bpe()
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", bos_token="<|endoftext|>").save_pretrained(
        tmp_path)
    im_end = bpe.token_to_id("<|im_end|>")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "pad_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 1]}))
    tok = load_checkpoint_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == im_end and tok.stop_ids == (im_end, 1)  # generation_config.json first, then the name
    assert tok.bos_id == bpe.token_to_id("<|endoftext|>") and tok.pad_id == 0
    assert tok.special_tokens["eos_token"] == "</s>" and tok.special_tokens["pad_token"] == "<|endoftext|>"


def test_no_eos_is_guessed_from_token_names(tmp_path):
    """A folder whose configs name no end-of-sequence token has none, whatever its vocabulary holds."""
    PreTrainedTokenizerFast(tokenizer_object=_bpe()).save_pretrained(tmp_path)
    tok = load_checkpoint_tokenizer(tmp_path)
    assert tok.eos_id is None and tok.stop_ids == () and tok.token_to_id("<|endoftext|>") == 0


# ---------------------------------------------------------------- chat templates

CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ bos_token }}{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = ("{%- if tools %}{{ 'Tools: ' + tools | tojson(indent=2) }}\n{%- endif %}"
         "{%- for m in messages %}{%- if m.role == 'user' %}[U] {{ m.content | trim }}\n"
         "{%- elif m.role == 'assistant' %}{% generation %}[A] {{ m.content }}{{ eos_token }}{% endgeneration %}\n"
         "{%- else %}{{ raise_exception('unknown role ' + m.role) }}{%- endif %}"
         "{%- if loop.index >= 3 %}{% break %}{% endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}[A] {% endif %}")
MESSAGES = [{"role": "user", "content": "  Who's there? <b>&</b> 東京 "},
            {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
            {"role": "user", "content": "Long live the king!"},
            {"role": "assistant", "content": "dropped by {% break %}"}]


@pytest.mark.parametrize("template, saved_as", [
    pytest.param(CHATML, "chat_template.jinja", id="chatml-jinja-file"),
    pytest.param(TOOLS, "chat_template.jinja", id="tools-generation-break"),
    pytest.param(CHATML, "tokenizer_config", id="chatml-in-tokenizer-config"),
])
@pytest.mark.parametrize("add_generation_prompt", [pytest.param(True, id="gen-prompt"),
                                                   pytest.param(False, id="no-gen-prompt")])
def test_chat_template_renders_as_transformers(tmp_path, template, saved_as, add_generation_prompt):
    hf = PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="</s>", bos_token="<|endoftext|>")
    hf.chat_template = template
    hf.save_pretrained(tmp_path)
    if saved_as == "tokenizer_config":  # older transformers kept the template in tokenizer_config.json
        (tmp_path / "chat_template.jinja").unlink()
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    tok = load_checkpoint_tokenizer(tmp_path)
    tools = [{"name": "ghost", "parameters": {"type": "object", "description": "<spirit> & 'more'"}}]
    kwargs = dict(tools=tools) if template == TOOLS else {}
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    got = apply_chat_template(tok, MESSAGES, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected and len(got) > 50
    expected_ids = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt, **kwargs)
    assert tok.encode(got) == list(expected_ids)


def test_chat_template_errors(tmp_path):
    with pytest.raises(DataError, match="the chat template failed: unknown role robot"):
        render_chat_template(TOOLS, [{"role": "robot", "content": "beep"}])
    with pytest.raises(DataError, match="the chat template does not parse"):
        render_chat_template("{% for m in messages %}", MESSAGES)
    PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="</s>").save_pretrained(tmp_path)
    with pytest.raises(DataError, match="has no chat template"):
        apply_chat_template(load_checkpoint_tokenizer(tmp_path), MESSAGES)


@pytest.fixture
def chat_checkpoint(tmp_path):
    """A tiny random Mamba-2 LM in the "hf" format whose tokenizer has a ChatML template and stops at <|im_end|>."""
    torch.manual_seed(0)
    bpe = _bpe()
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=bpe.get_vocab_size(),
                                ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "chat", format="hf")
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(tmp_path / "chat")
    return tmp_path / "chat", model


@pytest.mark.parametrize("fmt", ["mambakit", "hf"])
def test_saving_a_loaded_chat_tokenizer_keeps_its_template_and_special_tokens(chat_checkpoint, tmp_path, fmt):
    """What the configs gave the tokenizer (template, special names, every stop id, bos) survives a save: it was
    dropped by `save_pretrained(tokenizer=...)` and by training checkpoints."""
    directory, model = chat_checkpoint
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [
        _bpe().token_to_id("<|im_end|>"), _bpe().token_to_id("<|endoftext|>")]}))
    tok = load_checkpoint_tokenizer(directory)
    assert tok.chat_template == CHATML and len(tok.stop_ids) == 2 and tok.bos_id is not None
    model.save_pretrained(tmp_path / "saved", format=fmt, tokenizer=tok)
    back = load_checkpoint_tokenizer(tmp_path / "saved")
    assert back.chat_template == CHATML
    assert (back.eos_id, back.stop_ids, back.bos_id) == (tok.eos_id, tok.stop_ids, tok.bos_id)
    # (the "hf" format's config.json also names the end-of-document id as the pad id)
    assert {k: back.special_tokens.get(k) for k in tok.special_tokens} == tok.special_tokens
    messages = [{"role": "user", "content": "Who's there?"}]
    assert apply_chat_template(back, messages) == apply_chat_template(tok, messages)


def test_generate_chat_applies_the_template(chat_checkpoint, capsys):
    directory, model = chat_checkpoint
    assert main(["generate", "--model", str(directory), "--chat", "--prompt", "Who's there?", "--max-new-tokens",
                 "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    tok = load_checkpoint_tokenizer(directory)
    prompt = "<|endoftext|><|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(tok, [{"role": "user", "content": "Who's there?"}]) == prompt
    new = generate(model, [tok.encode(prompt)], 12, eos_token_id=tok.stop_ids)[0]
    expected = tok.decode(new[:-1] if new and new[-1] in tok.stop_ids else new)
    assert out == expected + "\n" and "Who's there" not in out
    (directory / "prompts.txt").write_text("Who's there?\n")
    assert main(["generate", "--model", str(directory), "--chat", "--prompts-file", str(directory / "prompts.txt"),
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == expected


def test_generate_chat_without_a_template_is_one_line(tmp_path, capsys):
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"layer": "Mamba1", "d_state": 4}))
    model.save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    assert main(["generate", "--model", str(tmp_path / "m"), "--chat", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambakit generate: error: ") and "has no chat template" in err and err.count("\n") == 1


# ---------------------------------------------------------------- streaming detokenization


def _streamed(tok, ids: list[int]) -> list[str]:
    dec = IncrementalDecoder(tok)
    return [dec.push(t) for t in ids] + [dec.flush()]


def _tokenizers(tmp_path):
    _sentencepiece_model(tmp_path / "tokenizer.model")
    _bpe().save(str(tmp_path / "tokenizer.json"))
    normalized = tmp_path / "norm"
    normalized.mkdir()
    _bpe(normalize=True).save(str(normalized / "tokenizer.json"))
    return {"bytes": ByteTokenizer(), "hf-bytelevel": HFTokenizer(tmp_path / "tokenizer.json"),
            "hf-nfkc": HFTokenizer(normalized), "sentencepiece": SentencePieceTokenizer(tmp_path)}


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in ("bytes", "hf-bytelevel", "hf-nfkc",
                                                                   "sentencepiece")])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_decoded_text(tmp_path, kind, text):
    tok = _tokenizers(tmp_path)[kind]
    ids = tok.encode(text * 3)
    pieces = _streamed(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text * 3
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in ("hf-bytelevel", "sentencepiece")])
def test_stream_ending_inside_a_character_flushes_what_is_left(tmp_path, kind):
    tok = _tokenizers(tmp_path)[kind]
    ids = tok.encode("to 🦀")  # not in the training text: byte pieces
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))  # inside the emoji
    pieces = _streamed(tok, ids[:cut])
    assert "".join(pieces) == tok.decode(ids[:cut]) and pieces[-1].endswith("\ufffd")


def test_window_decoder_decodes_each_token_a_bounded_number_of_times(tmp_path):
    """Linear time for tokenizers without DecodeStream: the ids decoded over a stream grow linearly with it
    (re-decoding everything at each token would decode n^2 / 2 of them)."""
    tok = _tokenizers(tmp_path)["sentencepiece"]
    decoded = []
    original = tok.decode

    def counting_decode(ids):
        decoded.append(len(ids))
        return original(ids)

    tok.decode = counting_decode
    ids = SentencePieceTokenizer(tmp_path).encode(" ".join(CORPUS))[:2000]
    text = "".join(_streamed(tok, ids))
    assert text == original(ids)
    assert sum(decoded) < 8 * len(ids), sum(decoded)


def test_decoder_of_a_checkpoint_loaded_with_transformers(tmp_path):
    bpe = _bpe()
    bpe.model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    tok = load_checkpoint_tokenizer(tmp_path)
    ids = tok.encode("naïve café 東京 🐍")
    assert "".join(_streamed(tok, ids)) == "naïve café 東京 🐍"


def test_broken_tokenizer_files_are_clear_errors(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"cannot load the checkpoint's tokenizer: .*not a valid sentencepiece"):
        load_checkpoint_tokenizer(tmp_path)
