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
    pytest.param(["train", "--d-model", "30"], "mambakit train: error: mamba2 needs expand * d_model (60) divisible by headdim",
                 id="inconsistent-shape"),
    pytest.param(["train", "--device", "quantum"], "mambakit train: error: unknown device 'quantum'", id="bad-device"),
    pytest.param(["train", "--resume", "--out", "{tmp}/nothing"], "mambakit train: error: no train_state.pt in",
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
]


@pytest.mark.parametrize("argv, message", USER_ERRORS)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message.replace("{tmp}", str(tmp_path)))
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""


def test_user_error_in_a_fresh_process_has_no_traceback(tmp_path):
    proc = _run("train", "--data", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr == f"mambakit train: error: data path not found: {tmp_path / 'missing'}\n"


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
