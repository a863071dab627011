"""The host-time benchmark scripts run end to end on a CPU and print what BENCHMARKS.md quotes from them (tiny
settings: the numbers mean nothing here, the pipeline and the fields do)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # subprocesses of a few seconds each: CI runs them, the fast lane does not


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1].lstrip()) if script != "serve_profile.py" \
        else json.loads(done.stdout)


def test_serve_profile_counts_one_prefill_call_per_wave_and_profiles_the_scheduler():
    out = _run("serve_profile.py", "--shape", "stub24", "--rows", "4", "--arrive", "4", "--requests", "8",
               "--prompt-len", "8", "--new-tokens", "4", "--profile", "--top", "5")
    assert out["tok_s"] > 0 and out["wall_s"] > 0
    assert out["prefill_calls_per_wave"] == 1.0  # a wave arrives together and is prefilled in one call
    assert set(out["scheduler_us_per_token"]) >= {"idle", "prefill", "launch", "wait", "process"}
    assert len(out["top_tottime"]) == 5 and any("scheduler.py" in line for line in out["top_cumulative"])


@pytest.mark.parametrize("extra", [[], ["--prefill"]], ids=["layers", "prefill"])
def test_host_overhead_times_every_path_with_the_launches_stubbed(extra):
    out = _run("host_overhead.py", "--calls", "8", "--repeats", "1", *extra)
    if extra:
        assert set(out["ms_per_call"]) == {"mamba1 prefill call, 24 layers", "mamba2 prefill call, 24 layers"}
        assert all(v > 0 for v in out["ms_per_call"].values())
    else:
        assert len(out["us_per_call"]) == 8 and all(v > 0 for v in out["us_per_call"].values())


def test_autograd_op_overhead_times_both_paths():
    out = _run("autograd_op_overhead.py", "--calls", "200", "--repeats", "1")
    assert set(out["us_per_call"]) == {"no backward possible (implementation alone)", "autograd Function"}
    assert all(v > 0 for v in out["us_per_call"].values())


def test_induction_recipe_saves_weights_that_induction_horizon_measures(tmp_path):
    """The recipe script saves the weights every --save-every steps; the horizon script reads them back and reports
    accuracy against distance and against length (fractions of its rows) and each layer's slowest forgetting rates."""
    run = _run("induction_recipe.py", "--device", "cpu", "--train-len", "16", "--batch", "2", "--steps", "4",
               "--warmup", "1", "--eval-every", "4", "--lengths", "4", "5", "--rows", "2", "--save-every", "2",
               "--save-dir", str(tmp_path / "w"), "--json", str(tmp_path / "recipe.json"))
    assert run["step"] == 4 and set(run) >= {"T16", "T32"}
    saved = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert saved == ["step-2.pt", "step-4.pt"]
    _run("induction_horizon.py", *(str(tmp_path / "w" / n) for n in saved), "--length", "64", "--distances", "1", "30",
         "62", "--near", "4", "--prefix-lengths", "16", "64", "--rows", "3", "--json", str(tmp_path / "h.json"))
    report = json.loads((tmp_path / "h.json").read_text())
    assert [Path(r["weights"]).name for r in report["rows"]] == saved
    for row in report["rows"]:
        assert set(row["by_distance"]) == {"1", "30", "62"} and set(row["by_length"]) == {"16", "64"}
        assert all(abs(3 * v - round(3 * v)) < 1e-6 and 0 <= v <= 1  # a share of 3 rows
                   for v in [*row["by_distance"].values(), *row["by_length"].values()])
        assert len(row["slowest_rates"]) == 2  # one list per layer: 4 rates, positive, slowest first
        assert all(len(r) == 4 and r == sorted(r) and r[0] > 0 for r in row["slowest_rates"])


def test_mqar_probe_trains_a_model_of_the_experiment_on_its_curriculum():
    out = _run("mqar_probe.py", "--model", "mamba2-N16-T16", "--final-t", "16", "--stages", "8:2", "--steps", "3",
               "--eval-every", "2", "--val-rows", "4", "--lr", "1e-3")
    assert out["stages"] == [[8, 2]] and out["lr"] == 1e-3 and out["steps"] == 3
    assert [(e["step"], e["train_T"]) for e in out["evals"]] == [(2, 8), (3, 16)]  # stage at T 8, then the tested T
    assert all(0 <= e["val_accuracy"] <= 1 and e["train_loss"] > 0 for e in out["evals"])
