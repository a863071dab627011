"""`reproduce.dna_audio_common.train_module`, the resumable loop of the models that are not a
MambaLM (a small classifier here) stops at the time budget, resumes to the weights of an uninterrupted run,
and loads from _state/<key>/model.pt once finished."""

import json

import torch

from mambakit.reproduce.common import Run, TrainSettings
from mambakit.reproduce.dna_audio_common import train_module

SETTINGS = TrainSettings(steps=4, batch_size=3, log_every=1, warmup_steps=1)


def _build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(3, 5, generator=generator), torch.randint(0, 3, (3,), generator=generator)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def _run(out, resume: bool) -> Run:
    return Run("t", out, torch.device("cpu"), quick=True, resume=resume, time_budget_s=None, command="x",
               progress=False)


def test_train_module_resumes_exactly_and_loads_when_done(tmp_path, monkeypatch):
    reference = train_module(_run(tmp_path / "whole", False), "clf", _build, SETTINGS, _batch, _loss)
    assert reference is not None and not reference.training

    calls = {"n": 0}

    def stop_after_two_steps(self):  # 1st call: before training; 2nd and 3rd: steps 0 and 1; then out of time
        calls["n"] += 1
        return calls["n"] > 3

    monkeypatch.setattr(Run, "out_of_time", stop_after_two_steps)
    assert train_module(_run(tmp_path / "cut", False), "clf", _build, SETTINGS, _batch, _loss) is None
    saved = torch.load(tmp_path / "cut" / "_state" / "clf" / "train.pt", weights_only=False)
    assert saved["step"] == 2
    monkeypatch.undo()

    resumed = _run(tmp_path / "cut", True)
    model = train_module(resumed, "clf", _build, SETTINGS, _batch, _loss)
    assert model is not None and (tmp_path / "cut" / "_state" / "clf" / "model.pt").exists()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "cut" / "_state" / "clf" / "done.json").read_text())
    whole = json.loads((tmp_path / "whole" / "_state" / "clf" / "done.json").read_text())
    assert record["steps"] == 4 and record["losses"] == whole["losses"] and len(whole["losses"]) == 4
    again = train_module(resumed, "clf", _build, SETTINGS, _batch, lambda *a: 1 / 0)  # loads: the loss never runs
    assert not again.training
    for (name, a), b in zip(again.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_train_module_validates_and_stops_early_as_run_train_does(tmp_path):
    """The loop is Run.fit's: validate() every eval_every steps in eval mode, an early stop once the target is met
    twice, a model stopped early counts as finished, and run.cached(key, ...) memoises its evaluations."""
    settings = TrainSettings(steps=20, batch_size=3, log_every=1, warmup_steps=1, eval_every=2, target=0.9)
    scores = iter([0.95, 0.5, 0.91, 0.99, 0.0])
    modes = []

    def validate(model):
        modes.append(model.training)
        return {"accuracy": next(scores)}

    run = _run(tmp_path, False)
    model = train_module(run, "clf", _build, settings, _batch, _loss, validate=validate)
    record = json.loads((tmp_path / "_state" / "clf" / "done.json").read_text())
    assert model is not None and not model.training
    assert record["steps"] == 8 and record["early_stop_step"] == 8 and modes == [False] * 4
    assert [step for step, _ in record["val_history"]] == [2, 4, 6, 8]
    longer = Run("t", tmp_path, torch.device("cpu"), quick=True, resume=True, time_budget_s=None, command="x",
                 progress=False, steps=40)
    again = train_module(longer, "clf", _build, settings, _batch, lambda *a: 1 / 0, validate=validate)
    assert torch.equal(again[0].weight, model[0].weight) and len(modes) == 4
    assert longer.cached("clf", "test", lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
    assert longer.cached("clf", "test", lambda: 1 / 0) == {"accuracy": 0.5}
    assert (tmp_path / "_state" / "evals" / "clf" / "test.json").exists()
