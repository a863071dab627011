"""Decoding of a Transformer++ (and a hybrid) on the GPU: ms per generated token, batch 1, greedy.

The KV cache's attention call changes shape as the cache grows; this times eager `generate` at two shapes, once
with SDPA's default backend choice and once with the cuDNN backend left out, so that a backend that pays per new
shape shows up as the difference; then the decode step replayed from a CUDA graph over KV caches of a fixed
capacity (`CUDAGraphDecoder(max_length=...)`, captured once before the timing), with the share of its greedy tokens
equal to the eager ones (bf16: a near tie may flip). Run it on two trees for a before/after
(PYTHONPATH=OLD/src python benchmarks/gpu_attention_decode.py --no-graph).

    python benchmarks/gpu_attention_decode.py --new-tokens 256
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mambakit.generation import generate
from mambakit.models import MambaConfig, TransformerConfig, build_model

SHAPES = {
    "tpp-d128x2": TransformerConfig(arch="transformer++", d_model=128, n_layer=2, vocab_size=256, num_heads=4),
    "tpp-d768x24": TransformerConfig(arch="transformer++", d_model=768, n_layer=24, vocab_size=50280, num_heads=12),
    "hybrid-d768x24": MambaConfig(d_model=768, n_layer=24, vocab_size=50280, attn_layer_idx=[5, 11, 17, 23],
                                  attn_cfg={"num_heads": 12, "rotary_emb_dim": 64},
                                  ssm_cfg={"layer": "Mamba2"}),
}


def ms_per_token(model, prompt: int, new: int, backends, decoder=None) -> tuple[float, list[int]]:
    """(ms per token, the tokens) of one greedy generate call after a warm-up call; `decoder` replays a graph."""
    ids = [list(range(1, prompt + 1))]
    ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
    graph = decoder if decoder is not None else False
    with ctx:
        generate(model, ids, 8, cuda_graph=graph)  # first use: kernel compiles
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, ids, new, cuda_graph=graph)[0]
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / new, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-graph", action="store_true", help="eager columns only (a tree without fixed-capacity caches)")
    args = p.parse_args()
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; prompt {args.prompt}, {args.new_tokens} new "
          "tokens, batch 1, greedy, bf16")
    print("| model | ms / token, default SDPA backends | without cuDNN attention | CUDA graph | graph tokens = eager |")
    print("|---|---:|---:|---:|---:|")
    for name in args.shapes:
        torch.manual_seed(0)
        model = build_model(SHAPES[name], device=torch.device("cuda"), dtype=torch.bfloat16).eval()
        a, eager = ms_per_token(model, args.prompt, args.new_tokens, None)
        b, _ = ms_per_token(model, args.prompt, args.new_tokens, no_cudnn)
        c, same = "", ""
        if not args.no_graph:
            from mambakit.generation import CUDAGraphDecoder

            decoder = CUDAGraphDecoder(model, 1, max_length=args.prompt + args.new_tokens)
            ms, graphed = ms_per_token(model, args.prompt, args.new_tokens, None, decoder)
            c, same = f"{ms:.2f}", f"{sum(x == y for x, y in zip(graphed, eager)) / len(eager):.2f}"
        print(f"| {name} | {a:.2f} | {b:.2f} | {c} | {same} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
