"""mambakit.reproduce: the papers' synthetic experiments as functions, one module per experiment.

    reproduce("selective-copying", out="results/selective-copying", device="cuda")   # -> exit status (0 = done)

Each experiment module exposes NAME, SUMMARY, settings(quick) and run(run: common.Run) -> status; `common`
holds the shared training loop, resume state, evaluation memo and results writer. See README.md here.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from .common import FINISHED, UNFINISHED, Run

EXPERIMENTS: dict[str, str] = {
    "selective-copying": "mambakit.reproduce.selective_copying",
    "induction-heads": "mambakit.reproduce.induction_heads",
    "mqar": "mambakit.reproduce.mqar",
    "dna-context": "mambakit.reproduce.dna_context",
    "dna-species": "mambakit.reproduce.dna_species",
    "spoken-digits": "mambakit.reproduce.spoken_digits",
    "audio-context": "mambakit.reproduce.audio_context",
    "lm-scaling": "mambakit.reproduce.lm_scaling",
    "ablations": "mambakit.reproduce.ablations",
}

__all__ = ["EXPERIMENTS", "FINISHED", "UNFINISHED", "Run", "default_out", "experiment", "reproduce"]


def experiment(name: str):
    """The module of experiment `name` (a key of EXPERIMENTS); ValueError naming the choices otherwise."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def default_out(name: str, quick: bool) -> Path:
    """Where `reproduce` writes without `out`: results/<name>, or for a quick run (whose numbers mean nothing) a
    folder in the temporary directory, never over the committed results."""
    return Path(tempfile.gettempdir()) / f"mambakit-reproduce-quick-{name}" if quick else Path("results") / name


def reproduce(name: str, out: str | Path | None = None, *, quick: bool = False, device: str = "auto",
              resume: bool = False, time_budget_s: float | None = None, steps: int | None = None,
              progress: bool = True, command: str | None = None, workers: int = 1,
              cuda_graph: bool = True) -> int:
    """Run experiment `name`, writing results under `out` (default results/<name>, or with `quick` a folder in the
    temporary directory: quick numbers never land on the committed ones); returns FINISHED (0) or
    UNFINISHED (3: the time budget ran out; call again with resume=True to continue).

    Args:
        quick: tiny settings that exercise the whole pipeline in seconds on a CPU (numbers meaningless).
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        resume: continue from <out>/_state (without it, that state is discarded and the run starts over).
        time_budget_s: stop cleanly after this many seconds of this call, saving the state.
        steps: override every model's training step budget.
        command: the command line recorded in results.json / README.md (default: the equivalent CLI call).
        workers: train up to this many models at once, each in its own process (experiments whose models are
            independent: selective-copying, induction-heads, mqar, ablations, dna-species, dna-context, spoken-digits,
            audio-context). Where the host sets the pace of a step, as for induction heads' small models (GPU busy
            16% of a step on an H200), N processes on one GPU train up to ~N times as many models per hour (6
            workers: 4x); selective copying at L = 4096 keeps the GPU busy and gains little. With several GPUs and
            device "cuda", worker i uses GPU i mod count. Each model keeps its seed, batches and early stopping;
            this call then writes the results.
        cuda_graph: on CUDA, replay each model's training steps from one captured CUDA graph per batch shape
            (training.GraphedTrainStep, the learning rate read from a tensor, so the schedule's warm-up and cosine
            are graphed too; the same computation, one launch per step instead of hundreds). False: every step
            eager.

    Example:
        >>> status = reproduce("induction-heads", quick=True, out="/tmp/ih")      # CPU, a few seconds
    """
    from ..training import resolve_device

    module = experiment(name)
    out = default_out(name, quick) if out is None else Path(out)
    if command is None:
        command = f"mambakit reproduce {name}" + (" --quick" if quick else "") + (f" --steps {steps}" if steps else "")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers > 1 and not getattr(module, "INDEPENDENT_MODELS", False):
        parallel = ", ".join(n for n in EXPERIMENTS if getattr(experiment(n), "INDEPENDENT_MODELS", False))
        raise ValueError(f"{name}: its models depend on each other's results, so it runs in one process; "
                         f"workers > 1 is for {parallel}")
    run = Run(name, out, device=resolve_device(device), quick=quick, resume=resume, time_budget_s=time_budget_s,
              command=command, progress=progress, steps=steps, cuda_graph=cuda_graph)
    if workers > 1:
        from .worker import run_workers

        if hasattr(module, "prepare"):  # data the workers all read (quick stand-ins), written once before they start
            module.prepare(run)
        run_workers(run, workers, device)
    return module.run(run)
