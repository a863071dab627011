"""Activation memory a Mamba layer keeps for its backward, with and without `mixer.recompute`.

Counts the bytes of every tensor autograd saves during one forward (torch.autograd.graph.saved_tensors_hooks;
weights included, they are saved by the projections), for a Mamba-1 and a Mamba-2 layer of d_model 2048 on
batch 2 x 2048 tokens, float32, on the PyTorch path. With `recompute`, only in_proj's output is kept inside
the mixer; conv, scan / SSD, gated norm (and Mamba-2's out_proj) run again in the backward.

    python benchmarks/activation_memory.py
    python benchmarks/activation_memory.py --batch 1 --seqlen 8192
"""

from __future__ import annotations

import argparse

import torch
from cpu_timing import saved_bytes

from mambakit.modules import Mamba1, Mamba2


def saved_mib(module: torch.nn.Module, x: torch.Tensor) -> float:
    return saved_bytes(lambda: module(x)) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=2048)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, args.d_model, requires_grad=True)
    layers = {
        f"Mamba-1 (d_model {args.d_model}, d_state 16)": Mamba1(args.d_model, d_state=16),
        f"Mamba-2 (d_model {args.d_model}, d_state 128, headdim 64)": Mamba2(args.d_model, d_state=128, headdim=64,
                                                                             chunk_size=64),
    }
    print(f"batch {args.batch} x seqlen {args.seqlen}, float32; the layer input is {x.numel() * 4 / 2**20:.0f} MiB\n")
    print("| layer | saved MiB | saved MiB with recompute | ratio |\n|---|---|---|---|")
    for name, layer in layers.items():
        plain = saved_mib(layer, x)
        layer.recompute = True
        rc = saved_mib(layer, x)
        print(f"| {name} | {plain:.0f} | {rc:.0f} | {plain / rc:.1f}x |")


if __name__ == "__main__":
    main()
