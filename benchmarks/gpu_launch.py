"""Host cost of Triton launches: Triton's own `kernel[grid](...)` against mambakit's cached direct launch.

At short sequences the GPU waits for the host: a Triton 3.6 launch costs tens of microseconds of
Python and driver calls, and a Mamba layer's training step runs ~40 of them. `ops/triton_launch.py`
compiles through Triton once per specialization and then calls the compiled kernel's launcher with
plain pointers. This script measures both in one process (`triton_launch_mode`):

1. host microseconds per call at tiny shapes (GPU work far shorter than the launches, so the queue
   never fills and wall time / calls is the CPU's cost): one bare kernel, the public ops (forward, and
   forward + backward), whole layers (forward + backward);
2. do_bench medians (ms) at the ANCHORS shapes, seqlen 2048 (and --seqlens), where the host matters;
3. a cProfile of the public scan and SSD forwards with the cached launch: where the rest goes.

    python benchmarks/gpu_launch.py
    python benchmarks/gpu_launch.py --seqlens 2048 8192 --no-profile
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import platform
import pstats
import statistics

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from gpu_selective_scan import host_us_per_call, make_inputs as scan_inputs
from gpu_ssd import make_inputs as ssd_inputs
from mambakit.modules import Mamba1, Mamba2
from mambakit.ops import selective_scan, ssd
from mambakit.ops.triton_launch import fast_launch, triton_launch_mode

MODES = ("triton", "fast")  # Triton's launch, the cached direct launch


@fast_launch
@triton.jit
def _copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def host_us(fn) -> float:
    """Wall microseconds per call after warm-up (gpu_selective_scan's measure, 200 calls)."""
    return host_us_per_call(fn, calls=200)


def with_grad(inp: dict, names) -> dict:
    return {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in inp.items()}


def scan_fwd(inp):
    def run():
        with torch.no_grad():
            selective_scan(**inp, dt_softplus=True)
    return run


def scan_fwd_bwd(inp):
    leaves = with_grad(inp, ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"))
    wrt = [v for v in leaves.values() if v.requires_grad]
    dy = torch.randn_like(inp["x"])

    def run():  # autograd.grad: no accumulation into .grad (its adds would be timed too)
        torch.autograd.grad(selective_scan(**leaves, dt_softplus=True), wrt, dy)
    return run


def ssd_fwd(inp):
    def run():
        with torch.no_grad():
            ssd(**inp, dt_softplus=True, chunk_size=256)
    return run


def ssd_fwd_bwd(inp):
    leaves = with_grad(inp, ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    wrt = [v for v in leaves.values() if v.requires_grad]
    dy = torch.randn_like(inp["x"])

    def run():
        torch.autograd.grad(ssd(**leaves, dt_softplus=True, chunk_size=256), wrt, dy)
    return run


def layer_fwd_bwd(layer: str, d_model: int, seqlen: int):
    torch.manual_seed(0)
    if layer == "mamba1":
        m = Mamba1(d_model, d_state=16, d_conv=4, expand=2)
    else:
        m = Mamba2(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256)
    m = m.to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, seqlen, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wrt = [x, *(p for p in m.parameters() if p.requires_grad)]
    dy = torch.randn_like(x)

    def run():
        torch.autograd.grad(m(x), wrt, dy)
    return run


def both(fn_factory, measure, rounds: int = 5) -> tuple[float, float]:
    """Median of `rounds` measurements per launch mode, the modes interleaved (the host's speed drifts)."""
    fn = fn_factory()  # the mode is read at every launch, so one function serves both
    got: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            with triton_launch_mode(mode):
                got[mode].append(measure(fn))
    return statistics.median(got["triton"]), statistics.median(got["fast"])


def host_table(args) -> None:
    print("\n## host us per call at tiny shapes (GPU work << launch cost)\n")
    print("| call | Triton launch us | cached launch us | saved us |")
    print("|---|---|---|---|")
    x = torch.randn(1024, device="cuda")
    out = torch.empty_like(x)
    tiny_scan = scan_inputs(1, 256, 256, 16)
    tiny_ssd = ssd_inputs(1, 256, 4, 64, 1, 128, torch.bfloat16)
    rows = [
        ("one bare kernel (4 args)", lambda: (lambda: _copy_kernel[(1,)](x, out, 1024, BLOCK=1024))),
        ("selective_scan forward (no grad)", lambda: scan_fwd(tiny_scan)),
        ("selective_scan forward + backward", lambda: scan_fwd_bwd(tiny_scan)),
        ("ssd forward (no grad)", lambda: ssd_fwd(tiny_ssd)),
        ("ssd forward + backward", lambda: ssd_fwd_bwd(tiny_ssd)),
        ("Mamba1 layer fwd+bwd (d_model 256, seqlen 256)", lambda: layer_fwd_bwd("mamba1", 256, 256)),
        ("Mamba2 layer fwd+bwd (d_model 256, seqlen 256)", lambda: layer_fwd_bwd("mamba2", 256, 256)),
    ]
    for name, factory in rows:
        slow, fast = both(factory, host_us)
        print(f"| {name} | {slow:.1f} | {fast:.1f} | {slow - fast:.1f} |", flush=True)


def anchor_table(args) -> None:
    print("\n## do_bench median ms at the ANCHORS shapes (bf16, batch 2)\n")
    print("| op | seqlen | Triton launch ms | cached launch ms |")
    print("|---|---|---|---|")
    ms = lambda fn: do_bench(fn, quantiles=[0.5])  # noqa: E731
    for seqlen in args.seqlens:
        s_inp = scan_inputs(2, seqlen, 4096, 16)
        d_inp = ssd_inputs(2, seqlen, 64, 64, 1, 128, torch.bfloat16)
        rows = [
            ("selective_scan fwd (dim 4096, dstate 16)", lambda s=s_inp: scan_fwd(s)),
            ("selective_scan fwd+bwd", lambda s=s_inp: scan_fwd_bwd(s)),
            ("ssd fwd (64 x 64 heads, dstate 128)", lambda d=d_inp: ssd_fwd(d)),
            ("ssd fwd+bwd", lambda d=d_inp: ssd_fwd_bwd(d)),
        ]
        if args.layers:
            rows += [("Mamba1 layer fwd+bwd (d_model 2048)", lambda s=seqlen: layer_fwd_bwd("mamba1", 2048, s)),
                     ("Mamba2 layer fwd+bwd (d_model 2048)", lambda s=seqlen: layer_fwd_bwd("mamba2", 2048, s))]
        for name, factory in rows:
            slow, fast = both(factory, ms, rounds=3)
            print(f"| {name} | {seqlen} | {slow:.3f} | {fast:.3f} |", flush=True)
        del s_inp, d_inp
        torch.cuda.empty_cache()


def profile(args) -> None:
    for name, fn in [("selective_scan forward", scan_fwd(scan_inputs(1, 256, 256, 16))),
                     ("ssd forward", ssd_fwd(ssd_inputs(1, 256, 4, 64, 1, 128, torch.bfloat16)))]:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        print(f"\n## cProfile, 200 calls of the {name} (cached launch), by own time\n")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:4000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048])
    parser.add_argument("--no-layers", dest="layers", action="store_false", help="skip whole layers at the anchors")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_launch.py needs a CUDA GPU (the cached launch only exists for compiled kernels)")
    print(f"# gpu_launch.py {datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__} | Python {platform.python_version()} | CPU {platform.processor() or '?'}")
    host_table(args)
    anchor_table(args)
    if args.profile:
        profile(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
