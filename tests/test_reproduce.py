"""`mambakit reproduce NAME --quick` end to end on the CPU (the pipeline, the files, the metric's range; not the
accuracy), and the resumable training under a time budget."""

import dataclasses
import json
import statistics
import time

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.cli.__main__ import main as cli_main
from mambakit.data.synthetic import induction_heads
from mambakit.reproduce import EXPERIMENTS, FINISHED, UNFINISHED, reproduce
from mambakit.reproduce.common import ModelSpec, Run, TrainSettings, median_index, seeded, spread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_common_files(out, name, pngs):
    results = json.loads((out / "results.json").read_text())
    for key in ("command", "device", "torch", "triton", "date", "run_time_s", "settings", "rows"):
        assert key in results, key
    assert results["experiment"] == name and results["quick"] is True
    assert results["command"].startswith(f"mambakit reproduce {name} --quick")
    readme = (out / "README.md").read_text()
    assert results["command"] in readme and "| " in readme and "quick mode" in readme
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert f"({png})" in readme  # the README shows the plot
    assert (out / ".gitignore").read_text().strip() == "_state/"
    return results


@pytest.mark.slow
def test_selective_copying_quick(tmp_path):
    out = tmp_path / "selective-copying"
    assert reproduce("selective-copying", out, quick=True, device="cpu", progress=False) == FINISHED
    results = _check_common_files(out, "selective-copying", ["accuracy.png", "training_loss.png"])
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"mamba-s6", "mamba-s4d", "ungated-s6", "ungated-s4d"}
    seeds = results["settings"]["seeds"]
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["test_targets"] == 8 * 16
        assert r["steps"] == results["settings"]["steps"] and r["final_loss"] > 0
        # one entry per seed; the row's accuracy is their median, the checkpoint the median seed's
        assert [x["seed"] for x in r["seeds"]] == seeds and len(seeds) >= 2
        accs = [x["accuracy"] for x in r["seeds"]]
        assert r["accuracy_spread"] == {"median": statistics.median(accs), "min": min(accs), "max": max(accs)}
        assert r["accuracy"] == r["accuracy_spread"]["median"] and r["checkpoint_seed"] in seeds
        assert all(len(x["val_history"]) == x["steps"] // results["settings"]["eval_every"] for x in r["seeds"])
    assert "median" in (out / "README.md").read_text()
    assert rows["ungated-s4d"]["ssm_cfg"] == {"layer": "S4D", "A_init": "S4D-Lin", "gated": False, "d_state": 4}
    model = MambaLM.from_pretrained(out / "mamba-s6")  # the committed checkpoint layout loads
    assert model.config.ssm_cfg["layer"] == "Mamba1" and model.config.n_layer == 2
    assert MambaLM.from_pretrained(out / "ungated-s4d").config.ssm_cfg["gated"] is False


@pytest.mark.slow
def test_induction_heads_quick(tmp_path):
    out = tmp_path / "ih"
    assert reproduce("induction-heads", out, quick=True, device="cpu", progress=False) == FINISHED
    results = _check_common_files(out, "induction-heads", ["accuracy_vs_length.png", "training_loss.png"])
    s = results["settings"]
    rows = {r["model"]: r for r in results["rows"]}
    assert set(rows) == {"mamba", "mamba2", "s4d", "mha-rope", "mha-abs"}
    lengths = [str(2 ** k) for k in s["test_log2"]]
    for key in ("mamba", "mamba2", "s4d"):  # SSMs: every length, through chunked prefill
        assert list(rows[key]["accuracy"]) == lengths and rows[key]["stopped"] is None
    for key in ("mha-rope", "mha-abs"):  # attention stops at attention_max_len and says so
        assert max(int(T) for T in rows[key]["accuracy"]) == s["attention_max_len"]
        assert "not run beyond" in rows[key]["stopped"]
        assert rows[key]["stopped"] in (out / "README.md").read_text()
    for r in rows.values():
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert [x["seed"] for x in r["seeds"]] == s["seeds"] and r["checkpoint_seed"] in s["seeds"]
        for T, median in r["accuracy"].items():  # the row is the seeds' median, with their range
            per_seed = [x["accuracy"][T] for x in r["seeds"]]
            assert median == statistics.median(per_seed)
            assert (r["accuracy_min"][T], r["accuracy_max"][T]) == (min(per_seed), max(per_seed))
    # early stopping watches the training length, and a longer length for the SSMs only
    assert set(rows["mamba"]["seeds"][0]["val_history"][0][1]) == {f"T{s['train_len']}", f"T{s['val_long']}"}
    assert set(rows["mha-rope"]["seeds"][0]["val_history"][0][1]) == {f"T{s['train_len']}"}
    assert all(1 <= x["selected_step"] <= x["steps"] for r in rows.values() for x in r["seeds"])
    model = MambaLM.from_pretrained(out / "mamba")
    ids = induction_heads(2, 40, generator=0).inputs
    with torch.no_grad():
        assert model(ids).shape == (2, 40, model.config.padded_vocab_size)


@pytest.mark.slow
def test_mqar_quick_through_the_cli(tmp_path, capsys):
    out = tmp_path / "mqar"
    assert cli_main(["reproduce", "mqar", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    results = _check_common_files(out, "mqar", ["accuracy_vs_state.png", "training_loss.png"])
    s = results["settings"]
    rows = results["rows"]
    assert len(rows) == len(s["seqlens"]) * (2 * len(s["d_states"]) + 1)
    assert {(r["mixer"], r["d_state"]) for r in rows} == (
        {(m, n) for m in ("Mamba-1", "Mamba-2") for n in s["d_states"]} | {("attention", None)})
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["test_queries"] == s["test_rows"] * r["seqlen"] // s["kv_divisor"]
        accs = [x["accuracy"] for x in r["seeds"]]
        assert [x["seed"] for x in r["seeds"]] == s["seeds"] and r["accuracy"] == statistics.median(accs)
    assert "--device=cpu" in results["command"]


def test_cli_rejects_unknown_experiment_and_mismatched_resume(tmp_path, capsys):
    assert cli_main(["reproduce", "lra"]) == 2
    assert "invalid choice: 'lra'" in capsys.readouterr().err
    Run("mqar", tmp_path, torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x")
    assert cli_main(["reproduce", "mqar", "--out", str(tmp_path), "--resume", "--device", "cpu"]) == 2
    assert "saved state is from a --quick run" in capsys.readouterr().err


def _spec(steps=4):
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=17, ssm_cfg={"layer": "Mamba1", "d_state": 4})
    return ModelSpec("m", "m", config, TrainSettings(steps=steps, batch_size=2, log_every=1, warmup_steps=1))


def _batches(step, generator):
    return induction_heads(2, 16, generator=generator)


def test_time_budget_stops_and_resume_continues_exactly(tmp_path, monkeypatch):
    """A run stopped after 2 of 4 steps and resumed ends with the weights and losses of an uninterrupted run."""
    whole = Run("t", tmp_path / "whole", torch.device("cpu"), quick=True, resume=False, time_budget_s=None,
                command="x", progress=False)
    reference = whole.train(_spec(), _batches, logits_to_keep=1)

    calls = {"n": 0}

    def stop_after_two_steps(self):  # 1st call: before training; 2nd and 3rd: steps 0 and 1; then out of time
        calls["n"] += 1
        return calls["n"] > 3

    monkeypatch.setattr(Run, "out_of_time", stop_after_two_steps)
    cut = Run("t", tmp_path / "cut", torch.device("cpu"), quick=True, resume=False, time_budget_s=1.0, command="x",
              progress=False)
    assert cut.train(_spec(), _batches, logits_to_keep=1) is None
    assert cut.unfinished() == UNFINISHED
    saved = torch.load(tmp_path / "cut" / "_state" / "m" / "train.pt", weights_only=False)
    assert saved["step"] == 2
    monkeypatch.undo()

    resumed = Run("t", tmp_path / "cut", torch.device("cpu"), quick=True, resume=True, time_budget_s=None,
                  command="x", progress=False)
    model = resumed.train(_spec(), _batches, logits_to_keep=1)
    assert model is not None and (tmp_path / "cut" / "_state" / "m" / "done.json").exists()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.training_record(_spec())["losses"] == whole.training_record(_spec())["losses"]
    again = resumed.train(_spec(), _batches, logits_to_keep=1)  # a finished model loads instead of retraining
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_an_evaluation_that_would_overrun_the_budget_waits_for_the_next_piece(tmp_path):
    """cached() times each evaluation; one of a name that took longer than the time left is not started (the piece
    ends within its budget, and the next piece runs it), unless it could never fit in a budget."""
    run = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=False, time_budget_s=100.0, command="x",
              progress=False)
    assert run.cached("a", "val", lambda: {"bits": 1.0}) == {"bits": 1.0}  # nothing timed yet: it runs
    timing = tmp_path / "_state" / "evals" / "a" / "val.time.json"
    assert json.loads(timing.read_text())["seconds"] >= 0
    timing.write_text(json.dumps({"seconds": 30.0}))  # as if model a's evaluation had taken 30 s
    run.deadline = time.monotonic() + 10.0
    assert run.cached("b", "val", lambda: {"bits": 2.0}) is None and run.incomplete
    assert run.cached("b", "other", lambda: {"n": 3}) == {"n": 3}  # another evaluation: not timed yet
    run.deadline = time.monotonic() + 60.0
    assert run.cached("b", "val", lambda: {"bits": 2.0}) == {"bits": 2.0}
    timing.write_text(json.dumps({"seconds": 500.0}))  # longer than any piece's budget: waiting would never end
    run.deadline = time.monotonic() + 10.0
    assert run.cached("c", "val", lambda: {"bits": 4.0}) == {"bits": 4.0}


def test_more_steps_extend_a_finished_model_exactly(tmp_path):
    """--resume --steps 6 after a 4-step run equals a 6-step run (constant lr after warmup), and drops the
    finished model's cached evaluations."""
    straight = Run("t", tmp_path / "a", torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x",
                   progress=False, steps=6)
    reference = straight.train(_spec(), _batches, logits_to_keep=1)
    first = Run("t", tmp_path / "b", torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x",
                progress=False)
    first.train(_spec(), _batches, logits_to_keep=1)
    assert first.cached(_spec(), "test", lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
    extended = Run("t", tmp_path / "b", torch.device("cpu"), quick=True, resume=True, time_budget_s=None, command="x",
                   progress=False, steps=6)
    model = extended.train(_spec(), _batches, logits_to_keep=1)
    assert extended.training_record(_spec())["steps"] == 6
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert extended.cached(_spec(), "test", lambda: {"accuracy": 0.75}) == {"accuracy": 0.75}  # recomputed


@pytest.mark.parametrize("change", ["lr", "config", "recipe_extra"])
def test_a_model_whose_recipe_changed_trains_again(tmp_path, capsys, change):
    """A finished model whose settings, config or recorded extras (`recipe_extra`: selective copying's length
    curriculum) changed since is not reused: its state and evaluations are dropped and it trains from scratch, as a
    fresh run of the new recipe would; unchanged, it loads."""
    def run(out, resume=True):
        return Run("t", tmp_path / out, torch.device("cpu"), quick=True, resume=resume, time_budget_s=None,
                   command="x", progress=False)

    old = _spec()
    old_extra = new_extra = None
    if change == "recipe_extra":
        new, old_extra, new_extra = old, {"curriculum": [[16, 1]]}, {"curriculum": [[16, 2]]}
    elif change == "lr":
        new = dataclasses.replace(old, train=dataclasses.replace(old.train, lr=3e-3))
    else:
        new = dataclasses.replace(old, config=dataclasses.replace(old.config, ssm_cfg={"layer": "Mamba1", "d_state": 8}))
    first = run("a", resume=False)
    first.train(old, _batches, logits_to_keep=1, recipe_extra=old_extra)
    assert first.cached(old, "test", lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
    again = run("a")
    assert torch.equal(again.train(old, _batches, logits_to_keep=1, recipe_extra=old_extra).lm_head.weight,
                       first.trained_model(old).lm_head.weight)  # unchanged: loaded
    assert "changed" not in capsys.readouterr().err
    changed = run("a").train(new, _batches, logits_to_keep=1, recipe_extra=new_extra)
    assert "m's settings changed since its state was saved" in capsys.readouterr().err
    fresh = run("fresh", resume=False).train(new, _batches, logits_to_keep=1, recipe_extra=new_extra)
    for (name, a), b in zip(changed.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert run("a").cached(new, "test", lambda: {"accuracy": 0.75}) == {"accuracy": 0.75}  # recomputed
    assert json.loads((tmp_path / "a" / "_state" / "m" / "recipe.json").read_text())["settings"]["lr"] == \
        new.train.lr


def test_early_stopping_stops_once_the_target_is_met_twice(tmp_path):
    """validate() runs every eval_every steps; two consecutive evaluations at the target stop the model, and a
    model that stopped early counts as finished (it loads, and --steps does not extend it)."""
    settings = TrainSettings(steps=20, batch_size=2, log_every=1, warmup_steps=1, eval_every=2, target=0.9)
    spec = ModelSpec("m", "m", _spec().config, settings)
    scores = iter([0.5, 0.95, 0.4, 0.92, 0.97, 0.1])
    calls = []

    def validate(model):
        calls.append(model.training)
        return {"accuracy": next(scores)}

    run = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x",
              progress=False)
    model = run.train(spec, _batches, logits_to_keep=1, validate=validate)
    record = run.training_record(spec)
    assert model is not None and record["steps"] == 10 and record["early_stop_step"] == 10
    assert [s for s, _ in record["val_history"]] == [2, 4, 6, 8, 10] and calls == [False] * 5  # eval mode
    assert model.training is False
    extended = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=True, time_budget_s=None, command="x",
                   progress=False, steps=40)
    again = extended.train(spec, _batches, logits_to_keep=1, validate=validate)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight) and len(calls) == 5
    assert "at most 20 steps" in settings.describe() and "stopped early" in settings.describe()


def test_an_unmeasured_validation_metric_is_not_met():
    from mambakit.reproduce.common import _target_met

    settings = TrainSettings(steps=10, batch_size=2, target=0.9, eval_every=1)
    assert _target_met([[1, {"a": 0.95, "b": 0.91}], [2, {"a": 1.0, "b": 0.9}]], settings)
    assert not _target_met([[1, {"a": 0.95, "b": None}], [2, {"a": 1.0, "b": 0.95}]], settings)
    assert not _target_met([[1, {"a": 0.95, "b": 0.95}], [2, {"a": 1.0, "b": 0.89}]], settings)
    assert not _target_met([[2, {"a": 1.0, "b": 1.0}]], settings)  # one evaluation of the two needed


def test_induction_heads_validates_the_long_length_only_once_the_training_length_passes(monkeypatch):
    from mambakit.reproduce import induction_heads as ih

    s = ih.settings(quick=False)
    assert s["val_long"] == 2 ** 20  # the stop is judged at the longest test length
    calls, short_scores = [], iter([0.5, 1.0])

    def fake_evaluate(model, T, s_, device, attention, seed, rows):
        calls.append((T, rows, seed))
        return {"accuracy": next(short_scores) if T == s["train_len"] else 0.97, "samples": rows}

    monkeypatch.setattr(ih, "evaluate_at", fake_evaluate)
    validate = ih.validation(s, torch.device("cpu"), attention=False)
    assert validate(None) == {"T256": 0.5, f"T{2 ** 20}": None}
    assert validate(None) == {"T256": 1.0, f"T{2 ** 20}": 0.97}
    assert calls == [(256, s["val_rows"], ih.VAL_SEED), (256, s["val_rows"], ih.VAL_SEED),
                     (2 ** 20, s["val_long_rows"], ih.VAL_SEED)]
    short_scores = iter([1.0])
    assert ih.validation(s, torch.device("cpu"), attention=True)(None) == {"T256": 1.0}


def test_induction_heads_attention_trains_at_its_own_rate():
    """At the SSMs' lr 2e-3 both attention models stayed at chance on the H200; they train at the paper's 2e-4.
    The Mamba row trains with state passing (the paper's recipe did not extrapolate here) and longer than the
    others, with early stopping and the best-kept weights."""
    from mambakit.reproduce import induction_heads as ih

    s = ih.settings(quick=False)
    specs = {spec.key: spec.train for spec in ih.model_specs(s)}
    assert specs["mha-rope"].lr == specs["mha-abs"].lr == s["attn_lr"] == 2e-4
    assert {specs[k].lr for k in specs if not k.startswith("mha")} == {s["lr"]}
    mamba = specs["mamba"]
    assert mamba.state_passing and not any(specs[k].state_passing for k in specs if k != "mamba")
    assert (mamba.batch_size, mamba.steps, mamba.eval_every) == (s["batch_size"], s["mamba_steps"],
                                                                 s["mamba_eval_every"])
    assert mamba.steps > specs["mamba2"].steps
    assert (mamba.min_lr_ratio, mamba.weight_decay, mamba.target) == (1.0, 0.0, s["target"])
    assert "state passing" in ih._readme([], s)


def test_a_model_that_never_meets_the_target_keeps_its_best_evaluation(tmp_path, monkeypatch):
    """Without an early stop the model ends as the weights of its best validation (the latest of equals; an
    unmeasured metric counts as the worst), also across a time-budget stop and a resume; done.json says which
    step that was. Constant lr on the CPU: those weights equal a run of that many steps."""
    settings = TrainSettings(steps=8, batch_size=2, log_every=1, warmup_steps=1, eval_every=2, target=0.99)
    spec = ModelSpec("m", "m", _spec().config, settings)
    scores = {2: (0.5, 0.5), 4: (0.9, 0.8), 6: (0.9, None), 8: (0.3, 0.3)}

    def validate(model):
        step = len(seen) * 2 + 2
        seen.append(step)
        short, long = scores[step]
        return {"short": short, "long": long}

    seen, asked = [], []
    # the time budget ends after step 5: asked once before training (the claim), then before each step
    monkeypatch.setattr(Run, "out_of_time", lambda self: asked.append(1) or len(asked) > 6)
    stopped = Run("t", tmp_path / "a", torch.device("cpu"), quick=True, resume=False, time_budget_s=50.0,
                  command="x", progress=False)
    assert stopped.train(spec, _batches, logits_to_keep=1, validate=validate) is None
    monkeypatch.undo()
    saved = torch.load(tmp_path / "a" / "_state" / "m" / "train.pt", weights_only=False)
    assert saved["step"] == 5 and saved["best"]["step"] == 4  # the best so far travels with the state
    resumed = Run("t", tmp_path / "a", torch.device("cpu"), quick=True, resume=True, time_budget_s=None,
                  command="x", progress=False)
    model = resumed.train(spec, _batches, logits_to_keep=1, validate=validate)
    record = resumed.training_record(spec)
    assert seen == [2, 4, 6, 8] and record["steps"] == 8 and record["early_stop_step"] is None
    assert record["selected_step"] == 4
    four = Run("t", tmp_path / "b", torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x",
               progress=False).train(ModelSpec("m", "m", _spec().config, dataclasses.replace(
                   settings, steps=4, eval_every=0, target=None)), _batches, logits_to_keep=1)
    for (name, a), b in zip(model.state_dict().items(), four.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(resumed.trained_model(spec).lm_head.weight, four.lm_head.weight)  # saved as selected


def test_state_passing_carries_states_and_resumes_exactly(tmp_path, monkeypatch):
    """With state_passing each batch starts from the previous batch's final states: the training differs from
    zero-state training, the states are saved, and a run cut after 2 of 4 steps resumes to the same weights."""
    def spec(passing=True):
        return ModelSpec("m", "m", _spec().config, TrainSettings(steps=4, batch_size=2, log_every=1, warmup_steps=1,
                                                                 state_passing=passing))

    def run(folder, resume=False):
        return Run("t", tmp_path / folder, torch.device("cpu"), quick=True, resume=resume, time_budget_s=None,
                   command="x", progress=False)

    whole = run("whole").train(spec(), _batches, logits_to_keep=1)
    plain = run("plain").train(spec(False), _batches, logits_to_keep=1)
    assert not torch.equal(whole.lm_head.weight, plain.lm_head.weight)
    saved = torch.load(tmp_path / "whole" / "_state" / "m" / "train.pt", weights_only=False)
    assert saved["states"].layers[0].ssm_state.abs().sum() > 0
    assert not saved["states"].layers[0].ssm_state.requires_grad
    assert "state passing" in spec().train.describe()

    calls = {"n": 0}

    def stop_after_two_steps(self):
        calls["n"] += 1
        return calls["n"] > 3

    monkeypatch.setattr(Run, "out_of_time", stop_after_two_steps)
    assert run("cut").train(spec(), _batches, logits_to_keep=1) is None
    monkeypatch.undo()
    resumed = run("cut", resume=True).train(spec(), _batches, logits_to_keep=1)
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), name


def test_seeds_change_initialisation_and_batches_only_through_the_seed(tmp_path):
    """A run is a function of its seed on the CPU: the same seed twice gives the same weights, another seed others."""
    def trained(folder, seed):
        run = Run("t", tmp_path / folder, torch.device("cpu"), quick=True, resume=False, time_budget_s=None,
                  command="x", progress=False)
        spec = seeded(_spec(steps=2), seed)
        assert spec.key == f"m-seed{seed}" and spec.train.seed == seed
        return run.train(spec, lambda step, g: induction_heads(2, 16, generator=g), logits_to_keep=1)

    a, b, c = trained("a", 1), trained("b", 1), trained("c", 2)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("values, median, index", [
    pytest.param([0.3, 0.9, 0.5], 0.5, 2, id="odd"),
    pytest.param([0.2, 0.4], 0.30000000000000004, 0, id="even-lower-median-seed"),
    pytest.param([0.7], 0.7, 0, id="one"),
])
def test_spread_and_median_seed(values, median, index):
    assert spread(values) == {"median": pytest.approx(median), "min": min(values), "max": max(values)}
    assert median_index(values) == index


def test_train_settings_describe_the_schedule():
    text = TrainSettings(steps=10, batch_size=4, lr=2e-3, warmup_steps=3).describe()
    assert text.startswith("10 steps of 4 fresh rows") and "lr 0.002 after a 3-step linear warmup then constant" in text
    assert "weight decay 0," in text
    assert "cosine to 0.1 x lr" in TrainSettings(steps=10, batch_size=4, min_lr_ratio=0.1).describe()


def test_without_resume_the_state_is_discarded(tmp_path):
    run = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x", progress=False)
    run.train(_spec(steps=1), _batches)
    assert (tmp_path / "_state" / "m" / "done.json").exists()
    Run("t", tmp_path, torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x", progress=False)
    assert not (tmp_path / "_state" / "m").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_runs_on_cuda(tmp_path, name):
    """Every experiment's pipeline on the GPU (Triton kernels, bf16 autocast, flash attention, S4D's kernel in
    pieces, the U-Nets' sampling) before a full-size run."""
    assert reproduce(name, tmp_path, quick=True, device="cuda", progress=False) == FINISHED
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == torch.cuda.get_device_name() and results["rows"]
    losses = [r[k] for r in results["rows"] for k in ("final_loss", "final_train_loss") if k in r]
    assert all(loss > 0 for loss in losses)


def test_budget_line_reports_the_steps_really_trained():
    settings = TrainSettings(steps=10, batch_size=4)
    assert settings.describe([{"steps": 25}, {"steps": 25}]).startswith("25 steps of 4")
    assert settings.describe([{"steps": 10}, {"steps": 25}]).startswith("the steps in results.json of 4")


def test_a_worker_trains_only_the_models_no_other_worker_claimed(tmp_path):
    """Workers share one state folder: a model claimed by another worker is skipped (None, and the run is not
    ready for results), an unclaimed one is claimed and trained, and its claim goes when the worker ends."""
    other = _spec()
    other.key = "taken"
    claims = tmp_path / "_state" / "claims"
    claims.mkdir(parents=True)
    (claims / "taken").write_text("worker 1\n")
    worker = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=True, time_budget_s=None, command="x",
                 worker=0)
    assert worker.train(other, _batches, logits_to_keep=1) is None
    assert worker.incomplete and not worker.results_ready()
    assert not (tmp_path / "_state" / "taken").exists()  # not even started
    assert worker.train(_spec(), _batches, logits_to_keep=1) is not None
    assert (claims / "m").exists() and (tmp_path / "_state" / "m" / "done.json").exists()
    assert worker.cached(_spec(), "test", lambda: {"accuracy": 1.0}) == {"accuracy": 1.0}
    assert worker.cached(other, "test", lambda: {"accuracy": 0.0}) is None  # another worker's evaluation
    worker.release_claims()
    assert not (claims / "m").exists() and (claims / "taken").exists()
    assert not (tmp_path / "_state" / "run.json").exists()  # the parent keeps the run's time, not a worker
    # the parent (no worker index) sees the finished model and may always claim
    parent = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=True, time_budget_s=None, command="x")
    assert parent.train(_spec(), _batches, logits_to_keep=1) is not None and parent.results_ready()


def _serial_and_two_workers(name: str, tmp_path, capfd) -> tuple[list[dict], list[dict], list[str]]:
    """The rows of `name` (--quick, CPU) from one process and from two workers, and the models the workers claimed.
    Neither run may retrain a model whose recipe it just saved (two spellings of one model under one key did)."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert reproduce(name, serial, quick=True, device="cpu", progress=False) == FINISHED
    assert "settings changed" not in capfd.readouterr().err
    assert reproduce(name, parallel, quick=True, device="cpu", progress=False, workers=2) == FINISHED
    log = capfd.readouterr().err
    # which worker claims what is timing: on a loaded machine one worker may take every model of a short --quick
    # list before the other has started (CI, 2026-12-05: dna-context's four); each model trained exactly once and
    # the rows of one process are what the callers check
    assert "[worker " in log and "settings changed" not in log
    assert not (parallel / "_state" / "claims").exists()
    claimed = [line.split(": ")[-1] for line in log.splitlines() if line.startswith("[worker ")]
    serial_rows, parallel_rows = (json.loads((d / "results.json").read_text())["rows"] for d in (serial, parallel))
    return serial_rows, parallel_rows, claimed


@pytest.mark.slow
def test_workers_divide_the_models_and_give_the_results_of_one_process(tmp_path, capfd):
    """reproduce(..., workers=2): two processes train the models between them (each model once), and the results
    equal a single process's (on the CPU a model is a function of its seed)."""
    a, b, claimed = _serial_and_two_workers("mqar", tmp_path, capfd)
    assert sorted(claimed) == sorted(f"{r['model']}-seed{x['seed']}" for r in a for x in r["seeds"])
    for ra, rb in zip(a, b):
        assert ra["model"] == rb["model"]
        assert [(x["accuracy"], x["final_loss"]) for x in ra["seeds"]] == \
            [(x["accuracy"], x["final_loss"]) for x in rb["seeds"]]


@pytest.mark.slow
def test_ablations_workers_train_every_row_once_and_give_the_rows_of_one_process(tmp_path, capfd):
    """Every ablation row is its own model: two workers divide them (a config in two tables is trained once) and
    the results equal a single process's (on the CPU a model is a function of its seed)."""
    a, b, claimed = _serial_and_two_workers("ablations", tmp_path, capfd)
    assert sorted(claimed) == sorted({r["key"] for r in a})  # each distinct model once
    assert [(r["table"], r["label"], r["val_loss"]) for r in a] == [(r["table"], r["label"], r["val_loss"]) for r in b]


@pytest.mark.slow
@pytest.mark.parametrize("name, metric", [("dna-species", "accuracy"), ("dna-context", "perplexity"),
                                          ("spoken-digits", "fid"), ("audio-context", "bits_per_sample")])
def test_dna_workers_train_every_model_once_and_give_the_rows_of_one_process(tmp_path, capfd, name, metric):
    """One model per (mixer, window or context; spoken digits: the digit classifier and each U-Net): two workers
    divide them, a worker that meets another's model goes on to the next instead of stopping, and the results equal
    a single process's (spoken digits: the U-Nets' generated clips judged by the classifier another worker trained)."""
    a, b, claimed = _serial_and_two_workers(name, tmp_path, capfd)
    judge = ["digit-classifier"] if name == "spoken-digits" else []
    assert sorted(claimed) == sorted([r["model"] for r in a] + judge)
    assert [(r["model"], r[metric], r["final_loss"]) for r in a] == [(r["model"], r[metric], r["final_loss"]) for r in b]


def test_with_steps_puts_the_steps_override_into_the_settings(tmp_path):
    """`--steps N` reaches an experiment's settings (its README, results.json and step-derived schedules such as
    dna-context's warm-up), not only the training loop."""
    def run(steps):
        return Run("t", tmp_path, torch.device("cpu"), quick=True, resume=False, time_budget_s=None, command="x",
                   progress=False, steps=steps)

    s = {"steps": 2000, "lr": 1e-3}
    assert run(None).with_steps(s) is s
    assert run(800).with_steps(s) == {"steps": 800, "lr": 1e-3} and s["steps"] == 2000


def test_workers_are_refused_for_an_experiment_whose_models_depend_on_each_other(tmp_path, capsys):
    with pytest.raises(ValueError, match="selective-copying, induction-heads, mqar, .*ablations"):
        reproduce("lm-scaling", tmp_path, quick=True, device="cpu", workers=2)  # its sizes wait for the lr sweep
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        reproduce("mqar", tmp_path, quick=True, device="cpu", workers=0)
    assert cli_main(["reproduce", "lm-scaling", "--quick", "--out", str(tmp_path), "--workers", "3"]) == 2
    assert "depend on each other" in capsys.readouterr().err


def test_a_quick_run_without_out_stays_out_of_results(tmp_path, monkeypatch, capsys):
    """--quick numbers mean nothing: without --out they go to the temporary directory, never results/NAME/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cli_main(["reproduce", "mqar", "--quick", "--device", "cpu", "--no-progress"]) == 0
    assert not (tmp_path / "results").exists()
    out = tmp_path / "tmp" / "mambakit-reproduce-quick-mqar"
    assert (out / "results.json").exists()
    assert f"results in {out}" in capsys.readouterr().out


def test_selective_copying_curriculum_lengths():
    """Batch `step`'s row length: each (L, steps) stage in turn, then the full L from the curriculum's end on (so
    --steps extends a model at full length); an empty curriculum is the full L throughout."""
    from mambakit.reproduce.selective_copying import CURRICULUM, seqlen_at, settings

    s = settings(quick=False)
    assert s["curriculum"] == CURRICULUM and sum(n for _, n in CURRICULUM) == 1600
    assert [seqlen_at(t, s) for t in (0, 299, 300, 599, 600, 799, 800, 1399, 1400, 1599, 1600, 4999)] == \
        [32, 32, 64, 64, 128, 128, 256, 1024, 2048, 2048, 4096, 4096]
    assert seqlen_at(0, {**s, "curriculum": []}) == 4096


def test_mqar_curriculum_lengths_and_batches():
    """MQAR's stages: T 32 and each doubling below the tested length, 300 steps each, then the tested length; every
    batch has K = length / 8 pairs (the scored queries) and is the same for the same step and generator seed."""
    from mambakit.reproduce.mqar import _batch, curriculum, seqlen_at, settings

    s = settings(quick=False)
    assert curriculum(256, s) == [(32, 300), (64, 300), (128, 300)]
    assert curriculum(512, s) == [(32, 300), (64, 300), (128, 300), (256, 300)]
    assert curriculum(32, s) == []
    assert [seqlen_at(t, 256, s) for t in (0, 299, 300, 599, 600, 899, 900, 3999)] == [32, 32, 64, 64, 128, 128,
                                                                                        256, 256]
    assert [seqlen_at(t, 512, s) for t in (899, 900, 1199, 1200)] == [128, 256, 256, 512]
    for step, length in ((0, 32), (450, 64), (700, 128), (950, 256)):
        batch = _batch(step, 256, s, torch.Generator().manual_seed(5))
        assert batch.inputs.shape == (s["batch_size"], length)
        assert int(batch.scored.sum()) == s["batch_size"] * length // 8
        again = _batch(step, 256, s, torch.Generator().manual_seed(5))
        assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)


def test_a_worker_out_of_device_memory_says_so_and_the_command_says_what_to_do(tmp_path, monkeypatch, capsys):
    """A worker whose model runs out of device memory exits with OUT_OF_MEMORY and one line (its claims released);
    the parent names the workers and says to resume with fewer of them, and the CLI prints that line, exit 1."""
    import mambakit.reproduce as reproduce_pkg
    from mambakit.cli.__main__ import main
    from mambakit.reproduce import worker

    class Exhausting:
        @staticmethod
        def run(run):
            assert run._claim("big-model")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(reproduce_pkg, "experiment", lambda name: Exhausting)
    spec = {"name": "mqar", "out": str(tmp_path), "quick": True, "device": "cpu", "time_budget_s": None,
            "steps": None, "command": "x", "index": 1}
    assert worker.main([json.dumps(spec)]) == worker.OUT_OF_MEMORY
    assert capsys.readouterr().err.endswith("[worker 1] mqar: out of memory on cpu (big-model)\n")
    assert not (tmp_path / "_state" / "claims" / "big-model").exists()

    class Finished:
        def __init__(self, status):
            self.status = status

        def wait(self):
            return self.status

    statuses = iter([0, worker.OUT_OF_MEMORY, 3, worker.OUT_OF_MEMORY])
    monkeypatch.undo()  # the CLI below must see the real experiments
    monkeypatch.setattr(worker.subprocess, "Popen", lambda *a, **k: Finished(next(statuses)))
    code = main(["reproduce", "mqar", "--quick", "--device", "cpu", "--out", str(tmp_path / "run"), "--workers", "4",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert ("mambakit reproduce: error: reproduce mqar: worker(s) 1, 3 of 4 ran out of cpu memory: their models do "
            "not fit the device together. Run the same command with --resume and fewer --workers") in err
    assert "Traceback" not in err
