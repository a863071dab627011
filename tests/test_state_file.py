"""State files (`generation.save_state` / `load_state`, `generate(..., state=...)`, `mambakit generate --context /
--state / --save-state`): a text read once, saved, and continued later gives exactly what reading it all at once
gives, for both Mamba layers, a batch of continuations of one state, an empty continuation, stream and the compiled
step; states of another model are refused, of other weights warned about."""

from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.cli.__main__ import main
from mambakit.generation import StateFileWarning, generate, load_state, prefill, save_state, stream

LAYERS = ["Mamba1", "Mamba2"]


def _model(layer: str, seed: int = 0, **ssm) -> MambaLM:
    torch.manual_seed(seed)
    cfg = {"layer": layer, **ssm}
    if layer == "Mamba2":
        cfg.update(headdim=16, chunk_size=16)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg=cfg)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.3 * torch.randn_like(p))  # past the initialisation, so that continuations differ by the text
    return lm


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_saved_state_continues_exactly_as_reading_the_whole_text(tmp_path, layer):
    lm = _model(layer)
    book, q1, q2 = _ids(150, 1), _ids(5, 2), _ids(9, 3)
    cache, logits = prefill(lm, [book])
    path = save_state(tmp_path / "book.state", lm, cache, logits)
    state = load_state(path, lm)
    assert state.tokens == 150 and state.batch_size == 1
    whole = [generate(lm, [book + q], 12)[0] for q in (q1, q2)]
    # a batch of two continuations of different lengths from one state of one row
    assert generate(lm, [q1, q2], 12, state=state) == whole
    assert generate(lm, [[]], 12, state=state) == generate(lm, [book], 12)  # no prompt: the state's own logits
    assert list(stream(lm, q1, 12, state=state)) == whole[0]
    assert generate(lm, [q1], 12, state=state, compile=True) == [whole[0]]
    # sampling with a seed: the same draws as the whole text's
    assert generate(lm, [q2], 12, state=state, temperature=0.9, seed=4) == \
        generate(lm, [book + q2], 12, temperature=0.9, seed=4)
    # the state is copied, not consumed: the first call again gives the same
    assert generate(lm, [q1, q2], 12, state=state) == whole
    # prefill continues it too
    cache2, logits2 = prefill(lm, [q1], load_state(path, lm).cache)
    _, logits_whole = prefill(lm, [book + q1])
    torch.testing.assert_close(logits2, logits_whole, rtol=1e-4, atol=1e-4)
    assert cache2.seqlen_offset == 155


def test_a_state_of_several_rows_continues_row_by_row(tmp_path):
    lm = _model("Mamba2")
    texts = [_ids(40, 5), _ids(40, 6)]
    cache, logits = prefill(lm, texts)
    state = load_state(save_state(tmp_path / "two.state", lm, cache, logits), lm)
    assert state.batch_size == 2
    q = [_ids(3, 7), _ids(3, 8)]
    assert generate(lm, q, 8, state=state) == generate(lm, [texts[0] + q[0], texts[1] + q[1]], 8)
    with pytest.raises(ValueError, match="the state holds 2 rows; this call has 3 prompts"):
        generate(lm, [q[0]] * 3, 8, state=state)
    with pytest.raises(ValueError, match="stream continues one"):
        list(stream(lm, q[0], 8, state=state))


def test_states_of_other_models_are_refused_and_other_weights_warned_about(tmp_path):
    lm = _model("Mamba2")
    cache, logits = prefill(lm, [_ids(20, 1)])
    path = save_state(tmp_path / "s.state", lm, cache, logits)
    with pytest.raises(ValueError, match="made by a model of another shape"):
        load_state(path, _model("Mamba2", d_state=32))
    with pytest.raises(ValueError, match="made by a model of another shape"):
        load_state(path, _model("Mamba1"))
    with pytest.warns(StateFileWarning, match="other weights"):
        load_state(path, _model("Mamba2", seed=1))
    with pytest.raises(ValueError, match="rows do not match|must be \\(batch 1"):
        save_state(tmp_path / "bad.state", lm, cache, logits.expand(2, -1))
    (tmp_path / "junk.state").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a readable state file"):
        load_state(tmp_path / "junk.state", lm)
    with pytest.raises(ValueError, match="with a state, give every row a prompt"):
        generate(lm, [[1, 2], []], 4, state=load_state(path, lm))


def test_models_with_attention_layers_are_refused(tmp_path):
    torch.manual_seed(0)
    hybrid = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256, attn_layer_idx=[1],
                                 attn_cfg={"num_heads": 2}, ssm_cfg={"layer": "Mamba2", "headdim": 16})).eval()
    cache, logits = prefill(hybrid, [_ids(10, 1)])
    with pytest.raises(ValueError, match="attention layers"):
        save_state(tmp_path / "h.state", hybrid, cache, logits)


def test_cli_context_save_state_and_state_give_the_text_read_whole(tmp_path, capsys, monkeypatch):
    from mambakit.cli import generate as generate_cli
    from mambakit.data import ByteTokenizer

    monkeypatch.setattr(generate_cli, "_READ_PIECE", 256)  # the context read in 5 pieces

    lm = _model("Mamba1")
    lm.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    model = str(tmp_path / "model")
    (tmp_path / "book.txt").write_text("It was the best of times, it was the worst of times. " * 20, encoding="utf-8")
    common = ["--model", model, "--temperature", "0", "--max-new-tokens", "30"]
    # the whole text as one prompt
    book = (tmp_path / "book.txt").read_text(encoding="utf-8")
    assert main(["generate", *common, "--prompt", book + "Call me"]) == 0
    whole = capsys.readouterr().out[len(book):]
    # the book as context, saved; then the prompt from the saved state
    assert main(["generate", *common, "--context", str(tmp_path / "book.txt"), "--prompt", "Call me",
                 "--save-state", str(tmp_path / "with-prompt.state")]) == 0
    captured = capsys.readouterr()
    assert captured.out == whole and "saved to" in captured.err
    assert main(["generate", *common, "--context", str(tmp_path / "book.txt"), "--save-state",
                 str(tmp_path / "book.state"), "--max-new-tokens", "0"]) == 0
    assert "state after 1,061 tokens saved" in capsys.readouterr().err  # the start token and 1,060 bytes
    assert main(["generate", *common, "--state", str(tmp_path / "book.state"), "--prompt", "Call me"]) == 0
    assert capsys.readouterr().out == whole
    # every line of a prompts file from one state, in one batch
    (tmp_path / "q.txt").write_text("Call me\nIt was\n", encoding="utf-8")
    assert main(["generate", *common, "--state", str(tmp_path / "book.state"), "--prompts-file",
                 str(tmp_path / "q.txt")]) == 0
    import json

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0]["prompt"] + records[0]["completion"] + "\n" == whole
    assert main(["generate", *common, "--prompt", book + "It was"]) == 0
    assert records[1]["prompt"] + records[1]["completion"] + "\n" == capsys.readouterr().out[len(book):]


@pytest.mark.parametrize("argv, message", [
    (["--state", "{tmp}/missing.state"], "--state: state file not found"),
    (["--context", "{tmp}/missing.txt"], "--context: file not found"),
    (["--chat", "--context", "{tmp}/q.txt"], "--chat renders the prompt as a whole conversation"),
    (["--context", "{tmp}/q.txt", "--prompts-file", "{tmp}/gaps.txt"], "gaps.txt:2: an empty line"),
    (["--state", "{tmp}/junk.state"], "--state {tmp}/junk.state: not a readable state file"),
])
def test_cli_state_usage_errors(tmp_path, capsys, argv, message):
    from mambakit.data import ByteTokenizer

    _model("Mamba2").save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    (tmp_path / "q.txt").write_text("a\n", encoding="utf-8")
    (tmp_path / "gaps.txt").write_text("a\n\nb\n", encoding="utf-8")
    (tmp_path / "junk.state").write_bytes(b"junk")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["generate", "--model", str(tmp_path / "model"), *argv]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("layer", LAYERS)
def test_a_saved_state_continues_under_cuda_graphs(tmp_path, layer):
    lm = _model(layer).cuda()
    book, q1, q2 = _ids(300, 1), _ids(5, 2), _ids(9, 3)
    cache, logits = prefill(lm, [book])
    state = load_state(save_state(tmp_path / "b.state", lm, cache, logits), lm)
    eager = [generate(lm, [book + q], 16)[0] for q in (q1, q2)]
    assert generate(lm, [q1, q2], 16, state=state, cuda_graph=True) == eager
    assert generate(lm, [[], []], 16, state=state, cuda_graph=True) == generate(lm, [book, book], 16)


def test_copy_from_fills_every_row_and_takes_the_position():
    lm = _model("Mamba1")
    cache, _ = prefill(lm, [_ids(10, 1)])
    big = lm.allocate_cache(3)
    addresses = [layer.ssm_state.data_ptr() for layer in big.layers]
    big.copy_from_(cache)
    assert big.seqlen_offset == 10 and [layer.ssm_state.data_ptr() for layer in big.layers] == addresses
    for dst, src in zip(big.layers, cache.layers):
        assert all(torch.equal(dst.ssm_state[i], src.ssm_state[0]) for i in range(3))
        assert all(torch.equal(dst.conv_state[i], src.conv_state[0]) for i in range(3))
    with pytest.raises(ValueError, match="the source holds 3 rows, this cache 2"):
        lm.allocate_cache(2).copy_from_(big)
