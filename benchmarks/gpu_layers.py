"""Whole Mamba-1 and Mamba-2 layers on the GPU: the Triton path (fused mixer op, separate ops, with
activation recomputation) against the PyTorch path.

Shape: d_model 2048 (expand 2, so 4096 inner channels), batch 2, bf16 weights and activations.
Mamba-1: d_state 16, d_conv 4, dt_rank 128. Mamba-2: headdim 64 (64 heads), d_state 128, ngroups 1,
chunk 256. For each layer and seqlen it prints the do_bench median of the forward and of forward +
backward (input gradient and every weight gradient), the memory the forward leaves for the backward
(activations: allocated after the forward minus before, the input excluded), the peak memory of
forward + backward above the weights, and the largest relative error of the output against the
PyTorch path's. Paths: "triton fused" (the default: `ops.mamba1_inner` / `ops.mamba2_inner`, one
autograd node that recomputes the cheap parts in its backward), "triton ops" (`layer.fused = False`:
the ops one by one), "triton recompute" (`layer.recompute = True`: activation checkpointing of the
mixer) and "torch" (the same module inside `mambakit.ops.use_backend("torch")`).

    python benchmarks/gpu_layers.py                       # seqlen 2048 and 8192
    python benchmarks/gpu_layers.py --seqlens 2048 --layers mamba2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import triton
from triton.testing import do_bench

from mambakit.modules import Mamba1, Mamba2
from mambakit.ops import use_backend


def build(layer: str, d_model: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if layer == "mamba1":
        m = Mamba1(d_model, d_state=16, d_conv=4, expand=2)
    else:
        m = Mamba2(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256)
    return m.to(device="cuda", dtype=torch.bfloat16)


PATHS = {  # name: (backend, layer.fused, layer.recompute)
    "triton fused": ("triton", True, False),
    "triton ops": ("triton", False, False),
    "triton recompute": ("triton", True, True),
    "torch": ("torch", True, False),
}


def measure(module: torch.nn.Module, x: torch.Tensor, path: str) -> tuple[float, float, float, float, torch.Tensor]:
    """(fwd ms, fwd+bwd ms, activations GB, peak GB fwd+bwd above what was allocated before, output)."""
    backend, module.fused, module.recompute = PATHS[path]
    params = [p for p in module.parameters() if p.requires_grad]
    dy = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        y = module(x)
        return torch.autograd.grad(y, [x, *params], dy)

    with use_backend(backend):
        out = fwd()
        t_f = do_bench(fwd, quantiles=[0.5])
        t_fb = do_bench(fwd_bwd, quantiles=[0.5])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = module(x)
        torch.cuda.synchronize()
        kept = (torch.cuda.memory_allocated() - base - y.numel() * y.element_size()) / 1e9
        del y
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return t_f, t_fb, kept, peak, out


def split(module: torch.nn.Module, x: torch.Tensor, path: str, calls: int = 20) -> tuple[float, float]:
    """(GPU ms, host ms) of one fwd+bwd: the summed durations of its kernels and copies as the profiler records
    them on the device (free of the host's speed), and the median wall time the host takes to issue it onto an
    idle GPU (no synchronisation inside the timed call). do_bench's figure is near the larger of the two."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    backend, module.fused, module.recompute = PATHS[path]
    params = [p for p in module.parameters() if p.requires_grad]
    dy = torch.randn_like(x)
    with use_backend(backend):
        for _ in range(3):
            torch.autograd.grad(module(x), [x, *params], dy)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                torch.autograd.grad(module(x), [x, *params], dy)
            torch.cuda.synchronize()
        gpu_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        host = []
        for _ in range(calls):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.autograd.grad(module(x), [x, *params], dy)
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return gpu_us / 1e3 / calls, 1e3 * statistics.median(host)


def profile(args) -> int:
    """Where a path's fwd+bwd time goes: the profiler's top ops by CUDA time, then by CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for layer in args.layers:
        module = build(layer, args.d_model)
        for seqlen in args.seqlens:
            x = torch.randn(args.batch, seqlen, args.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn_like(x)
            params = [p for p in module.parameters() if p.requires_grad]
            for path in args.paths:
                backend, module.fused, module.recompute = PATHS[path]
                with use_backend(backend):
                    for _ in range(3):
                        torch.autograd.grad(module(x), [x, *params], dy)
                    torch.cuda.synchronize()
                    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            torch.autograd.grad(module(x), [x, *params], dy)
                        torch.cuda.synchronize()
                print(f"\n## {layer} seqlen {seqlen} {path}: 5 x fwd+bwd\n")
                table = prof.key_averages()
                print(table.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
                print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--layers", nargs="+", choices=["mamba1", "mamba2"], default=["mamba1", "mamba2"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: torch.profiler's top ops (CUDA and CPU time) of 5 fwd+bwd per path")
    p.add_argument("--split", action="store_true",
                   help="two more columns: fwd+bwd GPU ms (the profiler's kernel durations) and host ms (issuing it)")
    args = p.parse_args()
    print(f"# Mamba layers, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}, {datetime.date.today()}")
    print(f"batch {args.batch}, d_model {args.d_model}, bf16\n")
    extra = " fwd+bwd GPU ms | fwd+bwd host ms |" if args.split else ""
    print("| layer | seqlen | path | fwd ms | fwd+bwd ms | activations GB | peak GB fwd+bwd | max rel err vs torch |"
          + extra)
    print("|---|---|---|---|---|---|---|---|" + "---|" * (2 if args.split else 0))
    if args.profile:
        return profile(args)
    for layer in args.layers:
        module = build(layer, args.d_model)
        for seqlen in args.seqlens:
            gen = torch.Generator(device="cuda").manual_seed(seqlen)
            x = torch.randn(args.batch, seqlen, args.d_model, device="cuda", generator=gen, dtype=torch.bfloat16)
            x.requires_grad_(True)
            results = {path: measure(module, x, path) for path in args.paths}
            parts = {path: split(module, x, path) for path in args.paths} if args.split else {}
            ref = results["torch"][-1].float() if "torch" in results else None
            for path, (t_f, t_fb, kept, peak, out) in results.items():
                err = "-" if ref is None or path == "torch" else \
                    f"{float((out.float() - ref).abs().max() / ref.abs().max()):.1e}"
                more = " {:.3f} | {:.3f} |".format(*parts[path]) if path in parts else ""
                print(f"| {layer} | {seqlen} | {path} | {t_f:.3f} | {t_fb:.3f} | {kept:.3f} | {peak:.2f} | {err} |"
                      + more, flush=True)
            del x, results
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
