"""Plain vs DDP vs FSDP2 training steps of the 130M shape on one GPU: tokens/s and peak memory (issue 13).

Run under torchrun with one process (DDP and FSDP2 need a process group; on one GPU they show the wrappers'
own cost: DDP's gradient buckets, FSDP2's all-gather / reduce-scatter calls, casts and the mixed-precision
policy), on the GPU machine:

    torchrun --nproc-per-node 1 benchmarks/gpu_parallel.py                       # 130m, mamba2, batch 8 x 2048
    torchrun --nproc-per-node 1 benchmarks/gpu_parallel.py --layer mamba1 --batch 4 --grad-accum 2

Each case builds the model the way `mambakit train` does (mambakit.training: model_config, build_optimizer,
wrap_model, the Run's micro-step with no_sync / set_requires_gradient_sync), times `--steps` optimizer steps
after `--warmup` (CUDA-synchronised wall clock) and records torch.cuda.max_memory_allocated over the timed
steps. Cases:
    plain           one process, no wrapper; bf16 autocast, fp32 parameters, fused AdamW
    ddp             DistributedDataParallel; the same numerics
    fsdp            FSDP2 fully_shard per block + root, MixedPrecisionPolicy(param bf16, reduce fp32), autocast,
                    reshard_after_forward False (a block's gathered parameters are kept until its backward;
                    TrainConfig's default is True since the 2026-12-02 GPU run); AdamW over the sharded (DTensor) parameters: foreach, as build_optimizer
                    makes it
    fsdp-fp32       fsdp without the bf16 policy (fp32 parameters, autocast only), as --fsdp-mixed-precision none
    fsdp-reshard    fsdp with reshard_after_forward True (FSDP2's and TrainConfig's default: gathered again for
                    the backward); the 2026-12-02 figures (fsdp 0.34x plain) were taken so
    fsdp-fusedopt   fsdp with the fused AdamW kernel over the DTensor parameters instead of foreach

Besides tokens/s and memory, each row says where the time goes:
    paths        the (op, backend) calls of one training step (ops.record_backends): a case whose mixers left
                 their fused op (e.g. mamba2_inner:triton) for the separate ops shows it here, flagged "DIFFERS"
    host_ms      the time the Python thread takes to issue one step (after a synchronize, so nothing queued
                 before counts); it includes any wait for the GPU
    gpu_busy_ms  the summed duration of the step's GPU kernels (torch.profiler over --profile-steps steps).
                 gpu_busy_ms well under ms_per_step means the GPU waits: on the host (host_ms near ms_per_step)
                 or on a synchronisation
    syncs        host-device synchronisations in one step (torch.cuda.set_sync_debug_mode)
`--top N` also prints each case's N most expensive ops on the host (self CPU time) from the profiler.
Prints one JSON line per case, then a table (paste it into BENCHMARKS.md with the date, device and versions).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import time
import warnings
from collections import Counter

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from mambakit import MambaLM
from mambakit.ops import record_backends
from mambakit.evaluation import token_nll_sum
from mambakit.training import TrainConfig, build_optimizer, model_config
from mambakit.training.distributed import dist_info_from_env, wrap_model
from mambakit.training.loop import no_decay_names

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "tiny": (64, 2)}  # tiny: the CPU smoke run
VOCAB = 50277
CASES = ("plain", "ddp", "fsdp", "fsdp-fp32", "fsdp-reshard", "fsdp-fusedopt")


def run_case(case: str, args, device: torch.device) -> dict:
    d_model, n_layer = SHAPES[args.shape]
    parallel = "ddp" if case in ("plain", "ddp") else "fsdp"
    cfg = TrainConfig(layer=args.layer, d_model=d_model, n_layer=n_layer, d_state=args.d_state, headdim=64,
                      chunk_size=256, seqlen=args.seqlen, batch_size=args.batch, grad_accum=args.grad_accum,
                      parallel=parallel, fsdp_mixed_precision="none" if case == "fsdp-fp32" else "bf16",
                      fsdp_reshard_after_forward=case == "fsdp-reshard")
    torch.manual_seed(0)
    model = MambaLM(model_config(cfg, VOCAB)).to(device)
    no_decay = no_decay_names(model)
    if case != "plain":
        # a one-process "world" still goes through the wrapper: that is what this benchmark measures
        model = _wrap_one_process(model, cfg, device)
    opt = build_optimizer(model, cfg, no_decay)
    if case == "fsdp-fusedopt":
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=opt.defaults["lr"], betas=opt.defaults["betas"], fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.grad_accum * args.batch, args.seqlen + 1), device=device, generator=gen)

    def step():
        micro = ids.split(args.batch)
        for i, window in enumerate(micro):
            last = i == len(micro) - 1
            if case.startswith("fsdp"):
                model.set_requires_gradient_sync(last)
            ctx = model.no_sync() if (case == "ddp" and not last) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(window[:, :-1])
                    loss = token_nll_sum(logits, window[:, 1:], VOCAB) / window[:, 1:].numel()
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = device.type == "cuda"
    with record_backends() as seen:
        step()
    for _ in range(args.warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    host_ms = _host_ms(step, device)
    syncs = _count_syncs(step) if cuda else 0
    gpu_busy_ms, top = _profile(step, device, args.profile_steps, args.top)
    tokens = args.grad_accum * args.batch * args.seqlen
    row = {"case": case, "layer": args.layer, "shape": args.shape, "batch": args.batch, "grad_accum": args.grad_accum,
           "seqlen": args.seqlen, "tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds, "peak_gb": peak_gb,
           "host_ms": host_ms, "gpu_busy_ms": gpu_busy_ms, "syncs": syncs, "paths": _paths_text(seen),
           "loss": float(loss.detach())}
    if top:
        row["top_host_ops"] = top
    model = opt = None  # the step closure holds them too: drop both before the next case (frees the GPU memory)
    if cuda:
        torch.cuda.empty_cache()
    return row


def _wrap_one_process(model, cfg: TrainConfig, device: torch.device):
    """wrap_model as under torchrun with one process (world size 1 is 'not distributed' to the trainer, which
    would leave the model bare)."""
    info = dist_info_from_env()
    forced = info.__class__(rank=info.rank, world_size=max(info.world_size, 2), local_rank=info.local_rank)
    return wrap_model(model, cfg, forced, device)


def _paths_text(seen: Counter) -> str:
    """'op:backend xN' per op, sorted: the paths one training step took."""
    return " ".join(f"{op}:{backend}x{n}" for (op, backend), n in sorted(seen.items()))


def _host_ms(step, device: torch.device, repeats: int = 3) -> float:
    """Median time to issue one step from an idle GPU (the queue empty at the start), in ms."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def _count_syncs(step) -> int:
    """Host-device synchronisations in one step: torch warns at each one in sync debug mode "warn"."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def _profile(step, device: torch.device, steps: int, top: int) -> tuple[float, str]:
    """(summed GPU kernel time per step in ms, NaN on CPU; the `top` ops by self CPU time as a table, or "")."""
    if steps < 1:
        return float("nan"), ""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    # self device time, as the profiler's "Self CUDA time total": summing every CUDA-side event instead counted
    # the GPU ranges of annotations (autograd functions, FSDP's record_function scopes) on top of their kernels
    averages = prof.key_averages()
    self_us = [getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) for e in averages]
    busy = sum(self_us) / 1e3 / steps if cuda else float("nan")
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top) if top > 0 else ""
    return busy, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="130m")
    p.add_argument("--layer", choices=("mamba1", "mamba2"), default="mamba2")
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--profile-steps", type=int, default=2,
                   help="steps run under torch.profiler for gpu_busy_ms (0: no profiling)")
    p.add_argument("--top", type=int, default=0, help="print each case's N most expensive host ops (self CPU time)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke run of the script itself over gloo (with --shape tiny; no memory figures)")
    args = p.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node 1 benchmarks/gpu_parallel.py")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rows = []
    try:
        for case in args.cases:
            try:
                row = run_case(case, args, device)
            except Exception as e:  # one case's failure (e.g. fused AdamW over DTensors) keeps the others' rows
                if dist.get_rank() == 0:
                    print(f"{case}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            top = row.pop("top_host_ops", "")
            rows.append(row)
            if dist.get_rank() == 0:
                print(json.dumps(row), flush=True)
                if top:
                    print(f"{case}: the {args.top} most expensive host ops over {args.profile_steps} steps\n{top}",
                          flush=True)
    finally:
        dist.destroy_process_group()
    if dist_info_from_env().rank != 0:
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{args.shape} {args.layer}, batch {args.batch} x {args.grad_accum} micro-steps x {args.seqlen}, "
          f"{name}, torch {torch.__version__}, {datetime.date.today()}")
    print("| case | tokens/s | ms/step | peak GB | vs plain tokens/s | host ms | GPU busy ms | syncs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    plain = next((r for r in rows if r["case"] == "plain"), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain else "-"
        print(f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['peak_gb']:.2f} | {ratio} | "
              f"{r['host_ms']:.1f} | {r['gpu_busy_ms']:.1f} | {r['syncs']} |")
    # which ops ran: the same for every case when the wrappers leave the mixers on their fused op
    print()
    for r in rows:
        same = plain is None or r["paths"] == plain["paths"]
        print(f"paths {r['case']}: {r['paths']}{'' if same else '   <- DIFFERS from plain'}")


if __name__ == "__main__":
    main()
