"""Static sm_90 SASS of every Mamba-2 SSD kernel, compiled on the CPU at the configs its launchers pick.

Runs the SSD's Triton forward and backward on meta tensors (no GPU, no data) with the kernel launches recorded
instead of run, so every kernel is compiled exactly as the launcher would launch it at a shape: its constexprs,
tiles, num_warps, num_stages, the dtype of every pointer, ints equal to 1 folded and ints divisible by 16 marked
(not the `do_not_specialize` lengths), as Triton's JIT specialises them. Each is compiled for an H100 / H200
(Triton's bundled ptxas, sm_90); the table gives registers, spill stack, shared memory, and the size of each
innermost loop body (SASS instructions per warp; MUFU = exponentials).

    python benchmarks/ssd_sass.py                                  # ANCHORS' shape: batch 2 x 8192, 64 heads
    python benchmarks/ssd_sass.py --batch 8 --nheads 24 --seqlen 2048  # the 130M Mamba-2 training shape
    python benchmarks/ssd_sass.py --z --dump _chunk_dx_kernel > dx.sass

What it is for: a config that cannot build for sm_90 (shared memory over the 227 KB an H100 block may hold, a
layout Triton rejects) fails here without a GPU (a slow CI test runs it), and a kernel change can be read for
registers, spills and loop length before it is timed. Counts are not timings: session 37 cut the SSD forward's
tile loop from 1,125 to 609 instructions and the H100 timed that kernel 15% slower (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mambakit.ops import triton_launch  # noqa: E402
from mambakit.ops.ssd.triton_ssd import ssd_triton_backward, ssd_triton_forward  # noqa: E402

from scan_bwd_sass import body_stats, inner_loops, resources  # noqa: E402  (benchmarks/)

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64"}


def record_launches(batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, dstate: int, chunk: int,
                    dtype: torch.dtype, z: bool) -> list[tuple]:
    """[(JITFunction, args, kwargs)] of every SSD launch of one forward + backward, in launch order."""
    launches = []

    def record(self, grid, args, kwargs):
        launches.append((self.fn, args, kwargs))

    meta = dict(device="meta")
    x = torch.empty(batch, seqlen, nheads, headdim, dtype=dtype, **meta)
    inp = dict(x=x, dt=torch.empty(batch, seqlen, nheads, dtype=dtype, **meta),
               A=torch.empty(nheads, **meta), B=torch.empty(batch, seqlen, ngroups, dstate, dtype=dtype, **meta),
               C=torch.empty(batch, seqlen, ngroups, dstate, dtype=dtype, **meta), D=torch.empty(nheads, **meta),
               z=torch.empty_like(x) if z else None, dt_bias=torch.empty(nheads, **meta), seq_idx=None,
               dt_softplus=True, dt_limit=(0.0, math.inf), T=chunk)
    saved = triton_launch.FastLaunchKernel.launch
    triton_launch.FastLaunchKernel.launch = record
    try:
        y, _, (dtp, cs, cb, states, y_pre) = ssd_triton_forward(initial_state=None, **inp)
        ssd_triton_backward(dy=torch.empty_like(y), dfinal=None, dtp=dtp, cs=cs, cb=cb, states=states, y_pre=y_pre,
                            need_dh0=False, **inp)
    finally:
        triton_launch.FastLaunchKernel.launch = saved
    return launches


def compile_launch(fn, args: tuple, kwargs: dict):
    """Compile one recorded launch for sm_90 as the JIT would specialise it -> the compiled kernel."""
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = _PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif isinstance(v, int) and not p.do_not_specialize and v == 1:
            sig[p.name] = "constexpr"  # the JIT folds ints equal to 1
            const[p.name] = 1
        else:
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if not p.do_not_specialize and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def kernel_rows(launches: list[tuple]) -> list[dict]:
    rows = []
    for fn, args, kwargs in launches:
        k = compile_launch(fn, args, kwargs)
        regs, stack = resources(k)
        sass = k.asm["sass"]
        loops = [body_stats(sass, span) for span in inner_loops(sass)]
        tiles = {key: v for key, v in kwargs.items() if key.startswith(("BLOCK", "PASS", "num_", "maxnreg"))}
        rows.append(dict(name=fn.__name__, tiles=tiles, regs=regs, stack=stack, smem=k.metadata.shared,
                         loops=[(lp["n"], lp["mufu"]) for lp in loops if lp["n"] > 1], sass=sass))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--nheads", type=int, default=64)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--z", action="store_true", help="gate by silu(z) inside the SSD (Mamba-2 without its norm)")
    ap.add_argument("--dump", metavar="KERNEL", help="print this kernel's SASS (e.g. _chunk_dx_kernel) and exit")
    args = ap.parse_args(argv)
    launches = record_launches(args.batch, args.seqlen, args.nheads, args.headdim, args.ngroups, args.dstate,
                               args.chunk, getattr(torch, args.dtype), args.z)
    rows = kernel_rows(launches)
    if args.dump:
        print(next(r["sass"] for r in rows if r["name"] == args.dump))
        return 0
    print(f"SSD kernels for sm_90 at batch {args.batch} x {args.seqlen}, {args.nheads} heads x {args.headdim}, "
          f"{args.ngroups} group(s), dstate {args.dstate}, chunk {args.chunk}, {args.dtype}"
          f"{', z' if args.z else ''} (triton {triton.__version__})\n")
    print("| kernel | tiles | regs | spill stack B | shared KB | inner loops: SASS instr (MUFU) |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for r in rows:
        loops = ", ".join(f"{n} ({m})" for n, m in r["loops"]) or "-"
        print(f"| {r['name']} | {r['tiles']} | {r['regs']} | {r['stack']} | {r['smem'] / 1024:.1f} | {loops} |")
        bad += r["smem"] > SMEM_LIMIT
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
