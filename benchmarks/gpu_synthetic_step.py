"""One training step of the synthetic reproductions' models on the GPU: wall ms per step and where it goes.

For each chosen model of `mambakit reproduce selective-copying | induction-heads | mqar` (the full-size
settings), this trains it through the experiments' own loop (`Run.train`: bf16 autocast, AdamW, gradient
clipping, the experiment's batches) for --steps steps after a warm-up run, and prints per step: the wall time
(the run's own `train_s`), the GPU's busy time (the profiler's kernel and copy durations summed) and their
ratio. A ratio well below 1 means the step waits on the host (Python, launches, batch generation), so several
models trained at once in separate processes (`mambakit reproduce --workers N`) fill the idle GPU.

With --cuda-graph it compares instead the eager step with the step replayed from a CUDA graph (what `Run.train`
does on CUDA by default after the warm-up; here the warm-up is set to 0 so that the graph starts after its own 3
eager steps): wall ms per step each way over --steps steps, and the speed-up.

    python benchmarks/gpu_synthetic_step.py
    python benchmarks/gpu_synthetic_step.py --models selective-copying:mamba-s6 induction-heads:mha-rope --steps 50
    python benchmarks/gpu_synthetic_step.py --cuda-graph --steps 500 --batch 8 --models induction-heads:mamba
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import tempfile
from pathlib import Path

import torch
import triton

from mambakit.data.synthetic import induction_heads, mqar, selective_copying
from mambakit.models import build_model
from mambakit.reproduce import Run, experiment

DEFAULT = ["selective-copying:mamba-s6", "selective-copying:mamba-s4d", "induction-heads:mamba",
           "induction-heads:mamba2", "induction-heads:mha-rope", "mqar:mamba1-N256-T512", "mqar:mamba2-N256-T512",
           "mqar:attention-T512"]


def spec_and_batches(name: str, key: str, batch: int | None = None):
    """(ModelSpec, make_batch, logits_to_keep) of one full-size model of an experiment (batch: replace the spec's
    batch size)."""
    module = experiment(name)
    s = module.settings(False)
    if batch is not None:
        s["batch_size"] = batch
    if name == "mqar":
        T = int(key.rsplit("-T", 1)[1])
        spec = next(sp for sp in module.model_specs(s, T) if sp.key == key)
        K = T // s["kv_divisor"]
        return spec, (lambda step, g: mqar(s["batch_size"], T, K, s["vocab_size"], generator=g)), 0
    spec = next(sp for sp in module.model_specs(s) if sp.key == key)
    rows = spec.train.batch_size
    if name == "selective-copying":
        return spec, (lambda step, g: selective_copying(rows, s["seqlen"], 16, generator=g)), 16
    return spec, (lambda step, g: induction_heads(rows, s["train_len"], generator=g)), 1


def timed(spec, make_batch, keep: int, steps: int, profile: bool, cuda_graph: bool = False) -> tuple[float, float | None]:
    """(wall ms per step, GPU busy ms per step or None) of `steps` steps of Run.train in a fresh directory."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with tempfile.TemporaryDirectory() as tmp:
        run = Run("step", Path(tmp), device=torch.device("cuda"), quick=False, resume=False, time_budget_s=None,
                  command="", progress=False, steps=steps, cuda_graph=cuda_graph)
        if not profile:
            run.train(spec, make_batch, logits_to_keep=keep)
            return 1e3 * run.training_record(spec)["train_s"] / steps, None
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            run.train(spec, make_batch, logits_to_keep=keep)
            torch.cuda.synchronize()
        busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        return 1e3 * run.training_record(spec)["train_s"] / steps, busy_us / 1e3 / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT, help="EXPERIMENT:KEY of each model")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--cuda-graph", action="store_true", help="compare eager steps with CUDA-graph replays")
    p.add_argument("--batch", type=int, default=None, help="replace the experiment's batch size")
    args = p.parse_args()
    print(f"# synthetic training steps, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, python {platform.python_version()}, {datetime.date.today()}\n")
    if args.cuda_graph:
        print("| experiment | model | batch | eager ms / step | graph ms / step | speed-up |")
        print("|---|---|---|---|---|---|")
    else:
        print("| experiment | model | params | ms / step | GPU busy ms / step | busy share |")
        print("|---|---|---|---|---|---|")
    for item in args.models:
        name, key = item.split(":", 1)
        spec, make_batch, keep = spec_and_batches(name, key, args.batch)
        if args.cuda_graph:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, warmup_steps=0, eval_every=0))
            timed(spec, make_batch, keep, 10, profile=False, cuda_graph=True)  # compile, warm the allocator
            eager, _ = timed(spec, make_batch, keep, args.steps, profile=False)
            graph, _ = timed(spec, make_batch, keep, args.steps, profile=False, cuda_graph=True)
            print(f"| {name} | {key} | {spec.train.batch_size} | {eager:.2f} | {graph:.2f} | {eager / graph:.1f}x |",
                  flush=True)
            continue
        timed(spec, make_batch, keep, 10, profile=False)  # compile the kernels, warm the allocator
        wall, _ = timed(spec, make_batch, keep, args.steps, profile=False)
        _, busy = timed(spec, make_batch, keep, args.steps, profile=True)
        params = sum(p.numel() for p in build_model(spec.config).parameters())
        print(f"| {name} | {key} | {params:,} | {wall:.2f} | {busy:.2f} | {busy / wall:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
