"""mambakit.bench: `mambakit bench kernels|train|generate|prefill|quantize`, measured in one process, written as JSON + PNG.

    from mambakit.bench import run_bench
    run_bench("kernels", device="cpu", quick=True, out="/tmp/bench")   # kernels.json, kernels_*.png

See README.md in this folder for what each benchmark measures and docs/benchmarks.md for how to read the plots.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

BENCHMARKS = ("kernels", "train", "generate", "prefill", "quantize")


def run_bench(what: str, device: str | torch.device = "cpu", quick: bool = False, out: str | Path = "results/bench",
              model: str | None = None, command: str = "", log=print, peers: bool = True) -> list[Path]:
    """Run one benchmark and write out/<what>.json and its PNG plots; returns the paths written.

    `model` (quantize only) is a trained checkpoint directory for the quality figures (bits per byte, agreement);
    `peers=False` leaves the other libraries out (kernels, generate), each named in the JSON's notes.
    """
    if what not in BENCHMARKS:
        raise ValueError(f"run_bench: what must be one of {BENCHMARKS}, got {what!r}")
    if model is not None and what != "quantize":
        raise ValueError(f"run_bench: model is used by 'quantize' only, got it with {what!r}")
    from .report import environment, write_results

    device = torch.device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if what == "kernels":
        from .kernels import plot_kernels as plot, run_kernels

        result = run_kernels(device, quick, log, peers)
    elif what == "train":
        from .train import plot_train as plot, run_train

        result = run_train(device, quick, log)
    elif what == "generate":
        from .generate import plot_generate as plot, run_generate

        result = run_generate(device, quick, log, peers)
    elif what == "prefill":
        from .prefill import plot_prefill as plot, run_prefill

        result = run_prefill(device, quick, log)
    else:
        from .quantize import plot_quantize as plot, run_quantize

        result = run_quantize(device, quick, model, log)
    result["quick"] = quick
    path = write_results(out_dir, what, result, command=command, device=device, seconds=time.perf_counter() - t0)
    pngs = plot(result, out_dir, environment(device)["device"])
    for note in result.get("notes", []):
        log(f"note: {note}")
    return [path] + [out_dir / p for p in pngs]


__all__ = ["BENCHMARKS", "run_bench"]
