"""Fine-tuning on conversations (`mambakit train --task chat`, data.conversations): files read, conversations rendered
with a chat template, only the assistant's tokens scored (in the loss and in the held-out figures), each conversation
read from an empty state, the template and its stop strings saved with the model for `generate --chat` and `serve`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.checkpoints import load_checkpoint_tokenizer
from mambakit.cli.__main__ import main
from mambakit.data import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, ByteTokenizer, DataError, RandomWindows,
                           conversation_streams, encode_conversation, load_conversations, split_window)
from mambakit.evaluation import evaluate_stream
from mambakit.generation import StopTextFilter
from mambakit.models import MambaConfig, MambaLM
from mambakit.training import TrainConfig, forward_backward, load_train_state, train
from mambakit.training.loop import chat_reply
from tests.helpers import assert_close

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COLORS = {"red": "stop", "green": "go", "amber": "wait", "blue": "swim", "white": "snow", "black": "night"}


def _chat(user: str, answer: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _write_jsonl(path, conversations) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def _color_chats(n: int, seed: int = 0) -> list[list[dict]]:
    g = torch.Generator().manual_seed(seed)
    names = list(COLORS)
    out = []
    for _ in range(n):
        color = names[int(torch.randint(len(names), (1,), generator=g))]
        out.append(_chat(f"light {color}", COLORS[color]))
    return out


def _tiny_lm(layer: str, vocab: int = 256) -> MambaLM:
    torch.manual_seed(0)
    cfg = {"layer": layer, "d_state": 8} | ({"headdim": 8, "chunk_size": 8} if layer == "Mamba2" else {})
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=vocab, ssm_cfg=cfg))


# ---------------------------------------------------------------- files


def test_conversation_files_in_every_layout(tmp_path):
    a, b = _chat("hi", "yo"), _chat("q", "a", system="be brief")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.jsonl").write_text(json.dumps({"messages": a}) + "\n\n" + json.dumps(b) + "\n")
    (tmp_path / "d" / "2.json").write_text(json.dumps({"conversations": [a]}))
    (tmp_path / "d" / "3.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    (tmp_path / "d" / "notes.txt").write_text("not read")
    assert load_conversations(tmp_path / "d") == [a, b, a, a]
    (tmp_path / "list.json").write_text(json.dumps([b, {"messages": a}]))
    assert load_conversations(tmp_path / "list.json") == [b, a]


@pytest.mark.parametrize("line, message", [
    ("{not json", "1: not JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}),
     "starts with the assistant"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), "string \"role\" and"),
    (json.dumps({"text": "plain"}), "a conversation is a non-empty list"),
])
def test_malformed_conversations_are_named_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        load_conversations(path)


def test_missing_or_empty_data_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "none.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .json"):
        load_conversations(tmp_path / "empty")


# ---------------------------------------------------------------- rendering and the loss mask


def test_only_the_assistants_turns_are_scored_in_a_multi_turn_conversation():
    tok = ByteTokenizer()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Sure"}]
    ids, scored = encode_conversation(tok, conv, DEFAULT_CHAT_TEMPLATE)
    from mambakit.data.chat import render_chat_template

    assert tok.decode(ids) == render_chat_template(DEFAULT_CHAT_TEMPLATE, conv, add_generation_prompt=False)
    assert tok.decode([i for i, s in zip(ids, scored) if s]) == "Yo<|end|>\nSure<|end|>\n"
    # every token before the first scored one is exactly a chat request's prompt for that turn
    first = scored.index(True)
    assert tok.decode(ids[:first]) == render_chat_template(DEFAULT_CHAT_TEMPLATE, conv[:2], add_generation_prompt=True)


def test_a_chat_models_own_template_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["light red stop light green go"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    hf.chat_template = CHATML
    hf.save_pretrained(tmp_path)
    tok = load_checkpoint_tokenizer(tmp_path)
    ids, scored = encode_conversation(tok, _chat("light red", "stop"), tok.chat_template)
    assert tok.decode([i for i, s in zip(ids, scored) if s]) == "stop<|im_end|>\n"
    assert bpe.token_to_id("<|im_end|>") in [i for i, s in zip(ids, scored) if s]  # the stop token is learned
    prompt = hf.apply_chat_template([{"role": "user", "content": "light red"}], tokenize=False,
                                    add_generation_prompt=True)
    assert ids[:scored.index(True)] == tok.encode(prompt)


def test_a_template_that_rewrites_earlier_text_is_refused():
    # the last message is rendered differently from the others: more messages change the earlier text
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="does not extend its own text"):
        encode_conversation(ByteTokenizer(), _chat("a", "b"), template)


def test_streams_split_the_conversations_and_mark_their_starts(tmp_path):
    chats = [_chat(f"user {i}", f"answer {i}") for i in range(20)]
    data = conversation_streams(_write_jsonl(tmp_path / "c.jsonl", chats), ByteTokenizer(), 0.2)
    again = conversation_streams(tmp_path / "c.jsonl", ByteTokenizer(), 0.2)
    assert (data.n_train, data.n_val) == (16, 4) and torch.equal(data.val.tokens, again.val.tokens)
    tok = ByteTokenizer()
    for stream, n in ((data.train, 16), (data.val, 4)):
        assert stream.tokens.dtype == torch.uint8 and stream.scored.shape == stream.starts.shape == stream.tokens.shape
        assert int(stream.starts.sum()) == n and bool(stream.starts[0])
        assert not bool((stream.scored & stream.starts).any())  # a conversation never starts with a scored token
        pieces = torch.nonzero(stream.starts).flatten().tolist() + [len(stream)]
        texts = [tok.decode(stream.tokens[a:b].tolist()) for a, b in zip(pieces, pieces[1:])]
        assert all(t.startswith("<|user|>\nuser ") and t.endswith("<|end|>\n") for t in texts)
    assert [c[0]["content"] for c in data.val_conversations] == [
        t.split("\n")[1].split("<|end|>")[0] for t in
        [tok.decode(data.val.tokens[a:b].tolist()) for a, b in
         zip(torch.nonzero(data.val.starts).flatten().tolist(),
             torch.nonzero(data.val.starts).flatten().tolist()[1:] + [len(data.val)])]]


def test_split_window_masks_targets_and_restarts_at_conversation_starts():
    window = torch.tensor([[5, 6, 0, 7, 8, 9]])  # a 0 (the byte tokenizer's EOS) inside a conversation
    scored = torch.tensor([[False, False, True, False, True, True]])
    starts = torch.tensor([[False, False, False, True, False, False]])
    batch = split_window(window, 0, scored, starts)
    assert batch.targets.tolist() == [[IGNORE_INDEX, 0, IGNORE_INDEX, 8, 9]]
    assert batch.seq_idx.tolist() == [[0, 0, 0, 1, 1]]  # the starts, not the EOS, reset the state
    with pytest.raises(ValueError, match="scored must have the window's shape"):
        split_window(window, 0, scored[:, :3], starts)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_a_conversation_in_a_packed_window_reads_as_it_does_alone(layer):
    """With the starts' seq_idx each conversation's logits are those of the conversation alone from an empty state
    (what a chat request gives the model)."""
    tok = ByteTokenizer()
    model = _tiny_lm(layer).eval()
    convs = [encode_conversation(tok, _chat(u, a), DEFAULT_CHAT_TEMPLATE)[0] for u, a in (("ab", "c"), ("xyz", "w"))]
    window = torch.tensor([convs[0] + convs[1]])
    starts = torch.zeros_like(window, dtype=torch.bool)
    starts[0, 0] = starts[0, len(convs[0])] = True
    batch = split_window(torch.cat([window, window[:, :1]], dim=1), None, None,
                         torch.cat([starts, torch.ones(1, 1, dtype=torch.bool)], dim=1))
    with torch.no_grad():
        packed = model(batch.inputs, seq_idx=batch.seq_idx)
        second = model(torch.tensor([convs[1]]))
    torch.testing.assert_close(packed[0, len(convs[0]):], second[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunked", [True, False])
def test_the_loss_is_the_mean_over_the_assistants_targets(chunked):
    model = _tiny_lm("Mamba2")
    torch.manual_seed(1)
    window = torch.randint(1, 256, (3, 17))
    scored = torch.rand(3, 17) < 0.4
    batch = split_window(window, None, scored, torch.zeros_like(scored))
    loss = forward_backward(model, batch, 256, chunked_loss=chunked, scored_only=True)
    with torch.no_grad():
        logits = model(batch.inputs)[..., :256].float()
    keep = scored[:, 1:]
    expected = F.cross_entropy(logits[keep], window[:, 1:][keep])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # what the mask leaves out does not matter: other unscored targets give the same loss
    changed = window.clone()
    changed[:, 1:][~keep] = (changed[:, 1:][~keep] + 7) % 256
    model.zero_grad()
    batch2 = split_window(changed, None, scored, torch.zeros_like(scored))
    assert torch.equal(batch2.targets, batch.targets)


def test_held_out_figures_count_the_assistants_tokens_only(tmp_path):
    data = conversation_streams(_write_jsonl(tmp_path / "c.jsonl", _color_chats(40)), ByteTokenizer(), 0.25)
    model = _tiny_lm("Mamba1")
    result = evaluate_stream(model, data.val, seqlen=64, batch_size=4)
    assert result.tokens == int(data.val.scored[1:].sum()) == result.bytes  # bytes: one per byte token
    # by hand: each conversation alone, its scored targets' cross-entropy
    total, count = 0.0, 0
    starts = torch.nonzero(data.val.starts).flatten().tolist() + [len(data.val)]
    with torch.no_grad():
        for a, b in zip(starts, starts[1:]):
            ids = data.val.tokens[a:b].long()
            logits = model(ids[None, :-1])[0, :, :256].float()
            keep = data.val.scored[a + 1:b]
            total += float(F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum"))
            count += int(keep.sum())
    # every conversation fits a window of 64: each is read whole from its start, as above
    assert count == result.tokens
    assert math.isclose(result.loss, total / count, rel_tol=1e-4)
    # windows shorter than a conversation read it in pieces: the same targets, each scored once
    assert evaluate_stream(model, data.val, seqlen=8, batch_size=4).tokens == count


def test_training_windows_start_at_conversation_starts_and_carry_their_masks(tmp_path):
    data = conversation_streams(_write_jsonl(tmp_path / "c.jsonl", _color_chats(30)), ByteTokenizer(), 0.1)
    s, n, L = data.train, len(data.train), 100
    a = RandomWindows(s, seqlen=L, batch_size=64, seed=3)
    b = RandomWindows(s, seqlen=L, batch_size=64, seed=3)
    windows, scored, starts = a.next_batch_masked()
    assert torch.equal(windows, b.next_batch())  # one draw either way
    conv_starts = set(torch.nonzero(s.starts).flatten().tolist())
    padded = 0
    for row in range(64):
        begin = next(i for i in sorted(conv_starts) if torch.equal(s.tokens[i:i + L + 1].long(),
                                                                     windows[row, :min(L + 1, n - i)]))
        inside = min(L + 1, n - begin)
        assert bool(starts[row, 0]) and begin in conv_starts
        assert torch.equal(scored[row, :inside], s.scored[begin:begin + inside])
        assert torch.equal(starts[row, :inside], s.starts[begin:begin + inside])
        if inside < L + 1:  # past the stream's end: padding, never scored, a segment of its own
            padded += 1
            assert not scored[row, inside:].any() and bool(starts[row, inside]) and not windows[row, inside:].any()
    assert padded  # 64 draws among 27 conversations: the last ones (shorter than a window to the end) came up


def test_assistant_tokens_past_the_window_are_counted_and_reported(tmp_path, caplog):
    from mambakit.data.conversations import unreached_scored

    tok = ByteTokenizer()
    long_answer = "x" * 80
    data = _write_jsonl(tmp_path / "c.jsonl", [_chat("q", long_answer), _chat("hi", "yo")] * 6)
    chats = conversation_streams(data, tok, 0.2)
    far, scored, longest = unreached_scored(chats.train, 64)
    # the long conversation: "<|user|>\nq<|end|>\n<|assistant|>\n" is 31 bytes, its answer + "<|end|>\n" 88: the
    # answer's tokens at offsets 65 .. 118 of it are never a target of a 64-target window that starts where it does
    ids, mask = encode_conversation(tok, _chat("q", long_answer), DEFAULT_CHAT_TEMPLATE)
    per_long = sum(1 for i, m in enumerate(mask) if m and i > 64)
    n_long = sum(1 for c in load_conversations(data) if c[1]["content"] == long_answer) - sum(
        1 for c in chats.val_conversations if c[1]["content"] == long_answer)
    assert per_long > 0 and far == n_long * per_long
    assert scored == int(chats.train.scored.sum()) and longest == len(ids)
    assert unreached_scored(chats.train, len(ids))[0] == 0
    with caplog.at_level("WARNING", logger="mambakit.training"):
        train(_chat_cfg(tmp_path, data, "run", seqlen=64, max_steps=1, sample_tokens=0, final_eval_tokens=64,
                        val_fraction=0.2))
    assert f"{far:,} of the {scored:,} assistant tokens" in caplog.text and "raise --seqlen" in caplog.text


def test_held_out_windows_read_every_conversation_from_its_start(tmp_path):
    from mambakit.data.conversations import conversation_spans, conversation_windows

    data = conversation_streams(_write_jsonl(tmp_path / "c.jsonl", _color_chats(40)), ByteTokenizer(), 0.25)
    spans = conversation_spans(data.val)
    rows = [(t, sc, st) for tokens, scored, starts in conversation_windows(data.val, 64, 3)
            for t, sc, st in zip(tokens, scored, starts)]
    assert len(rows) == len(spans) == 10
    for (a, b), (tokens, scored, starts) in zip(spans, rows):
        assert torch.equal(tokens[:b - a], data.val.tokens[a:b].long()) and not tokens[b - a:].any()
        assert torch.equal(scored[:b - a], data.val.scored[a:b]) and not scored[b - a:].any()
        assert bool(starts[0]) and not starts[1:].any()
    # two ranks share the rows; a short window cuts a conversation into pieces that cover its targets once
    pieces = [t for r in range(2) for tokens, _, _ in conversation_windows(data.val, 8, 2, rank=r, world_size=2)
              for t in tokens]
    assert sum(int((p != 0).sum()) - 1 for p in pieces) >= sum(b - a - 1 for a, b in spans)
    assert conversation_spans(data.val, max_tokens=1) == spans[:1]


# ---------------------------------------------------------------- training, saving, generating


def _chat_cfg(tmp_path, data: str, name: str, **changes) -> TrainConfig:
    cfg = TrainConfig(recipe="chat", data=data, chat=True, layer="Mamba2", d_model=32, n_layer=2, d_state=8,
                      headdim=8, chunk_size=16, seqlen=64, batch_size=8, lr=1e-2, warmup_steps=5, max_steps=200,
                      eval_every=0, eval_tokens=4096, final_eval_tokens=None, eval_batch_size=4, log_every=20,
                      progress=False, sample_tokens=8, val_fraction=0.1, out_dir=str(tmp_path / name))
    return cfg.replace(**changes)


def test_a_chat_run_learns_the_answers_and_saves_what_chat_requests_need(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "colors.jsonl", _color_chats(300))
    result = train(_chat_cfg(tmp_path, data, "run"))
    run = tmp_path / "run"
    assert result.val_loss < 0.01  # six answers, each fixed by its question: nearly certain after training
    tok = load_checkpoint_tokenizer(run)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and tok.stop_strings == ("<|end|>",)
    model = MambaLM.from_pretrained(run).eval()
    for color, answer in COLORS.items():
        assert chat_reply(model, tok, [{"role": "user", "content": f"light {color}"}], 12) == answer
    assert "held-out conversations, greedy replies" in capsys.readouterr().err or result.sample
    assert "(held out: " in result.sample
    # the command a user runs: the reply without the end-of-turn marker
    assert main(["generate", "--model", str(run), "--chat", "--prompt", "light green", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "go\n"
    # `mambakit eval` on conversations scores as the run's held-out figure does (on by default for a chat model)
    from mambakit.data import conversation_streams

    held_out = _write_jsonl(tmp_path / "held_out.jsonl", conversation_streams(data, tok, 0.1).val_conversations)
    assert main(["eval", "--model", str(run), "--data", held_out, "--json", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chat"] is True and report["carry_state"] is False
    assert report["loss"] == pytest.approx(result.val_loss, rel=1e-4, abs=1e-6)
    assert report["documents"] == 30 and report["tokens"] < report["bytes"] * 1.01  # bytes: assistant text only
    assert main(["eval", "--model", str(run), "--data", held_out, "--no-chat", "--no-progress", "--device", "cpu"]) == 2
    assert "holds conversations: give --chat" in capsys.readouterr().err


def test_a_chat_run_resumes_exactly(tmp_path):
    data = _write_jsonl(tmp_path / "colors.jsonl", _color_chats(100))
    whole = train(_chat_cfg(tmp_path, data, "whole", max_steps=8, log_every=2, sample_tokens=0))
    cfg = _chat_cfg(tmp_path, data, "parts", max_steps=8, log_every=2, sample_tokens=0)
    train(cfg, stop_at_step=3)
    rest = train(TrainConfig.from_dict(load_train_state(cfg.out_dir)["config"]), resume=True)
    assert rest.losses == whole.losses
    assert rest.val_loss == whole.val_loss


def test_chat_settings_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="chat_template renders conversations"):
        TrainConfig(chat_template="default")
    assert main(["train", "--task", "chat", "--out", str(tmp_path / "x")]) == 2
    assert "--task chat needs --data" in capsys.readouterr().err
    assert main(["train", "--chat-template", "default", "--out", str(tmp_path / "x")]) == 2
    assert "give --task chat too" in capsys.readouterr().err
    data = _write_jsonl(tmp_path / "c.jsonl", _color_chats(10))
    assert main(["train", "--task", "chat", "--data", data, "--chat-template", str(tmp_path / "none.jinja"),
                 "--out", str(tmp_path / "y"), "--max-steps", "1", "--no-progress"]) != 0
    assert "none.jinja: no such file" in capsys.readouterr().err
    model_dir = tmp_path / "m"
    _tiny_lm("mamba1").save_pretrained(model_dir, tokenizer=ByteTokenizer())
    for flags, message in ((["--chat", "--streaming"], "not with --streaming or --carry-state"),
                           (["--chat", "--carry-state"], "not with --streaming or --carry-state"),
                           (["--chat-template", "default"], "give --chat too")):
        assert main(["eval", "--model", str(model_dir), "--data", data, *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--data", data, "--chat", "--chat-template",
                 str(tmp_path / "none.jinja"), "--no-progress"]) == 2
    assert "none.jinja: no such file" in capsys.readouterr().err


def test_stop_strings_travel_with_the_tokenizer(tmp_path):
    from mambakit.checkpoints.tokenizer_files import save_checkpoint_fields

    tok = ByteTokenizer()
    tok.save(tmp_path)
    tok.stop_strings = ("<|end|>", "\n\n")
    save_checkpoint_fields(tok, tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"stop_strings": ["<|end|>", "\n\n"]}
    assert load_checkpoint_tokenizer(tmp_path).stop_strings == ("<|end|>", "\n\n")


@pytest.mark.parametrize("pieces, stops, shown", [
    (["42<|e", "nd|>\n", "more"], ["<|end|>"], "42"),
    (["a<", "b<|", "e"], ["<|end|>"], "a<b<|e"),  # never completed: everything comes out at the end
    (["a\n", "b\n", "\nc"], ["\n\n"], "a\nb"),
    (["x", "y"], [], "xy"),
])
def test_stop_text_filter_shows_the_text_before_the_first_stop_string(pieces, stops, shown):
    f = StopTextFilter(stops)
    out = "".join(f.push(p) for p in pieces) + f.flush()
    assert out == shown


def test_chat_loss_all_trains_on_every_token_and_still_scores_the_assistant_held_out(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", _color_chats(20))
    masked = conversation_streams(path, ByteTokenizer(), 0.2)
    every = conversation_streams(path, ByteTokenizer(), 0.2, train_loss="all")
    assert torch.equal(every.train.scored, ~every.train.starts) and bool((~masked.train.scored & every.train.scored).any())
    assert torch.equal(every.val.scored, masked.val.scored)
    with pytest.raises(ValueError, match="chat_loss must be"):
        TrainConfig(chat=True, chat_loss="user")


# ---------------------------------------------------------------- multi-turn chat with the state carried


@pytest.fixture(scope="module")
def color_chat_model(tmp_path_factory):
    """A model that has learned the six color answers (as the learning test above), saved with its template."""
    tmp = tmp_path_factory.mktemp("chat-session")
    data = _write_jsonl(tmp / "colors.jsonl", _color_chats(300))
    train(_chat_cfg(tmp, data, "run", sample_tokens=0))
    return tmp / "run"


def apply_chat_template_for(tok, messages, prompt=False):
    from mambakit.data.chat import apply_chat_template

    return apply_chat_template(tok, messages, add_generation_prompt=prompt)


def test_a_chat_session_reads_only_each_turns_new_text_and_holds_the_whole_conversation(color_chat_model):
    from mambakit.generation import ChatSession, prefill

    tok = load_checkpoint_tokenizer(color_chat_model)
    model = MambaLM.from_pretrained(color_chat_model).eval()
    chat = ChatSession(model, tok)
    assert "".join(chat.reply("light green", 12)) == "go"
    first = chat.tokens_in_state
    assert "".join(chat.reply("light red", 12)) == "stop"
    assert chat.messages == [{"role": "user", "content": "light green"}, {"role": "assistant", "content": "go"},
                             {"role": "user", "content": "light red"}, {"role": "assistant", "content": "stop"}]
    # turn 2 read only what the template put between the first reply and the second assistant header
    after_turn_1 = apply_chat_template_for(tok, chat.messages[:1], prompt=True) + "go<|end|>"  # what turn 1 read
    new_text = apply_chat_template_for(tok, chat.messages[:3], prompt=True)[len(after_turn_1):]
    assert new_text == "\n<|user|>\nlight red<|end|>\n<|assistant|>\n"
    assert chat.last_read == len(tok.encode(new_text)) < first and chat.restarts == 0
    text = apply_chat_template_for(tok, chat.messages)
    # the carried state is the state of the whole conversation read at once (its text up to the last reply's
    # end of turn: the template's newline after it comes with the next turn)
    read = text[:text.rindex("<|end|>") + len("<|end|>")]
    with torch.inference_mode():
        cache, logits = prefill(model, [tok.encode(read)])
    assert chat.tokens_in_state == len(tok.encode(read)) == cache.seqlen_offset
    assert_close(chat._state.logits, logits, name="next-token logits", rel=1e-4)
    chat.reset()
    assert chat.tokens_in_state == 0 and chat.messages == []
    assert "".join(chat.reply("light blue", 12)) == "swim"
    # one decoder kept for the session (a CUDA graph on CUDA; on a CPU it runs the eager step): the same replies
    # and states as the session without it, turn after turn (the model learned single turns: later answers may be
    # wrong, but they must be the same)
    plain, graphed = ChatSession(model, tok, cuda_graph=False), ChatSession(model, tok, cuda_graph=True)
    decoder = None
    for message in ("light green", "light red", "light white"):
        assert "".join(graphed.reply(message, 12)) == "".join(plain.reply(message, 12))
        assert graphed.tokens_in_state == plain.tokens_in_state
        assert torch.equal(graphed._state.logits, plain._state.logits)
        assert decoder is None or graphed._decoder is decoder
        decoder = graphed._decoder
    assert decoder is not None and plain._decoder is None


def test_a_chat_session_reads_the_conversation_again_when_the_template_rewrites_it(color_chat_model):
    from mambakit.generation import ChatSession, prefill

    tok = load_checkpoint_tokenizer(color_chat_model)
    model = MambaLM.from_pretrained(color_chat_model).eval()
    # a template that numbers the turns from the end: every turn changes the text before it
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ messages|length - loop.index }}\n"
                         "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                         "{% endif %}")
    chat = ChatSession(model, tok)
    "".join(chat.reply("light green", 12))
    "".join(chat.reply("light red", 12))
    assert chat.restarts == 1  # turn 2 found its earlier text rewritten and read the whole conversation
    with torch.inference_mode():
        _, logits = prefill(model, [tok.encode(chat._read_text)])
    assert_close(chat._state.logits, logits, name="next-token logits", rel=1e-4)


def test_chat_session_refusals(color_chat_model):
    from mambakit.generation import ChatSession

    tok = load_checkpoint_tokenizer(color_chat_model)
    with pytest.raises(DataError, match="no chat template"):
        ChatSession(MambaLM.from_pretrained(color_chat_model), ByteTokenizer())
    hybrid = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=256, attn_layer_idx=[1],
                                 attn_cfg={"num_heads": 2}, ssm_cfg={"layer": "Mamba2", "headdim": 8}))
    with pytest.raises(ValueError, match="attention layers"):
        ChatSession(hybrid, tok)


def test_mambakit_chat_reads_messages_from_stdin(color_chat_model, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("light green\n\nlight amber\n/reset\nlight white\n/exit\nlight red\n"))
    assert main(["chat", "--model", str(color_chat_model), "--temperature", "0", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == "go\nwait\nsnow\n"  # one reply a message; the blank line skipped, nothing after /exit
    assert err.count("[read ") == 3 and "(a new conversation)" in err
    assert "in the state]" in err


def test_a_saved_chat_goes_on_where_it_stopped(color_chat_model, tmp_path, capsys, monkeypatch):
    import io

    from mambakit.generation import ChatSession, load_state, save_state

    tok = load_checkpoint_tokenizer(color_chat_model)
    model = MambaLM.from_pretrained(color_chat_model).eval()
    whole = ChatSession(model, tok, system="be brief")
    replies = ["".join(whole.reply(m, 12)) for m in ("light green", "light red", "light blue")]
    part = ChatSession(model, tok, system="be brief")
    with pytest.raises(ValueError, match="nothing to save"):
        part.save(tmp_path / "early.state")
    "".join(part.reply("light green", 12))
    part.save(tmp_path / "talk.state")
    again = ChatSession.load(tmp_path / "talk.state", model, tok)
    assert again.messages == part.messages and again.system == "be brief" and again.tokens_in_state == part.tokens_in_state
    assert ["".join(again.reply(m, 12)) for m in ("light red", "light blue")] == replies[1:]
    assert torch.equal(again._state.logits, whole._state.logits) and again.messages == whole.messages
    assert again.restarts == 0 and again.last_read < again.tokens_in_state  # it did not read the first turn again
    # a plain state file is not a conversation
    cache, logits = prefill_for(model, tok)
    save_state(tmp_path / "plain.state", model, cache, logits, metadata={"note": "x"})
    assert load_state(tmp_path / "plain.state", model).metadata == {"note": "x"}
    with pytest.raises(ValueError, match="without a conversation"):
        ChatSession.load(tmp_path / "plain.state", model, tok)
    with pytest.raises(ValueError, match="strings to strings"):
        save_state(tmp_path / "bad.state", model, cache, logits, metadata={"n": 1})
    # the command: --save after every reply, --resume goes on
    state = tmp_path / "cli.state"
    monkeypatch.setattr("sys.stdin", io.StringIO("light green\n"))
    assert main(["chat", "--model", str(color_chat_model), "--temperature", "0", "--max-new-tokens", "12",
                 "--system", "be brief", "--save", str(state)]) == 0
    assert capsys.readouterr().out == replies[0] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("light red\nlight blue\n"))
    assert main(["chat", "--model", str(color_chat_model), "--temperature", "0", "--max-new-tokens", "12",
                 "--resume", str(state)]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(r + "\n" for r in replies[1:]) and "resumed" in err and "1 turn," in err
    assert main(["chat", "--model", str(color_chat_model), "--resume", str(tmp_path / "none.state")]) == 2
    assert main(["chat", "--model", str(color_chat_model), "--resume", str(state), "--system", "x"]) == 2
    assert "not with --resume" in capsys.readouterr().err


def prefill_for(model, tok):
    from mambakit.generation import prefill

    with torch.inference_mode():
        return prefill(model, [tok.encode("light")])
