"""The training steps of `mambakit reproduce spoken-digits`, `audio-context` and `dna-context` on the GPU, at their
full-size shapes, and the audio U-Nets' sampling step: what a full run of each costs, before it is started.

For each U-Net of the experiments (Mamba-UNet, S4D-Lin+MLP, S4D-Real+MLP) and each shape, this trains it as the
experiments do (`training.GraphedTrainStep`: AdamW, bf16 autocast, gradient clipping 1, the step replayed from a
CUDA graph after 3 eager steps) on random mu-law levels, and prints ms per step, samples per second and the peak
memory (over the eager steps and the capture: what a replay uses is allocated then); then the ms per generated
sample of `sample_audio` (a batch of --gen-batch clips, one sample at a time; eager, and replayed from the
per-phase CUDA graphs of `UNetStepGraphs`, whose capture is reported apart). The last column multiplies out a
full run's training time at the experiment's default steps. --dna: the DNA language models of dna-context instead
(Mamba and S4D, 2^20 tokens a step at every context; the experiment's loss).

    python benchmarks/gpu_repro_step.py
    python benchmarks/gpu_repro_step.py --steps 50 --shapes spoken ctx2^11 ctx2^17
    python benchmarks/gpu_repro_step.py --dna --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
import torch.nn.functional as F
import triton

from mambakit.models import build_model
from mambakit.models.unet import AudioUNet, UNetConfig, sample_audio
from mambakit.reproduce import experiment
from mambakit.training.cuda_graph import GraphedTrainStep


def shapes() -> dict[str, tuple[int, int, int]]:
    """name -> (batch, samples per row, the experiment's steps per model) at the full-size settings."""
    digits, context = experiment("spoken-digits").settings(False), experiment("audio-context").settings(False)
    out = {"spoken": (digits["batch_size"], digits["clip_samples"], digits["steps"])}
    for k in context["contexts_log2"]:
        out[f"ctx2^{k}"] = (max(1, context["samples_per_step"] // 2 ** k), 2 ** k, context["steps"])
    return out


def unet(key: str) -> AudioUNet:
    module = experiment("spoken-digits")
    s, m = module.settings(False), module.MODELS[key]
    return AudioUNet(UNetConfig(d_model=s["d_model"], n_layers=s["n_layers"], pool=s["pool"], mixer=m["mixer"],
                                mlp=m["mlp"], d_state=s["d_state"]))


def train_ms(model: torch.nn.Module, vocab: int, batch: int, length: int, steps: int) -> tuple[float, float]:
    """(ms per step, peak GB) of `steps` graphed training steps of `model` (on CUDA) on random (batch, length + 1)
    token rows, each predicting the next."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
    step = GraphedTrainStep(model, opt, lambda m, rows: F.cross_entropy(
        m(rows[:, :-1]).float().flatten(0, 1)[:, :vocab], rows[:, 1:].flatten()), grad_clip=1.0)
    rows = torch.randint(0, vocab, (batch, length + 1), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # before the eager steps: a replay allocates nothing (the graph's pool is set)
    for _ in range(step.warmup + 2):  # eager warm-up, capture, a first replay
        step.step(rows)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step.step(rows)
    float(loss)
    ms = (time.perf_counter() - t0) * 1e3 / steps
    assert not step.disabled, "the capture failed: the figure is of eager steps"
    return ms, torch.cuda.max_memory_allocated() / 1e9


def sample_ms(key: str, batch: int, samples: int, cuda_graph: bool = False) -> tuple[float, float]:
    """(ms per sample, ms of the rest of a call) of sample_audio: calls of `samples` and 2 x `samples` samples, the
    difference per sample, and what that leaves of the shorter call (with cuda_graph, mostly the graphs' capture)."""
    torch.manual_seed(0)
    model = unet(key).cuda()
    sample_audio(model, batch, 16, seed=0)  # first use: kernel compiles
    times = []
    for n in (samples, 2 * samples):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample_audio(model, batch, n, seed=0, cuda_graph=cuda_graph)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    per_sample = (times[1] - times[0]) / samples
    return per_sample, times[0] - per_sample * samples


def dna(steps: int) -> None:
    module = experiment("dna-context")
    s = module.settings(False)
    print("| model | context | batch x bases | ms / step | M bases / s | peak GB | steps | full run (min) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    specs = module.model_specs(s)
    picked = {2 ** s["contexts_log2"][0], 2 ** 14, 2 ** s["contexts_log2"][-1]}
    for spec in specs:
        L = spec.info["context"]
        if L not in picked:
            continue
        torch.manual_seed(0)
        model = build_model(spec.config, device=torch.device("cuda"))
        ms, peak = train_ms(model, module.VOCAB, spec.train.batch_size, L, steps)
        rate = spec.train.batch_size * L / ms / 1e3
        print(f"| {spec.info['mixer']} | 2^{L.bit_length() - 1} | {spec.train.batch_size} x {L} | {ms:.1f} "
              f"| {rate:.2f} | {peak:.2f} | {s['steps']} | {ms * s['steps'] / 6e4:.1f} |", flush=True)
        del model
        torch.cuda.empty_cache()


def main() -> None:
    known = shapes()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(experiment("spoken-digits").MODELS))
    p.add_argument("--shapes", nargs="+", default=list(known), choices=list(known))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--gen-samples", type=int, default=200)
    p.add_argument("--dna", action="store_true", help="the DNA models of dna-context instead of the audio U-Nets")
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    if args.dna:
        return dna(args.steps)
    print("| model | shape | batch x samples | ms / step | M samples / s | peak GB | steps | full run (min) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for key in args.models:
        for name in args.shapes:
            batch, length, full_steps = known[name]
            torch.manual_seed(0)
            ms, peak = train_ms(unet(key).cuda(), 256, batch, length, args.steps)
            print(f"| {key} | {name} | {batch} x {length} | {ms:.2f} | {batch * length / ms / 1e3:.2f} | {peak:.2f} "
                  f"| {full_steps} | {ms * full_steps / 6e4:.1f} |", flush=True)
    print(f"\n| model | sampling, batch {args.gen_batch}: ms per sample, eager | CUDA graphs | graphs' fixed cost "
          "(capture), ms | 1 s clip (16,001 samples), s, eager / graphs |")
    print("|---|---:|---:|---:|---:|")
    for key in args.models:
        eager, _ = sample_ms(key, args.gen_batch, args.gen_samples)
        graphed, fixed = sample_ms(key, args.gen_batch, args.gen_samples, cuda_graph=True)
        print(f"| {key} | {eager:.3f} | {graphed:.3f} | {fixed:.0f} | {eager * 16.001:.1f} / "
              f"{(graphed * 16.001 + fixed / 1e3):.1f} |", flush=True)


if __name__ == "__main__":
    main()
