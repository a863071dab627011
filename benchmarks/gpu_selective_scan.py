"""GPU benchmark of the Triton selective scan (Mamba-1) at the ANCHORS.md shape.

Shape: batch 2, dim 4096 (d_model 2048 x expand 2), dstate 16, bf16 x / dt / z / B / C, float32
A / D / dt_bias, z gating, D, dt_bias, softplus; seqlen 2048 / 8192 / 32768.

For each seqlen: a correctness check first (Triton vs the PyTorch path in float32 on a channel
subset, forward and gradients), then `triton.testing.do_bench` medians of the forward and of
forward+backward (fresh gradients from torch.autograd.grad, nothing to zero), the fwd+bwd peak of
torch.cuda.max_memory_allocated, achieved GB/s of useful forward bytes (x, dt, z, B, C in; y out),
and the exp / byte floors. The PyTorch path is timed at 2048 only. --sweep also times alternative
tilings so the defaults can be set from measurements; --sweep-time only the time-parallel forward's
segment counts (ScanConfig(time_segments=...); "nc" in the main table is the default for the shape).

    python benchmarks/gpu_selective_scan.py                 # full table (about 2-4 minutes)
    python benchmarks/gpu_selective_scan.py --quick         # seqlen 2048 only
    python benchmarks/gpu_selective_scan.py --sweep         # plus alternative tilings
    python benchmarks/gpu_selective_scan.py --sweep-time    # plus time_segments 1..32 (some x NL=8)
    python benchmarks/gpu_selective_scan.py --sweep-bwd     # plus the backward's dB / dC atomic variants
    python benchmarks/gpu_selective_scan.py --sweep-time --batch 1 --dim 1536 --seqlens 65536 262144
    python benchmarks/gpu_selective_scan.py --host          # plus host time per call and CUDA-graph forward
    python benchmarks/gpu_selective_scan.py --bwd-variants  # only: backward variants A/B (agreement, fwd+bwd ms)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import triton
from triton.testing import do_bench

from mambakit.bench.timing import kernel_times
from mambakit.ops import selective_scan
from mambakit.ops.selective_scan.reference import selective_scan_reference
from mambakit.ops.selective_scan.scan_policy import (BWD_VARIANTS, bwd_variant_config, chunked_bwd_time_segments,
                                                     default_bwd_time_segments)
from mambakit.ops.selective_scan.triton_scan import ScanConfig, default_time_segments, selective_scan_triton

import scan_inputs  # benchmarks/: the inputs the other scan scripts share

# mamba_ssm's CUDA kernel on the same H100 (ANCHORS.md): fwd ms, fwd+bwd ms, fwd+bwd peak GB
ANCHOR = {2048: (0.312, 1.70, 0.71), 8192: (1.415, 6.81, 2.04), 32768: (5.69, 27.0, 7.24)}
COPY_TBPS = 3.02  # measured device copy ceiling on the H100 (ANCHORS.md)
MUFU_PER_CLK_PER_SM = 16  # exp2 throughput of one SM (4 sub-partitions x 4 per clock)
ASSUMED_CLOCK_GHZ = 1.755  # H100 SXM sustained clock under load; the exp floor scales with it

GRAD_NAMES = scan_inputs.GRAD_NAMES
DEVICE = "cuda"


def make_inputs(batch: int, seqlen: int, dim: int, dstate: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return scan_inputs.make_inputs(batch, seqlen, dim, dstate, seed, device=DEVICE)


def with_grad(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Leaves sharing the inputs' storage (no copies, so peak memory counts each input once)."""
    return {k: v.detach().requires_grad_(k in GRAD_NAMES) for k, v in inp.items()}


def channel_subset(inp: dict[str, torch.Tensor], ch: torch.Tensor, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The same problem on channels ch (ngroups 1: B, C are shared), in `dtype`."""
    out = {}
    for k, v in inp.items():
        if k in ("x", "dt", "z"):
            v = v[:, :, ch]
        elif k in ("A", "D", "dt_bias"):
            v = v[ch]
        out[k] = v.detach().to(dtype)
    return out


def torch_path_available() -> tuple[bool, str]:
    """Whether selective_scan(backend="torch") runs here (its module comes from another change)."""
    probe = make_inputs(1, 8, 8, 4)
    try:
        selective_scan(**channel_subset(probe, torch.arange(8, device=DEVICE)), dt_softplus=True, backend="torch")
    except (ImportError, NotImplementedError) as exc:  # reported loudly by the caller, never ignored
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check(inp, seqlen: int, use_torch: bool, n_channels: int) -> list[tuple[str, float, float]]:
    """Forward and all gradients of the Triton kernel at full shape vs a float32 (PyTorch path) or
    float64 (reference, when the PyTorch path is missing) run on `n_channels` channels. The upstream
    gradient is zero outside those channels, so dB and dC of the full run are comparable too.
    Returns (name, relative max error, bound) rows; bound = 2 x bf16 rounding of the answer + 1e-3."""
    dim = inp["x"].shape[-1]
    ch = torch.linspace(0, dim - 1, n_channels, device=DEVICE).long()
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    dy_sub = torch.randn(inp["x"].shape[0], seqlen, n_channels, device=DEVICE, generator=gen).to(torch.bfloat16)
    dy = torch.zeros_like(inp["x"])
    dy[:, :, ch] = dy_sub
    leaves = with_grad(inp)
    y = selective_scan_triton(**leaves, dt_softplus=True)
    grads = torch.autograd.grad(y, [leaves[k] for k in GRAD_NAMES], dy)
    got = {"y": y[:, :, ch], **{f"d{k}": g for k, g in zip(GRAD_NAMES, grads)}}
    for k in ("dx", "ddt", "dz"):
        got[k] = got[k][:, :, ch]
    for k in ("dA", "dD", "ddt_bias"):
        got[k] = got[k][ch]
    ref_dtype = torch.float32 if use_torch else torch.float64
    sub = with_grad(channel_subset(inp, ch, ref_dtype))
    if use_torch:
        y_ref = selective_scan(**sub, dt_softplus=True, backend="torch")
    else:
        y_ref = selective_scan_reference(**sub, dt_softplus=True)
    grads_ref = torch.autograd.grad(y_ref, [sub[k] for k in GRAD_NAMES], dy_sub.to(ref_dtype))
    want = {"y": y_ref, **{f"d{k}": g for k, g in zip(GRAD_NAMES, grads_ref)}}
    rows = []
    for name, value in got.items():
        w = want[name]
        rounding = rel_err(w.to(value.dtype), w) if value.dtype != torch.float32 else 0.0
        rows.append((name, rel_err(value, w), 2 * rounding + 1e-3))
    return rows


def time_triton(inp, config: ScanConfig | None) -> tuple[float, float, float]:
    """Median ms of forward and of forward+backward, and the fwd+bwd peak memory in GB."""
    leaves = with_grad(inp)
    dy = torch.randn_like(inp["x"])
    params = [leaves[k] for k in GRAD_NAMES]

    def fwd():
        with torch.no_grad():
            return selective_scan_triton(**leaves, dt_softplus=True, config=config)

    def fwd_bwd():
        y = selective_scan_triton(**leaves, dt_softplus=True, config=config)
        return torch.autograd.grad(y, params, dy)

    t_fwd = do_bench(fwd, quantiles=[0.5])
    t_fb = do_bench(fwd_bwd, quantiles=[0.5])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    return t_fwd, t_fb, peak


def fwd_bwd_call(inp, config: ScanConfig | None):
    """A call running the Triton scan's forward and backward (all of GRAD_NAMES) on fresh leaves of `inp`."""
    leaves = with_grad(inp)
    dy = torch.randn_like(inp["x"])
    params = [leaves[k] for k in GRAD_NAMES]

    def fwd_bwd():
        y = selective_scan_triton(**leaves, dt_softplus=True, config=config)
        return torch.autograd.grad(y, params, dy)

    return fwd_bwd


def time_fwd_bwd(inp, config: ScanConfig | None) -> tuple[float, float]:
    """Median ms of forward+backward and its peak GB (time_triton without the no-grad forward, which would compile
    one more forward per checkpoint interval)."""
    fwd_bwd = fwd_bwd_call(inp, config)
    t_fb = do_bench(fwd_bwd, quantiles=[0.5])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return t_fb, torch.cuda.max_memory_allocated() / 1e9


def kernel_profile(inp, config: ScanConfig | None, reps: int = 10) -> list[tuple[str, float, int]]:
    """GPU time per fwd+bwd of every kernel (torch.profiler, CUDA activity): (name, us per fwd+bwd summed over
    the kernel's launches, launches per fwd+bwd)."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd = fwd_bwd_call(inp, config)
    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd_bwd()
        torch.cuda.synchronize()
    return [(name[:60], us, n) for name, us, n in kernel_times(prof, reps) if n >= 1]


def time_torch_path(inp) -> tuple[float, float]:
    leaves = with_grad(inp)
    dy = torch.randn_like(inp["x"])
    params = [leaves[k] for k in GRAD_NAMES]

    def fwd():
        with torch.no_grad():
            return selective_scan(**leaves, dt_softplus=True, backend="torch")

    def fwd_bwd():
        y = selective_scan(**leaves, dt_softplus=True, backend="torch")
        return torch.autograd.grad(y, params, dy)

    return do_bench(fwd, quantiles=[0.5]), do_bench(fwd_bwd, quantiles=[0.5])


def host_us_per_call(fn, calls: int = 300) -> float:
    """Host microseconds per call at a shape whose GPU work is far shorter than the launches: the queue
    never fills, so wall time / calls is what the CPU spends (validation, glue, Triton launches)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_forward_ms(inp) -> float:
    """Median ms of the default forward replayed from a CUDA graph: GPU time with no host launch cost."""
    static = {k: v.clone() for k, v in inp.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # compile and warm up outside the capture
            selective_scan_triton(**static, dt_softplus=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        selective_scan_triton(**static, dt_softplus=True)
    return do_bench(graph.replay, quantiles=[0.5])


def host_report(args) -> None:
    """Where the forward's time goes when the host is the bound: host us per call and graph-replayed ms."""
    tiny = make_inputs(1, 256, 256, args.dstate)
    print("\n## host overhead (forward, no grad)\n")
    print("| what | host us per call |")
    print("|---|---|")
    with torch.no_grad():
        rows = [
            ("selective_scan (public op: validation + dispatch + launches)",
             lambda: selective_scan(**tiny, dt_softplus=True)),
            ("selective_scan_triton, time_segments=1 (1 launch)",
             lambda: selective_scan_triton(**tiny, dt_softplus=True, config=ScanConfig(time_segments=1))),
            ("selective_scan_triton, time_segments=2 (3 launches)",
             lambda: selective_scan_triton(**tiny, dt_softplus=True, config=ScanConfig(time_segments=2, checkpoint_interval=128))),
        ]
        for name, fn in rows:
            print(f"| {name} | {host_us_per_call(fn):.1f} |", flush=True)
    print("\n| seqlen | fwd ms eager (do_bench) | fwd ms CUDA graph replay |")
    print("|---|---|---|")
    for seqlen in args.seqlens:
        inp = make_inputs(args.batch, seqlen, args.dim, args.dstate)

        def fwd(inp=inp):
            with torch.no_grad():
                return selective_scan_triton(**inp, dt_softplus=True)

        print(f"| {seqlen} | {do_bench(fwd, quantiles=[0.5]):.3f} | {graph_forward_ms(inp):.3f} |", flush=True)
        del inp, fwd
        torch.cuda.empty_cache()


def floors(batch: int, seqlen: int, dim: int, dstate: int) -> tuple[float, float, float]:
    """(useful forward bytes, byte floor ms at the copy ceiling, exp floor ms at the assumed clock)."""
    elems = batch * seqlen * dim
    useful = elems * 2 * 4 + 2 * batch * seqlen * dstate * 2  # x, dt, z in + y out (bf16); B, C in
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    exp_ms = elems * dstate / (MUFU_PER_CLK_PER_SM * sms * ASSUMED_CLOCK_GHZ * 1e9) * 1e3
    return useful, useful / (COPY_TBPS * 1e12) * 1e3, exp_ms


SWEEP = [
    ("fwd NL=4", ScanConfig(fwd_nl=4)),
    ("fwd NL=8", ScanConfig(fwd_nl=8)),
    ("fwd NL=16", ScanConfig(fwd_nl=16)),
    ("bwd 8ch U=4 chunk=64", ScanConfig(bwd_channels=8, checkpoint_interval=64)),
    ("bwd 8ch U=4 chunk=256", ScanConfig(bwd_channels=8, checkpoint_interval=256)),
    ("bwd 8ch U=2", ScanConfig(bwd_channels=8, block_u=2)),
    ("bwd 16ch U=2", ScanConfig(bwd_channels=16, block_u=2)),
    ("bwd 16ch U=4", ScanConfig(bwd_channels=16, block_u=4)),
    ("bwd 32ch U=2", ScanConfig(bwd_channels=32, block_u=2)),
]

# backward: dB / dC atomics (channels summed by shuffles first, replicas), micro-block U, register cap (more
# warps per SM) and time segments run in parallel (bwd nc: adjoint-only pass + combine + full pass per segment)
SWEEP_BWD = [
    ("bwd U=4 (1 segment)", ScanConfig(bwd_reduce_channels=4, bwd_time_segments=1, block_u=4)),
    ("bwd U=2 (1 segment)", ScanConfig(bwd_reduce_channels=4, bwd_time_segments=1, block_u=2)),
    ("bwd nc=2 U=2 carry split 2", ScanConfig(bwd_time_segments=2, bwd_reduce_channels=4, block_u=2, bwd_carry_split=2)),
    ("bwd nc=2 U=2 carry split 4", ScanConfig(bwd_time_segments=2, bwd_reduce_channels=4, block_u=2, bwd_carry_split=4)),
    ("bwd nc=4 U=2 carry split 1", ScanConfig(bwd_time_segments=4, bwd_reduce_channels=4, block_u=2, bwd_carry_split=1)),
    ("bwd nc=4 U=2 carry split 2", ScanConfig(bwd_time_segments=4, bwd_reduce_channels=4, block_u=2, bwd_carry_split=2)),
    ("bwd nc=4 U=2 carry split 4", ScanConfig(bwd_time_segments=4, bwd_reduce_channels=4, block_u=2, bwd_carry_split=4)),
    ("bwd nc=8 U=2 carry split 1", ScanConfig(bwd_time_segments=8, bwd_reduce_channels=4, block_u=2, bwd_carry_split=1)),
    ("bwd nc=8 U=2 carry split 2", ScanConfig(bwd_time_segments=8, bwd_reduce_channels=4, block_u=2, bwd_carry_split=2)),
    ("bwd nc=4 U=2 maxnreg 128 split 2", ScanConfig(bwd_time_segments=4, bwd_reduce_channels=4, block_u=2,
                                                    bwd_maxnreg=128, bwd_carry_split=2)),
    # dB / dC replicas (each zero-filled, atomically added into, then summed: 2 x R x (B, L, G, N) float32) and the
    # channel lanes summed by shuffles before each atomic, at the 4-segment split-4 default
    ("bwd nc=4 split 4 replicas 8", ScanConfig(bwd_time_segments=4, bwd_carry_split=4, bwd_replicas=8)),
    ("bwd nc=4 split 4 replicas 16", ScanConfig(bwd_time_segments=4, bwd_carry_split=4, bwd_replicas=16)),
    ("bwd nc=4 split 4 replicas 64", ScanConfig(bwd_time_segments=4, bwd_carry_split=4, bwd_replicas=64)),
    ("bwd nc=4 split 4 reduce 8 ch, replicas 16", ScanConfig(bwd_time_segments=4, bwd_carry_split=4,
                                                             bwd_reduce_channels=8, bwd_replicas=16)),
    ("bwd nc=4 split 4 reduce 2 ch", ScanConfig(bwd_time_segments=4, bwd_carry_split=4, bwd_reduce_channels=2)),
    # the checkpoint interval sizes the backward's per-program scratch (h every U steps of an interval): at 16
    # resident programs per SM, 128 steps make ~69 MB of live scratch, more than the 50 MB L2 (Nsight Compute,
    # session 35: 2.2 GB of DRAM traffic in a backward that needs ~0.4 GB)
    ("bwd interval 128", ScanConfig(checkpoint_interval=128)),
    ("bwd interval 64", ScanConfig(checkpoint_interval=64)),
    ("bwd interval 32", ScanConfig(checkpoint_interval=32)),
    # register caps for the default backward (16 / 15 one-warp programs per SM at 128 / 136 registers)
    ("bwd maxnreg 128", ScanConfig(bwd_maxnreg=128)),
    ("bwd maxnreg 136", ScanConfig(bwd_maxnreg=136)),
    # pass A asks the L2 for x / dt rows this many steps ahead and for its own steps' dy / z (ScanConfig.bwd_prefetch)
    ("bwd prefetch 8", ScanConfig(bwd_prefetch=8)),
    ("bwd prefetch 16", ScanConfig(bwd_prefetch=16)),
    ("bwd prefetch 32", ScanConfig(bwd_prefetch=32)),
    ("bwd prefetch 0", ScanConfig(bwd_prefetch=0)),
    ("bwd interval 32 prefetch 8", ScanConfig(checkpoint_interval=32, bwd_prefetch=8)),
    ("bwd interval 32 prefetch 16", ScanConfig(checkpoint_interval=32, bwd_prefetch=16)),
    ("bwd interval 32 prefetch 0", ScanConfig(checkpoint_interval=32, bwd_prefetch=0)),
    # the same L2 prefetch in the forward's passes (x / dt / z ahead) and in the carry pass (dt / dy / z back)
    ("fwd-prefetch 8", ScanConfig(fwd_prefetch=8)),
    ("fwd-prefetch 16", ScanConfig(fwd_prefetch=16)),
    ("fwd-prefetch 32", ScanConfig(fwd_prefetch=32)),
    ("carry-prefetch 4", ScanConfig(carry_prefetch=4)),
    ("carry-prefetch 8", ScanConfig(carry_prefetch=8)),
    ("carry-prefetch 16", ScanConfig(carry_prefetch=16)),
    ("all-prefetch 8 / 16 / 8", ScanConfig(bwd_prefetch=8, fwd_prefetch=16, carry_prefetch=8)),
]

# time-parallel forward: segments scanned in parallel (pass 1 state-only + pass 2 combine + pass 3 full);
# nc=1 is the sequential forward. The default (main table, "nc" column) is default_time_segments(shape).
SWEEP_TIME = [
    ("fwd nc=1 (sequential)", ScanConfig(time_segments=1)),
    ("fwd nc=2", ScanConfig(time_segments=2)),
    ("fwd nc=4", ScanConfig(time_segments=4)),
    ("fwd nc=8", ScanConfig(time_segments=8)),
    ("fwd nc=16", ScanConfig(time_segments=16)),
    ("fwd nc=32", ScanConfig(time_segments=32)),
    ("fwd nc=4 NL=8", ScanConfig(time_segments=4, fwd_nl=8)),
    ("fwd nc=8 NL=8", ScanConfig(time_segments=8, fwd_nl=8)),
    ("fwd nc=16 NL=8", ScanConfig(time_segments=16, fwd_nl=8)),
]


# mamba_ssm's CUDA fwd+bwd on the H200 (BENCHMARKS.md, issue-18 table of 2026-12-01), batch 2 x dim 4096
MAMBA_SSM_H200_FWD_BWD = {2048: 1.588, 8192: 6.398, 32768: 25.98}
GOAL_VS_MAMBA_SSM = 0.67  # issue 18: fwd+bwd at most 0.67x mamba_ssm's
TRAIN_SHAPE = (8, 2048, 1536)  # the 130M model's training step: batch 8 x 2048 tokens, d_inner 1536


def bwd_variants_report(args) -> int:
    """A/B of the backward variants (scan_policy.BWD_VARIANTS) in one process: for each shape (batch 2 x dim 4096
    at the seqlens, then the 130M training shape), first every variant's output and gradients against v1's
    (max relative error over each tensor; bf16 outputs differ by rounding, float32 sums by summation order),
    then fwd+bwd median ms, the backward kernel's GPU time per fwd+bwd (torch.profiler) and the peak memory.
    Returns the number of disagreements above 1e-2."""
    names = ["v1"] + [v for v in args.variants if v != "v1"]
    shapes = [(args.batch, L, args.dim) for L in args.seqlens] + ([TRAIN_SHAPE] if args.train_shape else [])
    print("## backward variants (each against v1: max rel err of y and every gradient; then timings)\n")
    print("| batch x seqlen x dim | variant | bwd segments | fwd+bwd ms | vs v1 | vs mamba_ssm H200 (goal 0.67) "
          "| scan_bwd_kernel us | carry us | fwd kernels us | peak GB | worst rel err vs v1 (tensor) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for batch, seqlen, dim in shapes:
        inp = make_inputs(batch, seqlen, dim, args.dstate)
        leaves = with_grad(inp)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        dy = torch.randn(inp["x"].shape, device=DEVICE, generator=gen).to(inp["x"].dtype)
        params = [leaves[k] for k in GRAD_NAMES]
        ref, base_ms = None, None
        for name in names:
            cfg = bwd_variant_config(name)
            y = selective_scan_triton(**leaves, dt_softplus=True, config=cfg)
            out = {"y": y.detach(), **{f"d{k}": g for k, g in zip(GRAD_NAMES, torch.autograd.grad(y, params, dy))}}
            del y
            if ref is None:
                ref = out
                worst = ("-", 0.0)
            else:
                worst = max(((k, rel_err(out[k], ref[k])) for k in ref), key=lambda kv: kv[1])
            del out
            bad = worst[1] > 1e-2
            failures += bad
            t_fb, peak = time_fwd_bwd(inp, cfg)
            prof = kernel_profile(inp, cfg)
            us = {k: sum(u for n, u, _ in prof if n.startswith(k)) for k in ("scan_bwd_kernel", "scan_bwd_carry",
                                                                             "scan_fwd", "scan_bwd_chunked")}
            us["scan_bwd_kernel"] += us.pop("scan_bwd_chunked")  # the backward kernel, whichever variant
            base_ms = base_ms or t_fb
            m = MAMBA_SSM_H200_FWD_BWD.get(seqlen) if (batch, dim, args.dstate) == (2, 4096, 16) else None
            vs = f"{t_fb / m:.2f}x" if m else "-"
            nseg = (chunked_bwd_time_segments(batch, seqlen, dim, 1, cfg, DEVICE) if cfg.bwd_chunked else
                    default_bwd_time_segments(batch, seqlen, dim, args.dstate, config=cfg, device=DEVICE))
            print(f"| {batch} x {seqlen} x {dim} | {name} | {nseg} | {t_fb:.3f} | {t_fb / base_ms:.2f}x | {vs} | "
                  f"{us['scan_bwd_kernel']:.0f} | {us['scan_bwd_carry']:.0f} | {us['scan_fwd']:.0f} | {peak:.2f} | "
                  f"{worst[1]:.1e} ({worst[0]}){'  FAILED' if bad else ''} |", flush=True)
        del inp, leaves, ref, params
        torch.cuda.empty_cache()
    print("\nvs mamba_ssm: fwd+bwd / mamba_ssm's H200 fwd+bwd (issue 18 asks <= 0.67). Agreement bound: 1e-2 "
          "relative to each tensor's largest value (bf16 outputs round at ~4e-3).")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="seqlen 2048 only")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tilings (incl. time_segments)")
    parser.add_argument("--sweep-time", action="store_true", help="also time the time_segments choices only")
    parser.add_argument("--sweep-bwd", action="store_true", help="also time the backward's dB / dC atomic choices")
    parser.add_argument("--rows", nargs="+", default=None, help="only the sweep rows whose name contains one of these")
    parser.add_argument("--profile", action="store_true",
                        help="also list each kernel's GPU time per fwd+bwd (default config and --sweep-bwd rows)")
    parser.add_argument("--host", action="store_true", help="also measure host time per call and graph replay")
    parser.add_argument("--check-channels", type=int, default=64, help="channels in the correctness check")
    parser.add_argument("--bwd-variants", action="store_true",
                        help="only the backward variants' A/B (scan_policy.BWD_VARIANTS): agreement with v1, fwd+bwd "
                             "ms, backward kernel us, peak; at --seqlens and the 130M training shape 8 x 2048 x 1536")
    parser.add_argument("--variants", nargs="+", default=list(BWD_VARIANTS), choices=list(BWD_VARIANTS),
                        help="with --bwd-variants: which (v1 always runs first, as the baseline)")
    parser.add_argument("--no-train-shape", dest="train_shape", action="store_false",
                        help="with --bwd-variants: skip the training shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("ERROR: this benchmark needs a CUDA device", file=sys.stderr)
        return 2
    seqlens = [2048] if args.quick else args.seqlens
    props = torch.cuda.get_device_properties(0)
    print(f"# selective scan (Mamba-1), Triton backend\n\ndevice: {props.name} ({props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.bwd_variants:
        args.seqlens = seqlens
        failures = bwd_variants_report(args)
        if failures:
            print(f"\nERROR: {failures} variants disagree with v1 (see FAILED rows)", file=sys.stderr)
        return 1 if failures else 0
    print(f"shape: batch {args.batch}, dim {args.dim}, dstate {args.dstate}, bf16 x/dt/z/B/C, fp32 A/D/dt_bias, "
          "z gate, D, dt_bias, softplus\n")
    use_torch, why = torch_path_available()
    if not use_torch:
        print(f"WARNING: the PyTorch path (backend='torch') is unavailable: {why}\n"
              "WARNING: correctness is checked against the float64 reference instead, and the PyTorch path is "
              "not timed.\n")

    failures = 0
    results = []
    for seqlen in seqlens:
        inp = make_inputs(args.batch, seqlen, args.dim, args.dstate)
        n_ch = args.check_channels if seqlen <= 8192 or use_torch else min(args.check_channels, 16)
        rows = check(inp, seqlen, use_torch, n_ch)
        bad = [r for r in rows if not r[1] <= r[2]]
        failures += len(bad)
        print(f"check seqlen {seqlen} vs {'PyTorch path fp32' if use_torch else 'fp64 reference'} on {n_ch} "
              f"channels: " + ", ".join(f"{n} {e:.2e}" for n, e, _ in rows)
              + ("  OK" if not bad else "  FAILED: " + ", ".join(f"{n} {e:.2e} > {b:.2e}" for n, e, b in bad)))
        t_fwd, t_fb, peak = time_triton(inp, None)
        torch_t = time_torch_path(inp) if (use_torch and seqlen == 2048) else None
        results.append((seqlen, t_fwd, t_fb, peak, torch_t))
        del inp
        torch.cuda.empty_cache()

    print("\n| seqlen | nc | fwd ms | fwd+bwd ms | peak GB (fwd+bwd) | fwd useful GB/s | byte floor ms | exp floor ms "
          "| mamba_ssm fwd / fwd+bwd ms / GB | speed-up fwd / fwd+bwd | PyTorch path fwd / fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seqlen, t_fwd, t_fb, peak, torch_t in results:
        nc = default_time_segments(args.batch, seqlen, args.dim, args.dstate, device=DEVICE)
        useful, byte_ms, exp_ms = floors(args.batch, seqlen, args.dim, args.dstate)
        a = ANCHOR.get(seqlen) if (args.batch, args.dim, args.dstate) == (2, 4096, 16) else None
        anchor = f"{a[0]} / {a[1]} / {a[2]}" if a else "-"
        speed = f"{a[0] / t_fwd:.2f}x / {a[1] / t_fb:.2f}x" if a else "-"
        tt = f"{torch_t[0]:.3f} / {torch_t[1]:.3f}" if torch_t else "-"
        print(f"| {seqlen} | {nc} | {t_fwd:.3f} | {t_fb:.3f} | {peak:.2f} | {useful / t_fwd / 1e6:.0f} | {byte_ms:.3f} "
              f"| {exp_ms:.3f} | {anchor} | {speed} | {tt} |")
    print(f"\nexp floor: one exp2 per (channel, state, step) at {MUFU_PER_CLK_PER_SM}/clk/SM and an assumed "
          f"{ASSUMED_CLOCK_GHZ} GHz; byte floor: useful forward bytes at {COPY_TBPS} TB/s.")

    if args.host:
        host_report(args)

    if args.profile:
        print("\n## GPU time per fwd+bwd by kernel (torch.profiler; us per fwd+bwd, all launches, x launches)\n")
        for seqlen in seqlens:
            inp = make_inputs(args.batch, seqlen, args.dim, args.dstate)
            for name, cfg in [("default", None)] + (SWEEP_BWD if args.sweep_bwd else []):
                if name != "default" and args.rows is not None and not any(r in name for r in args.rows):
                    continue
                rows = kernel_profile(inp, cfg)
                total = sum(us for _, us, _ in rows)
                print(f"seqlen {seqlen} {name}: total {total / 1e3:.3f} ms: "
                      + "; ".join(f"{k} {us:.0f}us x{n}" for k, us, n in rows[:8]), flush=True)
            del inp
            torch.cuda.empty_cache()

    if args.sweep or args.sweep_time or args.sweep_bwd:
        sweep = ((SWEEP if args.sweep else []) + (SWEEP_TIME if args.sweep or args.sweep_time else [])
                 + (SWEEP_BWD if args.sweep or args.sweep_bwd else []))
        sweep = [(name, cfg) for name, cfg in sweep if args.rows is None or any(r in name for r in args.rows)]
        print("\n## tiling sweep (median ms; defaults are chosen by ScanConfig() = first table; rows without nc use "
              "the default time_segments)\n")
        print("| seqlen | config | fwd ms | fwd+bwd ms | peak GB | y vs sequential (rel. max) |")
        print("|---|---|---|---|---|---|")
        for seqlen in seqlens:
            inp = make_inputs(args.batch, seqlen, args.dim, args.dstate)
            with torch.no_grad():
                y_seq = selective_scan_triton(**inp, dt_softplus=True, config=ScanConfig(time_segments=1)).float()
            for name, cfg in sweep:
                with torch.no_grad():  # bf16 y: one bf16 ulp (~4e-3 of the largest values) is expected
                    dev = rel_err(selective_scan_triton(**inp, dt_softplus=True, config=cfg), y_seq)
                t_fwd, t_fb, peak = time_triton(inp, cfg)
                print(f"| {seqlen} | {name} | {t_fwd:.3f} | {t_fb:.3f} | {peak:.2f} | {dev:.1e} |", flush=True)
            del y_seq
            del inp
            torch.cuda.empty_cache()

    if failures:
        print(f"\nERROR: {failures} correctness checks failed (see 'check' lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
