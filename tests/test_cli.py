"""The `mambakit` command line: help of every subcommand, one-line user errors (exit 2), train -> generate end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mambakit.cli.__main__ import SUBCOMMANDS, main


def _run(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The console script as a user runs it: a fresh interpreter, `python -m mambakit.cli ...`."""
    return subprocess.run([sys.executable, "-m", "mambakit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.mark.parametrize("command, examples", [
    pytest.param("train", ["mambakit train\n", "mambakit train --resume --out runs/quick", "--time-budget"], id="train"),
    pytest.param("generate", ["mambakit generate --model runs/shakespeare --prompt", "--top-p"], id="generate"),
])
def test_help_of_each_subcommand_shows_example_commands(capsys, command, examples):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith(f"usage: mambakit {command}")
    for text in examples:
        assert text in out


def test_every_subcommand_has_help(capsys):
    assert set(SUBCOMMANDS) >= {"train", "generate"}
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and "examples:" in capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in SUBCOMMANDS)


USER_ERRORS = [
    pytest.param(["frobnicate"], "mambakit: error: unknown command 'frobnicate'", id="unknown-command"),
    pytest.param(["train", "--recipe", "nope"], "mambakit train: error: unknown recipe 'nope'", id="unknown-recipe"),
    pytest.param(["train", "--max-steps", "0"], "mambakit train: error: argument --max-steps: expected a positive integer",
                 id="bad-max-steps"),
    pytest.param(["train", "--lr", "fast"], "mambakit train: error: argument --lr: expected a positive number",
                 id="bad-lr"),
    pytest.param(["train", "--time-budget", "5 days"], "mambakit train: error: argument --time-budget: expected a duration",
                 id="bad-time-budget"),
    pytest.param(["train", "--layer", "mamba3"], "mambakit train: error: argument --layer: invalid choice", id="bad-layer"),
    pytest.param(["train", "--data", "{tmp}/missing.txt"], "mambakit train: error: data path not found", id="missing-data"),
    pytest.param(["train", "--data", "{tmp}/notes.csv"], "mambakit train: error: {tmp}/notes.csv: unsupported file type",
                 id="unsupported-data"),
    pytest.param(["train", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/run"],
                 "mambakit train: error: {tmp}/bad.jsonl:2: no \"text\" field", id="jsonl-missing-text"),
    pytest.param(["train", "--d-model", "30"], "mambakit train: error: Mamba2 needs expand * d_model (60) divisible by headdim",
                 id="inconsistent-shape"),
    pytest.param(["train", "--device", "quantum"], "mambakit train: error: unknown device 'quantum'", id="bad-device"),
    pytest.param(["train", "--device", "cpu", "--cuda-graph", "--out", "{tmp}/run"],
                 "mambakit train: error: --cuda-graph captures the step on a CUDA device; this run is on cpu",
                 id="cuda-graph-on-cpu"),
    pytest.param(["train", "--resume", "--out", "{tmp}/nothing"], "mambakit train: error: no checkpoint in",
                 id="resume-without-checkpoint"),
    pytest.param(["train", "--resume", "--lr", "0.1"], "mambakit train: error: --lr cannot be combined with --resume",
                 id="resume-with-run-flags"),
    pytest.param(["train", "--frobnicate"], "mambakit train: error: unrecognized arguments: --frobnicate", id="unknown-flag"),
    pytest.param(["generate"], "mambakit generate: error: the following arguments are required: --model", id="no-model"),
    pytest.param(["generate", "--model", "{tmp}/missing"], "mambakit generate: error: model directory not found",
                 id="missing-model"),
    pytest.param(["generate", "--model", "{tmp}"], "mambakit generate: error: no config.json in", id="not-a-model"),
    pytest.param(["generate", "--model", "{tmp}", "--top-p", "1.5"], "mambakit generate: error: argument --top-p",
                 id="bad-top-p"),
    pytest.param(["generate", "--model", "{tmp}", "--temperature", "-1"], "mambakit generate: error: argument --temperature",
                 id="bad-temperature"),
    pytest.param(["generate", "--model", "{tmp}", "--batch-size", "0"],
                 "mambakit generate: error: argument --batch-size: expected a positive integer", id="bad-batch-size"),
    pytest.param(["generate", "--model", "{tmp}", "--output", "{tmp}/out.jsonl"],
                 "mambakit generate: error: --output needs --prompts-file", id="output-without-prompts-file"),
    pytest.param(["generate", "--model", "{tmp}", "--prompt", "x", "--prompts-file", "{tmp}/notes.csv"],
                 "mambakit generate: error: give either --prompt or --prompts-file", id="prompt-and-prompts-file"),
    pytest.param(["generate", "--model", "{tmp}", "--stop", ""], "mambakit generate: error: --stop needs a non-empty",
                 id="empty-stop"),
]


@pytest.mark.parametrize("argv, message", USER_ERRORS)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    # in an empty directory: the README's first command leaves runs/shakespeare in the checkout, which the flags
    # without --out would otherwise find (and refuse as a run that exists already)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message.replace("{tmp}", str(tmp_path)))
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.slow
def test_user_error_in_a_fresh_process_has_no_traceback(tmp_path):
    proc = _run("train", "--data", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr == f"mambakit train: error: data path not found: {tmp_path / 'missing'}\n"


@pytest.mark.slow
def test_train_then_generate_end_to_end(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for i in range(12):
        (tmp_path / "data" / f"d{i}.txt").write_text("the rest is silence\n" * 20)
    out = tmp_path / "run"
    proc = _run("train", "--recipe", "tiny", "--data", str(tmp_path / "data"), "--max-steps", "6", "--seqlen", "32",
                "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "held-out:" in proc.stdout and "bits/byte" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["val_bpb"] > 0

    proc = _run("generate", "--model", str(out), "--prompt", "the rest", "--max-new-tokens", "20", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the rest")
    assert "tokens/s" in proc.stderr and "Traceback" not in proc.stderr

    # the same command in-process: seeded sampling reproduces the subprocess's text exactly
    argv = ["generate", "--model", str(out), "--prompt", "the rest", "--max-new-tokens", "20", "--seed", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out == proc.stdout

    # resuming a finished run trains no further step, evaluates and saves again
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    resumed = capsys.readouterr().out
    assert "resuming from" in resumed and "trained 0 steps (6/6)" in resumed


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random byte-level Mamba-2 LM saved as `mambakit train` saves one, and the model itself."""
    import torch

    from mambakit import MambaConfig, MambaLM
    from mambakit.data import ByteTokenizer

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256,
                                ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    return tmp_path / "model", model


def _greedy_text(model, prompt: str, n: int, **kwargs) -> str:
    from mambakit.data import ByteTokenizer
    from mambakit.generation import generate

    tok = ByteTokenizer()
    new = generate(model, [[tok.eos_id] + tok.encode(prompt)], n, eos_token_id=tok.eos_id, **kwargs)[0]
    return tok.decode(new[:-1] if new and new[-1] == tok.eos_id else new)


def test_generate_prompts_file_writes_one_json_line_per_prompt(tmp_path, capsys, tiny_checkpoint):
    """Lines of different lengths, in batches of 2: each completion is what the prompt gets alone."""
    model_dir, model = tiny_checkpoint
    prompts = ["to be", "or not", "", "that is the question"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(model_dir), "--prompts-file", str(tmp_path / "prompts.txt"), "--output", str(out),
            "--batch-size", "2", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "tokens/s" in captured.err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert r["completion"] == _greedy_text(model, r["prompt"], 12)
        assert 1 <= r["new_tokens"] <= 12

    # without --output the JSON lines go to stdout
    assert main(argv[:5] + argv[7:]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records


def test_generate_stop_string_ends_the_streamed_text(capsys, tiny_checkpoint):
    model_dir, model = tiny_checkpoint
    free = _greedy_text(model, "to be", 16)
    stop = free[2:4]  # two characters the greedy continuation contains
    expected = free[: free.index(stop) + len(stop)]
    argv = ["generate", "--model", str(model_dir), "--prompt", "to be", "--temperature", "0", "--max-new-tokens", "16",
            "--stop", stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")]
    assert main(argv) == 0
    assert capsys.readouterr().out == "to be" + expected + "\n"


@pytest.mark.parametrize("name, message", [
    pytest.param("missing.txt", "prompts file not found", id="missing"),
    pytest.param("empty.txt", "no prompts", id="empty"),
    pytest.param("latin1.txt", "not UTF-8 text", id="not-utf8"),
])
def test_generate_prompts_file_errors(tmp_path, tiny_checkpoint, name, message):
    from mambakit.cli.errors import UsageError
    from mambakit.cli.generate import main as generate_main

    model_dir, _ = tiny_checkpoint
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=message):
        generate_main(str(model_dir), prompts_file=str(tmp_path / name))


class _FakeClock:
    """time.perf_counter for cli/generate.py: it moves only when the fake generation says so."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_generate_speed_excludes_the_first_token_and_the_first_batch(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    """The first token carries the prefill and, on CUDA, the kernel compiles: 10 s here against 0.1 s for each
    later token. The printed rate is the later tokens' (10 tokens/s), with the first token's time apart; with
    --prompts-file the first batch is apart the same way."""
    import mambakit.cli.generate as cli_generate
    import mambakit.generation

    clock = _FakeClock()
    monkeypatch.setattr(cli_generate, "time", clock)

    def fake_stream(model, prompt, max_new_tokens, **kwargs):
        for i, token in enumerate(b"hello"[:max_new_tokens]):
            clock.now += 10.0 if i == 0 else 0.1
            yield token

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        clock.now += 10.0 if clock.now == 100.0 else 1.0  # the first batch 10 s, the others 1 s
        return [list(b"abc") for _ in prompts]

    monkeypatch.setattr(mambakit.generation, "stream", fake_stream)
    monkeypatch.setattr(mambakit.generation, "generate", fake_generate)
    model_dir, _ = tiny_checkpoint
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "xhello\n"
    assert captured.err.strip() == ("first token in 10.00 s (prompt and first use: kernel compiles on CUDA, "
                                    "the step's compile with --compile); then 4 tokens in 0.40 s: 10.0 tokens/s, 100.0 ms/token")

    clock.now = 100.0
    (tmp_path / "prompts.txt").write_text("a\nb\nc\nd\ne\n", encoding="utf-8")
    assert main(["generate", "--model", str(model_dir), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--batch-size", "2", "--output", str(tmp_path / "out.jsonl")]) == 0
    assert capsys.readouterr().err.strip() == (
        "first batch: 6 tokens in 10.00 s (prompt and first use: kernel compiles on CUDA, "
        "the step's compile with --compile); then 9 tokens in 2.00 s: 4.5 tokens/s, 222.2 ms/token")
