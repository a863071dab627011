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
