"""S4D with packed documents (`seq_idx`) on the CPU: the per-document FFT convolution against the scan it replaced.

One S4D layer (d_model 128, d_state 16, gated), forward + backward of the sum of its output, best of `--repeats`,
float32, the process's torch threads. Rows: no seq_idx (the plain FFT convolution), seq_idx with two documents in
the first row, seq_idx with a document boundary every ~300 tokens; each through the convolution (the eager default)
and, with `--scan`, through the selective scan that the seq_idx path ran before (and still runs under CUDA-graph
capture, and under torch.compile for real A), timed once: it takes minutes at the larger shapes for S4D-Lin.

    python benchmarks/cpu_s4d_documents.py                  # both A inits, 8 x 2048 and 2 x 16384
    python benchmarks/cpu_s4d_documents.py --scan --shapes 8x2048 2x8192
"""

from __future__ import annotations

import argparse
import time

import torch

from mambakit.modules import S4D
from mambakit.modules import s4d as s4d_module


def fwd_bwd_ms(layer: S4D, x: torch.Tensor, seq_idx: torch.Tensor | None, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        x = x.detach().requires_grad_(True)
        start = time.perf_counter()
        layer(x, seq_idx=seq_idx).sum().backward()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8x2048", "2x16384"], help="BATCHxSEQLEN")
    parser.add_argument("--inits", nargs="+", default=["S4D-Lin", "S4D-Real"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan", action="store_true", help="also time the scan path (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| A init | batch x seqlen | documents | convolution ms | scan ms |")
    print("|---|---|---:|---:|---:|")
    for init in args.inits:
        layer = S4D(128, d_state=16, A_init=init)
        for shape in args.shapes:
            batch, seqlen = (int(v) for v in shape.split("x"))
            x = torch.randn(batch, seqlen, 128)
            two = torch.zeros(batch, seqlen, dtype=torch.int32)
            two[0, seqlen // 3:] = 1
            many = torch.cumsum(torch.rand(batch, seqlen) < 1 / 300, 1).to(torch.int32)
            for label, seq_idx in (("none", None), ("2 in row 0", two), (None, many)):
                docs = label or str(int((many[:, 1:] != many[:, :-1]).sum()) + batch)
                conv = fwd_bwd_ms(layer, x, seq_idx, args.repeats)
                scan = "-"
                if args.scan and seq_idx is not None:
                    real = s4d_module._documents_by_convolution
                    s4d_module._documents_by_convolution = lambda x, is_complex: False
                    try:
                        scan = f"{fwd_bwd_ms(layer, x, seq_idx, 1):,.0f}"
                    finally:
                        s4d_module._documents_by_convolution = real
                print(f"| {init} | {batch} x {seqlen} | {docs} | {conv:,.0f} | {scan} |", flush=True)


if __name__ == "__main__":
    main()
