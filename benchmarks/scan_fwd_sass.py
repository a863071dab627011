"""Static sm_90 SASS of the selective scan's forward passes and the backward's carry pass, compiled on the CPU.

Compiles `scan_fwd_kernel` (the full pass and the state-only pass of the time-parallel forward) and
`scan_bwd_carry_kernel` for an H100 / H200 (Triton's bundled ptxas, sm_90) at the tiles the launcher picks for a
shape (default: the 130M training shape, batch 8 x 2048, d_inner 1536, dstate 16; bf16 x / dt / z / dy, float32
B / C copies, softplus, z, D, dt_bias, 32-bit offsets), once without the L2 prefetch and once at the policy's
distance (`scan_policy.DEFAULT_FWD_PREFETCH` / `DEFAULT_CARRY_PREFETCH`), and prints registers and spills.

    python benchmarks/scan_fwd_sass.py
    python benchmarks/scan_fwd_sass.py --batch 2 --dim 4096 --seqlen 8192

The prefetch is inline PTX (`prefetch.global.L2`) that Triton's interpreter cannot run, so the CPU tests run these
kernels without it; this compile is what checks, without a GPU, that the prefetching kernels still build for sm_90
and hold no more registers (a slow CI test runs it). Counts are not timings: BENCHMARKS.md has the H100 figures.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from mambakit.ops.common import cdiv  # noqa: E402
from mambakit.ops.selective_scan import scan_policy as policy  # noqa: E402
from mambakit.ops.selective_scan.triton_scan_bwd import scan_bwd_carry_kernel  # noqa: E402
from mambakit.ops.selective_scan.triton_scan_fwd import scan_fwd_kernel  # noqa: E402

from scan_bwd_sass import compile_sm90, resources  # noqa: E402  (benchmarks/)

BF16 = {"x_ptr", "dt_ptr", "z_ptr", "y_ptr", "dy_ptr"}
UNDIVISIBLE = {"seqlen", "seg_len", "nseg", "nchunks", "s_Ad", "s_st"}


def ptr_type(name: str) -> str:
    return "*i32" if name == "seq_ptr" else "*bf16" if name in BF16 else "*fp32"


def compile_kernels(batch: int, seqlen: int, dim: int, dstate: int) -> list[tuple[str, int, object]]:
    """[(kernel label, prefetch distance, compiled kernel)] for the launcher's tiles at this shape."""
    cpu = torch.device("cpu")  # sm_count falls back to an H100's 132 SMs off the GPU
    cfg = policy.ScanConfig()
    _, nseg = policy.segments(seqlen, cfg.checkpoint_interval,
                              policy.default_time_segments(batch, seqlen, dim, dstate, 1, cfg, cpu))
    tiles = policy.pick_tiles(policy.fwd_nl(batch * nseg, dim, dstate, cpu), dstate, dim)
    fn = scan_fwd_kernel.fn if hasattr(scan_fwd_kernel, "fn") else scan_fwd_kernel
    base = dict(CHUNK=cfg.checkpoint_interval, NL=tiles.NL, NH=tiles.NH, BD=tiles.BD, ACC=tl.float32,
                HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ=False, EVEN_N=True, LIBDEVICE=True, I64=False)
    passes = {
        "forward, full pass": dict(base, HAS_D=True, HAS_Z=True, HAS_H0=nseg > 1, SAVE_LAST=True, SAVE_CK=True,
                                   STATE_ONLY=False),
        "forward, state-only pass": dict(base, HAS_D=False, HAS_Z=False, HAS_H0=False, SAVE_LAST=False,
                                         SAVE_CK=False, STATE_ONLY=True),
    }
    out = []
    for label, const in passes.items():
        for dist in (0, policy.fwd_prefetch(cfg)):
            k = compile_sm90(fn, dict(const, PREFETCH=dist), ptr_type, UNDIVISIBLE, tiles.num_warps)
            out.append((label, dist, k))
    # the carry pass: the forward's tile for its (finer) carry segments, as the launcher picks it
    seg_len, bseg = policy.segments(seqlen, cfg.checkpoint_interval,
                                    policy.default_bwd_time_segments(batch, seqlen, dim, dstate, 1, cfg, cpu))
    cin_k = policy.carry_split(batch, seqlen, dim, dstate, 1, seg_len, bseg, cfg, cpu)
    cin_n = cdiv(seqlen, seg_len // cin_k)
    ctiles = policy.pick_tiles(policy.fwd_nl(batch * cin_n, dim, dstate, cpu), dstate, dim)
    cfn = scan_bwd_carry_kernel.fn if hasattr(scan_bwd_carry_kernel, "fn") else scan_bwd_carry_kernel
    cconst = dict(NL=ctiles.NL, NH=ctiles.NH, BD=ctiles.BD, ACC=tl.float32, HAS_Z=True, HAS_BIAS=True,
                  SOFTPLUS=True, HAS_SEQ=False, EVEN_N=True, LIBDEVICE=True, I64=False)
    for dist in (0, policy.carry_prefetch(cfg)):
        k = compile_sm90(cfn, dict(cconst, PREFETCH=dist), ptr_type, UNDIVISIBLE, ctiles.num_warps)
        out.append(("backward, carry pass", dist, k))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--dstate", type=int, default=16)
    args = ap.parse_args()
    print(f"batch {args.batch} x {args.seqlen} x {args.dim}, dstate {args.dstate}\n")
    print("| kernel | prefetch steps | regs | spill stack B | prefetch instructions |")
    print("|---|---|---|---|---|")
    for label, dist, k in compile_kernels(args.batch, args.seqlen, args.dim, args.dstate):
        regs, stack = resources(k)
        nprefetch = k.asm["sass"].count("CCTL")
        print(f"| {label} | {dist} | {regs} | {stack} | {nprefetch} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
