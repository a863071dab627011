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

`--mamba1-step` times Mamba-1's decode step between the block's norm and out_proj at 9-128 rows (130M layer, bf16
weights, float32 states): op by op as the module ran it before (cuBLAS in_proj, conv update, cuBLAS x_proj and
dt_proj, state update: five launches) against `ops.mamba1_step` (two kernels) at its default tiles and a sweep of
kernel 1's (BLOCK_N, BLOCK_K, warps, stages) and kernel 2's channels per program, each checked against the ops
first.

    python benchmarks/gpu_decode_proj.py [--batches 1 4 8]
    python benchmarks/gpu_decode_proj.py --rows-matmul [--batches 16 32 64 128]
    python benchmarks/gpu_decode_proj.py --mamba1-step [--batches 16 32 64 128]
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


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, kernel 2's (channels per block, blocks per program),
# in_proj through cuBLAS) of mamba1_step's sweep; session 38's first sweep found BLOCK_M 16, 4 warps best
MAMBA1_STEP_SWEEP = [(16, n, 128, 4, 2, bd, cub) for n in (32, 64, 128, 256) for cub in (False, True)
                     for bd in ((None, 1), (64, 4), (64, 8), (128, 2), (128, 4))
                     if not (n == 256 and not cub)] + [(32, 64, 128, 4, 2, (64, 4), True),
                                                       (64, 64, 128, 4, 2, (64, 4), True),
                                                       (32, 128, 128, 4, 2, (64, 8), True)]


def mamba1_step_table(batches: list[int]) -> None:
    """Mamba-1's decode step after the norm, before out_proj: op by op against `mamba1_step` (default, sweep)."""
    import torch.nn.functional as F

    from mambakit.ops import causal_conv1d_update, mamba1_step, selective_state_update
    from mambakit.ops.mamba_inner.triton_mamba1_step import mamba1_step_tiles, mamba1_step_triton

    d_model, dim, width, rank, dstate = 768, 1536, 4, 48, 16
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0, dtype=torch.bfloat16):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)

    W = dict(in_proj_weight=rnd(2 * dim, d_model, scale=d_model ** -0.5), in_proj_bias=None,
             conv_weight=rnd(dim, width, scale=0.5), conv_bias=rnd(dim, scale=0.1),
             x_proj_weight=rnd(rank + 2 * dstate, dim, scale=dim ** -0.5), x_proj_bias=None,
             dt_proj_weight=rnd(dim, rank, scale=rank ** -0.5), dt_proj_bias=rnd(dim, dtype=torch.float32) - 4.0,
             A=-torch.rand(dim, dstate, generator=g, device="cuda") - 0.5, D=rnd(dim, dtype=torch.float32))
    print("| batch | op by op us (5 launches) | mamba1_step us (default tiles) | best of the sweep us (BLOCK_M, "
          "BLOCK_N, BLOCK_K, warps, stages, block_d, sub_blocks, in_proj) | max rel. error y / states |")
    print("|---|---|---|---|---|")
    for batch in batches:
        h = rnd(batch, d_model)
        states = (rnd(batch, dim, width - 1), rnd(batch, dim, dstate, scale=0.3, dtype=torch.float32))

        def op_by_op(conv_state, ssm_state):
            x, z = F.linear(h, W["in_proj_weight"]).chunk(2, dim=-1)
            x = causal_conv1d_update(conv_state, x, W["conv_weight"], W["conv_bias"], activation="silu")
            dt_low, B, C = torch.split(F.linear(x, W["x_proj_weight"]), [rank, dstate, dstate], dim=-1)
            dt = F.linear(dt_low, W["dt_proj_weight"])
            return selective_state_update(ssm_state, x, dt, W["A"], B, C, D=W["D"], z=z, dt_bias=W["dt_proj_bias"],
                                          dt_softplus=True)

        with torch.inference_mode():
            ref_states = [s.clone() for s in states]
            ref = op_by_op(*ref_states).float()
            got_states = [s.clone() for s in states]
            got = mamba1_step(h, W["in_proj_weight"], None, got_states[0], W["conv_weight"], W["conv_bias"],
                              W["x_proj_weight"], None, W["dt_proj_weight"], W["dt_proj_bias"], W["A"], W["D"],
                              got_states[1]).float()
            errs = [float((a.float() - b.float()).abs().max() / b.float().abs().max())
                    for a, b in [(got, ref), *zip(got_states, ref_states)]]
            assert max(errs) < 2e-2, f"mamba1_step batch {batch}: relative errors {errs}"
            work = [s.clone() for s in states]
            base = us_per_call(lambda: op_by_op(*work))
            timed = {}
            for bm, bn, bk, warps, stages, (bd, sub), cub in [(None, None, None, 4, 2, (None, 1), False),
                                                               *MAMBA1_STEP_SWEEP]:
                if bm is not None and bm > max(16, batch):
                    continue
                tile = mamba1_step_tiles(batch, 2 * dim, d_model, block_n=bn, block_k=bk, block_m=bm)
                key = (*tile, warps, stages, bd, sub, "cublas" if cub else "fused")
                if key in timed:
                    continue

                def call(st, tile=tile, warps=warps, stages=stages, bd=bd, sub=sub, cub=cub):
                    return mamba1_step_triton(h, W["in_proj_weight"], None, st[0], W["conv_weight"],
                                              W["conv_bias"], W["x_proj_weight"], None, W["dt_proj_weight"],
                                              W["dt_proj_bias"], W["A"], W["D"], st[1], tiles=tile,
                                              num_warps=warps, num_stages=stages, block_d=bd, sub_blocks=sub,
                                              in_proj_cublas=cub)

                y = call([s.clone() for s in states])
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                assert err < 2e-2, f"mamba1_step batch {batch} {key}: relative error {err:.2e}"
                timed[key] = us_per_call(lambda call=call: call(work))
            parts = mamba1_step_parts(h, W, work, rank, dstate, best=min(timed, key=timed.get))
        default = next(iter(timed))
        best = min(timed, key=timed.get)
        print(f"| {batch} | {base:.2f} | {timed[default]:.2f} {default} | {timed[best]:.2f} {best} | "
              f"{errs[0]:.1e} / {max(errs[1:]):.1e} |", flush=True)
        print("  sweep: " + ", ".join(f"{k}: {v:.2f}" for k, v in timed.items()), flush=True)
        print("  parts (us, best tiles): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)


def mamba1_step_parts(h, W, work, rank, dstate, best) -> dict[str, float]:
    """Each kernel of mamba1_step at the tiles `best` alone, against what it replaces: kernel 1 against in_proj
    through cuBLAS and through the many-rows kernel (the same GEMM without the conv and x_proj epilogue) and the
    conv update; kernel 2 (partials) against the state update fed dt_low / B / C (dt_proj inside) and fed dt."""
    import torch.nn.functional as F

    from mambakit.ops import causal_conv1d_update
    from mambakit.ops.mamba_inner import triton_mamba1_step as k
    from mambakit.ops.norm_linear.triton_rows_matmul import rows_matmul
    from mambakit.ops.selective_scan.triton_step import selective_state_update_triton

    bm, bn, bk, warps, stages, bd, sub, _ = best
    M, K = h.shape
    N = W["in_proj_weight"].shape[0]
    dim = N // 2
    Q = rank + 2 * dstate
    xz = torch.empty(M, N, device=h.device, dtype=h.dtype)
    partials = torch.zeros(-(-dim // bn), M, Q, device=h.device)

    def kernel1(gemm=True):
        k._in_proj_conv_kernel[(-(-(N if gemm else dim) // bn), -(-M // bm))](
            h, W["in_proj_weight"], xz, xz, work[0], W["conv_weight"], W["conv_bias"], W["x_proj_weight"], partials,
            M, N, K, dim, Q, h.stride(0), W["in_proj_weight"].stride(0), xz.stride(0), *work[0].stride(),
            *W["conv_weight"].stride(), W["x_proj_weight"].stride(0), partials.stride(0), partials.stride(1),
            HAS_BIAS=False, CONV_BIAS=True, WIDTH=W["conv_weight"].shape[1], OP=k.op_dtype(h.dtype),
            OUT_DT=k.tl_dtype(h.dtype), EMULATE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_Q=128, GEMM=gemm,
            num_warps=warps, num_stages=stages)

    kernel1()
    x, z = xz[:, :dim], xz[:, dim:]
    dbl = F.linear(x, W["x_proj_weight"])
    dt = F.linear(dbl[:, :rank], W["dt_proj_weight"])
    B, C = dbl[:, None, rank:rank + dstate], dbl[:, None, rank + dstate:]
    common = dict(D=W["D"], z=z, dt_bias=W["dt_proj_bias"], dt_softplus=True)
    return {
        "kernel 1 (in_proj + conv + x_proj partials)": us_per_call(kernel1),
        "kernel 1 without in_proj (conv + x_proj partials)": us_per_call(lambda: kernel1(gemm=False)),
        "in_proj cuBLAS": us_per_call(lambda: F.linear(h, W["in_proj_weight"])),
        "in_proj many-rows kernel": us_per_call(lambda: rows_matmul(h, W["in_proj_weight"], tiles=(bm, bn, bk),
                                                                    num_warps=warps, num_stages=stages)),
        "conv update": us_per_call(lambda: causal_conv1d_update(work[0], x, W["conv_weight"], W["conv_bias"],
                                                                activation="silu")),
        "kernel 2 (partials)": us_per_call(lambda: selective_state_update_triton(
            work[1], x, None, W["A"], None, None, dt_proj_weight=W["dt_proj_weight"], xdbl_partials=partials,
            block_d=bd, sub_blocks=sub, **common)),
        "state update (dt_low, dt_proj inside)": us_per_call(lambda: selective_state_update_triton(
            work[1], x, dbl[:, :rank], W["A"], B, C, dt_proj_weight=W["dt_proj_weight"], block_d=bd, **common)),
        "state update (dt)": us_per_call(lambda: selective_state_update_triton(work[1], x, dt, W["A"], B, C,
                                                                               **common)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--rows-matmul", action="store_true",
                   help="cuBLAS vs the many-rows kernel on the plain projections (default batches 16 32 64 128)")
    p.add_argument("--mamba1-step", action="store_true",
                   help="Mamba-1's decode step op by op vs ops.mamba1_step (default batches 16 32 64 128)")
    args = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.mamba1_step:
        mamba1_step_table(args.batches or [16, 32, 64, 128])
        return 0
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
