"""Run the Mamba-2 SSD's forward + backward at one shape, for Nsight Compute to profile its kernels.

The script only makes the launches; the last call runs between `cudaProfilerStart` / `Stop`, so
`ncu --profile-from-start off` sees each kernel of one forward + backward exactly once (`gpu_all.sh ssd-ncu`):

    ncu --clock-control none --profile-from-start off -k regex:_chunk_ --section WarpStateStats \\
        python benchmarks/gpu_ssd_ncu.py --seqlen 32768

Default shape: ANCHORS' SSD (batch 2, 64 heads x headdim 64, dstate 128, ngroups 1, chunk 256), bf16 inputs as
gpu_ssd.py makes them. `--calls` fwd+bwd calls before the profiled one (the first compiles the kernels).
"""

from __future__ import annotations

import argparse

import torch

from mambakit.ops import ssd

from gpu_ssd import GRAD_NAMES, make_inputs  # benchmarks/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--nheads", type=int, default=64)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dstate", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2, help="unprofiled fwd+bwd calls first")
    args = parser.parse_args()
    inp = make_inputs(args.batch, args.seqlen, args.nheads, args.headdim, 1, args.dstate, torch.bfloat16)
    leaves = {k: v.detach().requires_grad_(k in GRAD_NAMES) for k, v in inp.items()}
    dy = torch.randn_like(inp["x"])
    params = [leaves[k] for k in GRAD_NAMES]

    def call() -> None:
        y = ssd(**leaves, dt_softplus=True, chunk_size=args.chunk, backend="triton")
        torch.autograd.grad(y, params, dy)

    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.calls} + 1 profiled SSD fwd+bwd at batch {args.batch} x {args.seqlen}: done", flush=True)


if __name__ == "__main__":
    main()
