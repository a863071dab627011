"""`mambakit eval --model DIR --data FILE [--json]` on a tiny checkpoint trained here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mambakit.cli.__main__ import main
from mambakit.data import ByteTokenizer, Document, TokenStream, load_documents
from mambakit.evaluation import evaluate_stream
from mambakit.models import MambaLM

TEXTS = ["to be or not to be that is the question\n", "the rest is silence\n", "all the world's a stage\n"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte-level run (8 steps) and a held-out JSONL file of short documents."""
    from mambakit.training import tiny_recipe, train

    root = tmp_path_factory.mktemp("eval")
    data = root / "train"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i:02d}.txt").write_text("".join(TEXTS[(i + j) % 3] for j in range(6)))
    cfg = tiny_recipe().replace(data=str(data), max_steps=8, out_dir=str(root / "run"), progress=False,
                                sample_tokens=0, token_cache=str(root / "cache"))
    train(cfg)
    held = root / "held.jsonl"
    held.write_text("".join(json.dumps({"text": TEXTS[i % 3] * (1 + i % 2)}) + "\n" for i in range(7)))
    return root


def _eval(capsys, root, *flags) -> tuple[int, str, str]:
    code = main(["eval", "--model", str(root / "run"), "--data", str(root / "held.jsonl"),
                 "--token-cache", str(root / "cache"), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_reports_the_numbers_of_evaluate_stream(trained, capsys):
    code, out, err = _eval(capsys, trained, "--json", "--no-progress")
    assert code == 0 and err == ""
    report = json.loads(out)
    # the same numbers, computed here with the library on the same documents, resets at each EOS
    docs = load_documents(trained / "held.jsonl")
    stream = TokenStream.from_documents(docs, ByteTokenizer())
    model = MambaLM.from_pretrained(trained / "run")
    expected = evaluate_stream(model, stream, seqlen=64, batch_size=8, carry_state=True)
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert report["carry_state"] is True  # the default for a model without attention layers
    windows = json.loads(_eval(capsys, trained, "--json", "--no-progress", "--no-carry-state")[1])
    assert windows["carry_state"] is False
    assert windows["bits_per_byte"] == pytest.approx(evaluate_stream(model, stream, seqlen=64, batch_size=8)
                                                     .bits_per_byte, rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(expected.loss), rel=1e-6)
    assert report["tokens"] == len(stream) - 1 == expected.tokens
    assert report["bytes"] == sum(len(d.text.encode()) + 1 for d in docs) - 1  # the first EOS is context only
    assert report["documents"] == 7 and report["seqlen"] == 64 and report["reset_at_eos"] is True
    assert 0 < report["bits_per_byte"] < 8  # 8 bits per byte is a uniform guess over 256 bytes
    # --autocast bf16+cpu: the same evaluation under bf16 autocast on this CPU (close, not equal)
    bf16 = json.loads(_eval(capsys, trained, "--json", "--no-progress", "--autocast", "bf16+cpu")[1])
    expected_bf16 = evaluate_stream(model, stream, seqlen=64, batch_size=8, carry_state=True,
                                    autocast_dtype=torch.bfloat16)
    assert bf16["bits_per_byte"] == pytest.approx(expected_bf16.bits_per_byte, rel=1e-6)
    assert bf16["bits_per_byte"] == pytest.approx(report["bits_per_byte"], rel=2e-2)


def test_eval_text_output_and_progress_bar(trained, capsys):
    code, out, err = _eval(capsys, trained)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"model: {trained / 'run'}"
    assert lines[2].startswith("bits per byte: ") and lines[3].startswith("perplexity: ")
    assert "state carried across windows and reset at document boundaries" in lines[4]
    assert "eval" in err  # the tqdm bar, on stderr


def test_eval_document_handling_follows_the_flag(trained, capsys):
    reset = json.loads(_eval(capsys, trained, "--json", "--no-progress")[1])
    carried = json.loads(_eval(capsys, trained, "--json", "--no-progress", "--no-reset-at-eos")[1])
    assert carried["reset_at_eos"] is False and carried["tokens"] == reset["tokens"]
    assert carried["bits_per_byte"] != reset["bits_per_byte"]
    short = json.loads(_eval(capsys, trained, "--json", "--no-progress", "--max-tokens", "50", "--seqlen", "16")[1])
    assert short["tokens"] == 50 and short["seqlen"] == 16


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("reset", [True, False], ids=["reset-at-eos", "across-documents"])
def test_carried_state_scores_each_segment_as_one_forward_would(layer, reset):
    """evaluate_stream(carry_state=True): windows of 7 tokens whose states carry over (documents starting at a
    window's first token among them) give the loss of one forward over each row's whole segment, with the state
    restarting at each document (or not, with reset_at_eos False)."""
    import torch

    from mambakit.data.packing import seq_idx_from_eos
    from mambakit.models import MambaConfig
    from mambakit.models.mamba_lm import MambaLM as LM

    torch.manual_seed(0)
    extra = {"headdim": 16, "chunk_size": 8} if layer == "Mamba2" else {}
    model = LM(MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"layer": layer, **extra})).double()
    docs = ["abcdef", "gh", "ijklmnopqrstu", "vw", "xyzabcdefghijklmnopq", "rs"]  # EOS at 0, 7, 10, 24, 27, 48
    stream = TokenStream.from_documents([Document(f"d{i}", d) for i, d in enumerate(docs)], ByteTokenizer())
    tokens = stream.tokens.long()
    n = len(stream) - 1
    assert any(int(tokens[i]) == 0 for i in range(7, n, 7))  # a document starts at a window's first token
    for batch in (1, 3):
        length = -(-n // batch)
        nats = 0.0
        with torch.no_grad():
            for a in range(0, n, length):
                b = min(a + length, n)
                inputs = tokens[a:b][None]
                logits = model(inputs, seq_idx=seq_idx_from_eos(inputs, 0) if reset else None)
                nats += float(torch.nn.functional.cross_entropy(logits[0, :, :256], tokens[a + 1:b + 1],
                                                                 reduction="sum"))
        got = evaluate_stream(model, stream, seqlen=7, batch_size=batch, reset_at_eos=reset, carry_state=True)
        assert got.tokens == n
        assert got.loss == pytest.approx(nats / n, rel=1e-6)  # token_nll_sum scores in float32
    windowed = evaluate_stream(model, stream, seqlen=7, batch_size=3, reset_at_eos=reset)
    assert abs(windowed.loss - got.loss) > 1e-4 * got.loss  # windows that start empty lose context


def test_eval_reads_a_datasets_directory(trained, capsys, tmp_path):
    import datasets

    docs = load_documents(trained / "held.jsonl")
    datasets.Dataset.from_dict({"body": [d.text for d in docs]}).save_to_disk(str(tmp_path / "ds"))
    code = main(["eval", "--model", str(trained / "run"), "--data", str(tmp_path / "ds"), "--text-column", "body",
                 "--json", "--no-progress", "--token-cache", "off"])
    from_dataset = json.loads(capsys.readouterr().out)
    from_file = json.loads(_eval(capsys, trained, "--json", "--no-progress")[1])
    assert code == 0 and from_dataset["bits_per_byte"] == pytest.approx(from_file["bits_per_byte"], rel=1e-9)


@pytest.mark.parametrize("flags, message", [
    pytest.param(["--data", "missing.txt"], "--data missing.txt: not found", id="missing-data"),
    pytest.param(["--model", "no/such/dir/here"], "model directory not found", id="missing-model"),
    pytest.param(["--seqlen", "0"], "expected a positive integer, got '0'", id="bad-seqlen"),
    pytest.param(["--tasks", "lambada_openai"], "give --data PATH", id="data-and-tasks"),
])
def test_eval_user_errors_are_one_line(trained, capsys, flags, message):
    args = {"--model": str(trained / "run"), "--data": str(trained / "held.jsonl")}
    rest = []
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[flag] = value
        else:
            rest += [flag, value]
    code = main(["eval", *[x for kv in args.items() for x in kv], *rest])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mambakit eval: error: ") and message in err and err.count("\n") == 1


def test_eval_of_an_empty_document_set_is_a_user_error(trained, capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    code = main(["eval", "--model", str(trained / "run"), "--data", str(tmp_path / "empty.jsonl"), "--no-progress",
                 "--token-cache", "off"])
    err = capsys.readouterr().err
    assert code == 2 and "all documents are empty" in err



@pytest.mark.parametrize("carry", [False, True], ids=["windows", "carried-state"])
def test_windows_without_a_document_boundary_reach_the_model_without_seq_idx(carry, monkeypatch):
    """A batch whose rows each hold one document gets seq_idx=None (S4D then convolves by FFT instead of
    scanning: 186 s against seconds for one DNA eval on an H200), and the loss is what the seq_idx path gives."""
    import torch

    from mambakit.models import MambaConfig
    from mambakit.models.mamba_lm import MambaLM as LM

    torch.manual_seed(0)
    model = LM(MambaConfig(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"layer": "S4D", "d_state": 4})).double()
    docs = ["abcdefghijklmnopqrstuvwxyz" * 2, "0123456789"]  # EOS at 0 and 53: one window of 8 in 8 holds one
    stream = TokenStream.from_documents([Document(f"d{i}", d) for i, d in enumerate(docs)], ByteTokenizer())
    seen = []
    forward = model.forward

    def recording(*args, seq_idx=None, **kwargs):
        seen.append(seq_idx)
        return forward(*args, seq_idx=seq_idx, **kwargs)

    model.forward = recording
    got = evaluate_stream(model, stream, seqlen=8, batch_size=1, carry_state=carry)
    with_boundary = [s for s in seen if s is not None]
    assert len(seen) == 8 and len(with_boundary) == 1
    assert int(with_boundary[0][0, -1]) != int(with_boundary[0][0, 0])
    # the same numbers as every window given its seq_idx: an S4D model's scan and its convolution agree
    monkeypatch.setattr("mambakit.evaluation.bits_per_byte._boundaries_or_none", lambda seq_idx: seq_idx)
    seen.clear()
    every = evaluate_stream(model, stream, seqlen=8, batch_size=1, carry_state=carry)
    assert all(s is not None for s in seen) and len(seen) == 8
    assert got.loss == pytest.approx(every.loss, rel=1e-9)
