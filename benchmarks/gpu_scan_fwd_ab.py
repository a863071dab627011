"""The Mamba-1 scan's forward timed the same way under any source tree: is the forward slower than it was?

The forward measured 0.310 / 1.138 ms at seqlen 2048 / 8192 on an H100 on 2026-11-23 (batch 2, dim 4096) and
0.362 / 1.339 from 2026-12-02 on, on H100s and H200s alike, with the same kernel source and policy. This script
uses only what every tree since then has (`triton_scan.selective_scan_triton`, no config), so one call can run it
under several trees (PYTHONPATH=TREE/src) on one GPU and say where the time went: eager `do_bench` median, the
same forward replayed from a CUDA graph (GPU time alone), and each kernel's GPU time from torch.profiler.
Session 35 ran it on the trees of 2026-11-23 (1ff4318), 704c3c0, f188eb2, 5f99edc and main on one H100: the same
0.362 / 1.342 ms in every tree, so the difference was the lent machines, not the code (BENCHMARKS.md).

    PYTHONPATH=.ab/old/src python benchmarks/gpu_scan_fwd_ab.py --label old

One JSON line per seqlen.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import mambakit
from mambakit.ops.selective_scan.triton_scan import selective_scan_triton

from scan_inputs import make_inputs  # benchmarks/ (torch only: runs under any tree)


def forward(inp):
    with torch.no_grad():
        return selective_scan_triton(**inp, dt_softplus=True)


def graph_ms(inp) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            forward(inp)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward(inp)
    return do_bench(graph.replay, quantiles=[0.5])


def kernel_us(inp, calls: int = 10) -> dict[str, float]:
    """GPU microseconds per forward call by kernel name."""
    forward(inp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            forward(inp)
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name[:60]] += ev.device_time / calls
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="tree")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=4096)
    args = parser.parse_args()
    for seqlen in args.seqlens:
        inp = make_inputs(args.batch, seqlen, args.dim, 16)
        forward(inp)  # compile
        eager = do_bench(lambda: forward(inp), quantiles=[0.5])
        print(json.dumps({"label": args.label, "src": mambakit.__file__, "seqlen": seqlen, "eager_ms": round(eager, 4),
                          "graph_ms": round(graph_ms(inp), 4), "kernels_us": kernel_us(inp)}), flush=True)


if __name__ == "__main__":
    main()
