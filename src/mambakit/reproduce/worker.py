"""`reproduce(..., workers=N)`'s processes: N copies of one experiment sharing its state folder.

Every worker walks the experiment's models in its usual order and trains (then evaluates) each model that no
other worker has claimed (`Run._claim`: an exclusive file in _state/claims/), so the N processes divide the models
between them without a plan; a finished model is only loaded. The parent waits for all of them, then runs the
experiment itself, which finds every model trained and evaluated and writes the results (or, when the time budget
stopped the workers, exits UNFINISHED like a single process).

    python -m mambakit.reproduce.worker '{"name": "mqar", "out": "results/mqar", "index": 0, ...}'
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch

from .common import CLAIMS_DIR, Run

OUT_OF_MEMORY = 4  # a worker's exit status when its device ran out of memory (3 is the time budget's)


class WorkerError(RuntimeError):
    """A worker process failed; the message says which and, when it is known, why."""


def run_workers(run: Run, workers: int, device: str) -> None:
    """Start `workers` worker processes on `run`'s state folder, with what is left of its time budget, and wait
    for them. Raises WorkerError when a worker fails (its log is on this process's stderr); the models finished
    by then are saved, so the same command with --resume goes on from them."""
    shutil.rmtree(run.state / CLAIMS_DIR, ignore_errors=True)  # claims of a killed earlier run
    left = None if run.deadline is None else max(0.0, run.deadline - time.monotonic())
    procs = []
    for i in range(workers):
        spec = {"name": run.name, "out": str(run.out), "quick": run.quick, "device": _device_of(device, i),
                "time_budget_s": left, "steps": run.steps_override, "command": run.command, "index": i,
                "cuda_graph": run.cuda_graph}
        procs.append(subprocess.Popen([sys.executable, "-m", "mambakit.reproduce.worker", json.dumps(spec)]))
    statuses = [p.wait() for p in procs]
    shutil.rmtree(run.state / CLAIMS_DIR, ignore_errors=True)
    failed = [(i, s) for i, s in enumerate(statuses) if s not in (0, 3)]
    out_of_memory = [i for i, s in failed if s == OUT_OF_MEMORY]
    if out_of_memory:
        raise WorkerError(f"reproduce {run.name}: worker(s) {', '.join(map(str, out_of_memory))} of {workers} ran "
                          f"out of {run.device.type} memory: their models do not fit the device together. Run the "
                          "same command with --resume and fewer --workers (the finished models are kept)")
    if failed:
        raise WorkerError(f"reproduce {run.name}: worker(s) failed: "
                          + ", ".join(f"worker {i} exit status {s}" for i, s in failed))


def _device_of(device: str, index: int) -> str:
    """Worker `index`'s device: GPU index mod count for a bare "cuda" / "auto" on a machine with several GPUs."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


def main(argv: list[str]) -> int:
    from ..training import resolve_device
    from . import experiment

    spec = json.loads(argv[0])
    module = experiment(spec["name"])
    run = Run(spec["name"], spec["out"], device=resolve_device(spec["device"]), quick=spec["quick"], resume=True,
              time_budget_s=spec["time_budget_s"], command=spec["command"], steps=spec["steps"],
              worker=spec["index"], cuda_graph=spec.get("cuda_graph", True))
    try:
        return module.run(run)
    except torch.OutOfMemoryError:
        # one line instead of the traceback; the parent names every worker this happened to
        working = ", ".join(sorted(run._claimed)) or "its first model"
        sys.stderr.write(f"[worker {run.worker}] {run.name}: out of memory on {run.device} ({working})\n")
        return OUT_OF_MEMORY
    finally:
        run.release_claims()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main(sys.argv[1:]))
