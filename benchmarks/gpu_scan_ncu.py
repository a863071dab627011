"""Run the Mamba-1 scan's forward + backward a few times at one shape, for Nsight Compute to profile its kernels.

The script only makes the launches; `ncu` picks the kernel and the launch (`gpu_all.sh scan-ncu` shows how):

    ncu --clock-control none -k regex:scan_bwd_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        python benchmarks/gpu_scan_ncu.py --batch 8 --dim 1536 --seqlen 2048

Default shape: the 130M training shape (batch 8 x 2048, d_inner 1536, dstate 16), bf16 inputs as
gpu_selective_scan.py makes them. `--calls` fwd+bwd calls in all (the first compiles the kernels).
"""

from __future__ import annotations

import argparse

import torch

from mambakit.ops.selective_scan.triton_scan import ScanConfig, selective_scan_triton

from scan_inputs import GRAD_NAMES, make_inputs  # benchmarks/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--interval", type=int, default=None, help="checkpoint interval (default: ScanConfig's)")
    parser.add_argument("--prefetch", type=int, default=None, help="ScanConfig.bwd_prefetch (default: the policy's)")
    parser.add_argument("--fwd-prefetch", type=int, default=None, help="ScanConfig.fwd_prefetch")
    parser.add_argument("--carry-prefetch", type=int, default=None, help="ScanConfig.carry_prefetch")
    args = parser.parse_args()
    inp = make_inputs(args.batch, args.seqlen, args.dim, 16, requires_grad=True)
    dy = torch.randn(args.batch, args.seqlen, args.dim, device="cuda", dtype=torch.bfloat16)
    params = [inp[k] for k in GRAD_NAMES]
    knobs = {"checkpoint_interval": args.interval, "bwd_prefetch": args.prefetch, "fwd_prefetch": args.fwd_prefetch,
             "carry_prefetch": args.carry_prefetch}
    config = ScanConfig(**{k: v for k, v in knobs.items() if v is not None})
    for _ in range(args.calls):
        y = selective_scan_triton(**inp, dt_softplus=True, config=config)
        torch.autograd.grad(y, params, dy)
    torch.cuda.synchronize()
    print(f"{args.calls} fwd+bwd calls at batch {args.batch} x {args.seqlen} x {args.dim}: done", flush=True)


if __name__ == "__main__":
    main()
