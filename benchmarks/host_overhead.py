"""The host's own time per Mamba layer call, without a GPU: every Triton launch replaced by a no-op.

On the GPU a layer call at a short sequence is host-bound (the launches' Python, the checks, allocations and
autograd take as long as the kernels: BENCHMARKS.md, the layers A/B), and the lent GPU's host speed moves
20-30% between calls, so host-side changes are hard to see there. This runs the Triton path on CPU tensors
under the interpreter (TRITON_INTERPRET=1, set here) with `FastLaunchKernel.launch` doing nothing: what is
timed is everything a call does on the host except Triton's launch itself (~8-13 us per kernel on the H200
with mambakit's cached launch). The outputs are garbage (uninitialised memory; denormals are flushed so that
the torch matmuls on it run at their normal speed); only the time means anything.

Tiny shapes (d_model 64, 16 tokens) keep the torch ops' own CPU work small. One thread. Prints one JSON line:
median microseconds per call over --repeats runs of --calls calls, forward under no_grad and forward +
backward (input and every weight gradient), for the fused mixer op and the separate ops.

--prefill times a whole 24-layer MambaLM forward instead, as serving's prefill calls it (4 rows x 16 tokens
from zero states, `model(ids, cache=..., logits_to_keep=1)` under inference_mode): ms per call.

Usage (repository root; PYTHONPATH=OTHER/src to time another tree with this script):
    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --prefill
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels are never compiled

import torch  # noqa: E402

from mambakit.modules import Mamba1, Mamba2  # noqa: E402
from mambakit.ops import triton_launch, use_backend  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", choices=["mamba1", "mamba2"], default=["mamba1", "mamba2"])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill", action="store_true", help="a 24-layer model's prefill call instead of one layer")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    triton_launch.FastLaunchKernel.launch = lambda self, grid, launch_args, kwargs: None
    if args.prefill:
        return prefill(args)
    result = {}
    for layer in args.layers:
        torch.manual_seed(0)
        module = Mamba1(64, d_state=16, d_conv=4, expand=2) if layer == "mamba1" else \
            Mamba2(64, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1, chunk_size=16)
        x = torch.randn(1, 16, 64, requires_grad=True)
        dy = torch.randn_like(x)
        params = list(module.parameters())

        def fwd() -> None:
            with torch.no_grad():
                module(x)

        def fwd_bwd() -> None:
            torch.autograd.grad(module(x), [x, *params], dy, allow_unused=True)

        for fused in (True, False):
            module.fused = fused
            with use_backend("triton"):
                for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    for _ in range(20):
                        fn()
                    runs = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            fn()
                        runs.append(1e6 * (time.perf_counter() - t0) / args.calls)
                    result[f"{layer} {'fused' if fused else 'ops'} {name}"] = round(statistics.median(runs), 1)
    print(json.dumps({"benchmark": "host_overhead", "torch": torch.__version__, "us_per_call": result}))
    return 0


def prefill(args) -> int:
    from mambakit import MambaConfig, MambaLM
    from mambakit.generation import InferenceCache, allocate_cache

    result = {}
    for layer in args.layers:
        ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16} if layer == "mamba2" else \
            {"layer": "Mamba1", "d_state": 16}
        torch.manual_seed(0)
        model = MambaLM(MambaConfig(d_model=64, n_layer=24, vocab_size=256, ssm_cfg=ssm)).eval()
        ids = torch.randint(0, 256, (4, 16))

        def call() -> None:
            cache = allocate_cache(model, 4)
            model(ids, cache=InferenceCache(cache.layers, seqlen_offset=1), logits_to_keep=1)

        with use_backend("triton"), torch.inference_mode():
            for _ in range(5):
                call()
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(max(1, args.calls // 4)):
                    call()
                runs.append(1e3 * (time.perf_counter() - t0) / max(1, args.calls // 4))
        result[f"{layer} prefill call, 24 layers"] = round(statistics.median(runs), 2)
    print(json.dumps({"benchmark": "host_overhead --prefill", "torch": torch.__version__, "ms_per_call": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
