"""The decode step's projections at the 130M shapes, kernel by kernel: few-rows kernel vs tiled kernel vs cuBLAS.

Issue 18 (batch-1 decode at most 0.4 ms/token): at batch 1 the projections are the step's time (session 16's
profile: 334 of 421 us of Mamba-2's kernels per token were the tiled norm_linear kernel, ~7 us a launch, where
reading the weights takes 0.6-1.3 us; Mamba-1's x_proj and out_proj took 4-6 us each in cuBLAS). For each
projection of one 130M layer (bf16 weights, float32 residual stream) and each batch this prints the time per call
inside a CUDA graph (`triton.testing.do_bench_cudagraph`: no host launch cost, as a graphed decode step runs) of

    gemv      the few-rows kernel (`ops/norm_linear/triton_gemv.py`), default tiles, and a few other tiles
    tiled     the tiled kernel it replaces up to 8 rows (`triton_norm_linear.py`)
    unfused   the ops one by one on the torch backend (norm, F.linear / cuBLAS, conv update), or F.linear alone

after checking gemv against the unfused ops. GB/s count the weights once.

`--rows-matmul` times instead the plain projections of a larger batch (Mamba-1's in_proj, x_proj, out_proj and
Mamba-2's in_proj as plain x @ W^T; batch 64 is where Mamba-1's decode step is its cuBLAS GEMMs, issue 18):
cuBLAS (F.linear) against the many-rows kernel (`ops/norm_linear/triton_rows_matmul.py`) at its default tiles and a
sweep of (BLOCK_N, BLOCK_K, warps, stages), each checked against F.linear first; the best tile is what
`rows_matmul_tiles` and `rows_policy.ROWS_MATMUL_MAX_ROWS` (off until measured) should be set from.

    python benchmarks/gpu_decode_proj.py [--batches 1 4 8]
    python benchmarks/gpu_decode_proj.py --rows-matmul [--batches 16 32 64 128]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mambakit.ops import add_rms_norm_linear, decode_linear, gated_rms_norm_linear  # noqa: E402
from mambakit.ops.norm_linear import triton_gemv, triton_norm_linear  # noqa: E402

# (name, mode, K, N, conv channels, conv start): one 130M layer (d_model 768, d_inner 1536, Mamba-2 d_state 128)
SHAPES = [
    ("mamba1 norm+in_proj+conv", "add", 768, 3072, 1536, 0),
    ("mamba1 x_proj", "plain", 1536, 80, 0, 0),
    ("mamba1 out_proj", "plain", 1536, 768, 0, 0),
    ("mamba2 norm+in_proj+conv", "add", 768, 3352, 1792, 1536),
    ("mamba2 gated norm+out_proj", "gated", 1536, 768, 0, 0),
]
# alternative (weights per program, minimum programs) of the few-rows kernel
TILE_VARIANTS = [(8192, 256), (8192, 128), (4096, 256), (16384, 256), (8192, 512)]


def make_call(mode: str, K: int, N: int, conv: int, c0: int, batch: int, backend: str):
    """A no-argument function running one projection on `backend` with fixed random inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def rnd(*shape, scale=1.0, dtype=dt):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)

    x, W = rnd(batch, K), rnd(N, K, scale=K ** -0.5)
    if mode == "plain":
        return lambda: decode_linear(x, W, backend=backend)
    nw = rnd(K, scale=0.1) + 1
    if mode == "gated":
        z = rnd(batch, K)
        return lambda: gated_rms_norm_linear(x, z, nw, W, backend=backend)
    r, st = rnd(batch, K, dtype=torch.float32), rnd(batch, conv, 3)
    cw, cb = rnd(conv, 4, scale=0.5), rnd(conv, scale=0.1)
    return lambda: add_rms_norm_linear(x, r, nw, W, residual_dtype=torch.float32, conv_state=st, conv_weight=cw,
                                       conv_bias=cb, conv_start=c0, backend=backend)[0]


@contextlib.contextmanager
def tiles(weights: int | None = None, programs: int | None = None, off: bool = False):
    """Patch the few-rows kernel's tile choice (or switch it off: the tiled kernel / F.linear run instead)."""
    saved = (triton_gemv._WEIGHTS_PER_PROGRAM, triton_gemv._MIN_PROGRAMS, triton_norm_linear.gemv_tiles,
             triton_gemv.gemv_tiles)
    if weights:
        triton_gemv._WEIGHTS_PER_PROGRAM = weights
    if programs:
        triton_gemv._MIN_PROGRAMS = programs
    if off:
        triton_norm_linear.gemv_tiles = triton_gemv.gemv_tiles = lambda *a, **k: None
    try:
        yield
    finally:
        (triton_gemv._WEIGHTS_PER_PROGRAM, triton_gemv._MIN_PROGRAMS, triton_norm_linear.gemv_tiles,
         triton_gemv.gemv_tiles) = saved


def us_per_call(fn) -> float:
    """Median microseconds per call inside a CUDA graph."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


# (name, K, N) of the plain projections a batch-64 decode step runs through cuBLAS today
PLAIN_SHAPES = [("mamba1 in_proj", 768, 3072), ("mamba1 x_proj", 1536, 80), ("mamba1 out_proj", 1536, 768),
                ("mamba2 in_proj", 768, 3352)]
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the many-rows kernel's sweep
ROWS_MATMUL_SWEEP = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (16, 64, 4, 4), (32, 64, 4, 4),
                     (16, 256, 4, 2), (32, 256, 8, 2), (64, 64, 8, 4)]


def rows_matmul_table(batches: list[int]) -> None:
    """cuBLAS vs the many-rows kernel (default tiles, then the sweep) per plain projection and batch."""
    from mambakit.ops.norm_linear.triton_rows_matmul import rows_matmul, rows_matmul_tiles

    print("| projection | batch | cuBLAS us | rows_matmul us (default tiles) | best of the sweep us (BLOCK_N, BLOCK_K, "
          "warps, stages) | weights GB/s at the best |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, K, N in PLAIN_SHAPES:
        for batch in batches:
            x = torch.randn(batch, K, generator=g, device="cuda").bfloat16()
            W = (torch.randn(N, K, generator=g, device="cuda") * K ** -0.5).bfloat16()
            with torch.inference_mode():
                ref = torch.nn.functional.linear(x, W).float()
                cublas = us_per_call(lambda: torch.nn.functional.linear(x, W))
                default = rows_matmul_tiles(batch, N, K)
                timed = {}
                for bn, bk, warps, stages in [(default[1], default[2], 4, 3), *ROWS_MATMUL_SWEEP]:
                    if (bn, bk, warps, stages) in timed:  # the default tile is one of the sweep's
                        continue
                    tile = rows_matmul_tiles(batch, N, K, block_n=bn, block_k=bk)

                    def call(tile=tile, warps=warps, stages=stages):
                        return rows_matmul(x, W, tiles=tile, num_warps=warps, num_stages=stages)

                    err = float((call().float() - ref).abs().max() / ref.abs().max())
                    assert err < 2e-2, f"{name} batch {batch} tiles {tile}: relative error {err:.2e}"
                    timed[(bn, bk, warps, stages)] = us_per_call(call)
            best = min(timed, key=timed.get)
            gbs = N * K * 2 / (timed[best] * 1e-6) / 1e9
            print(f"| {name} | {batch} | {cublas:.2f} | {timed[(default[1], default[2], 4, 3)]:.2f} {default} | "
                  f"{timed[best]:.2f} {best} | {gbs:.0f} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--rows-matmul", action="store_true",
                   help="cuBLAS vs the many-rows kernel on the plain projections (default batches 16 32 64 128)")
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.rows_matmul:
        rows_matmul_table(args.batches or [16, 32, 64, 128])
        return 0
    args.batches = args.batches or [1, 4, 8]
    print("| projection | batch | gemv us (tiles) | tiled / F.linear us | unfused us | gemv GB/s "
          "| other gemv tiles us |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, K, N, conv, c0 in SHAPES:
        for batch in args.batches:
            with torch.inference_mode():
                ref = make_call(mode, K, N, conv, c0, batch, "torch")().float()
                got = make_call(mode, K, N, conv, c0, batch, "triton")().float()
                err = float((got - ref).abs().max() / ref.abs().max())
                assert err < 2e-2, f"{name} batch {batch}: relative error {err:.2e}"
                gemv = us_per_call(make_call(mode, K, N, conv, c0, batch, "triton"))
                with tiles(off=True):
                    tiled = us_per_call(make_call(mode, K, N, conv, c0, batch, "triton"))
                unfused = us_per_call(make_call(mode, K, N, conv, c0, batch, "torch"))
                others = []
                for weights, programs in TILE_VARIANTS[1:]:
                    with tiles(weights, programs):
                        us = us_per_call(make_call(mode, K, N, conv, c0, batch, "triton"))
                        others.append(f"{weights}/{programs} {triton_gemv.gemv_tiles(batch, N, K)}: {us:.2f}")
            gbs = N * K * 2 / (gemv * 1e-6) / 1e9
            print(f"| {name} | {batch} | {gemv:.2f} {triton_gemv.gemv_tiles(batch, N, K)} | {tiled:.2f} | "
                  f"{unfused:.2f} | {gbs:.0f} | {'; '.join(others)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
