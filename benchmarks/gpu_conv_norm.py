"""GPU benchmark of the two small ops of both Mamba blocks: causal_conv1d and rms_norm (plain and gated).

Shapes: conv batch 2, seqlen 8192, dim 4096, width 4, bias, silu (Mamba's conv on d_inner 4096);
norm 2 x 8192 rows x 4096 hidden, plain, and gated norm(x * silu(z)) with group_size 512 and 4096.
bf16 activations, bf16 conv weight, float32 norm weight. For each op it prints do_bench medians (ms)
of the forward and of forward + backward for the Triton path, the torch path and PyTorch's own op
(F.conv1d / F.rms_norm on bf16, where one exists), and the achieved GB/s counting the minimal bytes:
every input read once and every output written once (conv forward: x in, y out; conv backward adds
x and dy in, dx out; gated norm forward: x, z in, y out; its backward adds x, z, dy in, dx, dz out;
weights, bias and statistics are a rounding error and left out). The copy ceiling on the H100 is
3.02 TB/s (ANCHORS.md). A correctness line per op compares the Triton bf16 result with the torch
path in float32 first.

Usage (on the GPU machine, from the repository root):
    python benchmarks/gpu_conv_norm.py                # the table
    python benchmarks/gpu_conv_norm.py --sweep        # also time a handful of tile configs per kernel
    python benchmarks/gpu_conv_norm.py --peer         # also time causal_conv1d / mamba_ssm when installed
    python benchmarks/gpu_conv_norm.py --train-shapes [--sweep]
                                                      # the conv kernels alone at the 130M training layouts
                                                      # (x a column slice of in_proj's output), fwd and bwd apart,
                                                      # per variant; --sweep adds tile / stream candidates
    TRITON_INTERPRET=1 python benchmarks/gpu_conv_norm.py --device cpu --seqlen 64 --dim 64 --sweep
    TRITON_INTERPRET=1 python benchmarks/gpu_conv_norm.py --device cpu --train-shapes --sweep --train-batch 1 \
        --train-seqlen 8 --batch 1 --seqlen 8 --dim 64       # smoke tests of this script on CPU (timings meaningless)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if importlib.util.find_spec("mambakit") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mambakit.ops import causal_conv1d, causal_conv1d_update, rms_norm  # noqa: E402

COPY_TBS = 3.02  # measured device copy ceiling on the H100 (ANCHORS.md)


def bench(fn, device: str, grad_to_none=None) -> float:
    """Median ms: triton.testing.do_bench on CUDA, a few perf_counter runs elsewhere (smoke tests)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, inputs: dict, dy):
    """A closure running fn(**inputs) and its backward from dy; inputs that need grad are leaves."""
    def run():
        y = fn(**inputs)
        y.backward(dy)
    return run


def leaves(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone().requires_grad_(True)
        out[k] = v
    return out


def row(name: str, ms_f: float, ms_fb: float, bytes_f: int, bytes_fb: int) -> str:
    gbs = lambda b, ms: b / (ms * 1e-3) / 1e9  # noqa: E731
    return (f"| {name} | {ms_f:.4f} | {gbs(bytes_f, ms_f):.0f} ({100 * gbs(bytes_f, ms_f) / (COPY_TBS * 1e3):.0f}%) "
            f"| {ms_fb:.4f} | {gbs(bytes_fb, ms_fb):.0f} ({100 * gbs(bytes_fb, ms_fb) / (COPY_TBS * 1e3):.0f}%) |")


HEADER = "| path | fwd ms | fwd GB/s (% of copy) | fwd+bwd ms | fwd+bwd GB/s (% of copy) |\n|---|---|---|---|---|"


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


# -------------------------------------------------------------------------------------------------
# causal_conv1d
# -------------------------------------------------------------------------------------------------


def native_conv(x, weight, bias, activation="silu"):
    """PyTorch's own depthwise Conv1d (cuDNN) on the (batch, seqlen, dim) layout, transposes included."""
    width = weight.shape[1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight[:, None, :], bias, groups=weight.shape[0])
    return F.silu(y.transpose(1, 2))


def conv_section(args, device: str) -> None:
    batch, seqlen, dim, width = args.batch, args.seqlen, args.dim, 4
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, seqlen, dim, device=device, generator=g).to(dt)
    inputs = dict(x=x, weight=(torch.randn(dim, width, device=device, generator=g) / 2).to(dt),
                  bias=torch.randn(dim, device=device, generator=g).to(dt))
    dy = torch.randn(batch, seqlen, dim, device=device, generator=g).to(dt)
    n = batch * seqlen * dim * 2
    bytes_f, bytes_fb = 2 * n, 5 * n  # fwd: x in, y out; bwd adds x, dy in, dx out

    print(f"\n## causal_conv1d: batch {batch}, seqlen {seqlen}, dim {dim}, width {width}, bias, silu, bf16\n")
    check = leaves(inputs)
    y_t = causal_conv1d(**check, activation="silu", backend="triton")
    y_t.backward(dy)
    grads_t = {k: v.grad for k, v in check.items()}
    check32 = leaves({k: v.float() for k, v in inputs.items()})
    y_r = causal_conv1d(**check32, activation="silu", backend="torch")
    y_r.backward(dy.float())
    errs = [f"y {max_rel_err(y_t, y_r):.1e}"] + [f"d{k} {max_rel_err(grads_t[k], v.grad):.1e}"
                                                   for k, v in check32.items()]
    print("check, triton bf16 vs torch fp32 (max abs err / max abs):", ", ".join(errs), "\n")

    paths = [("mambakit triton", lambda **kw: causal_conv1d(**kw, activation="silu", backend="triton")),
             ("mambakit torch", lambda **kw: causal_conv1d(**kw, activation="silu", backend="torch")),
             ("PyTorch F.conv1d bf16", native_conv)]
    if args.peer and importlib.util.find_spec("causal_conv1d") is not None:
        from causal_conv1d import causal_conv1d_fn

        # Dao-AILab causal-conv1d takes (batch, dim, seqlen); a transposed view of our layout is its channel-last mode
        paths.append(("causal_conv1d (CUDA, channel-last)",
                      lambda x, weight, bias: causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="silu")
                      .transpose(1, 2)))
    print(HEADER)
    for name, fn in paths:
        with torch.no_grad():
            ms_f = bench(lambda: fn(**inputs), device)
        lv = leaves(inputs)
        ms_fb = bench(fwd_bwd(fn, lv, dy), device, grad_to_none=list(lv.values()))
        print(row(name, ms_f, ms_fb, bytes_f, bytes_fb))

    # packed documents with an initial state and the final state: the chunked-prefill / packing path
    docs = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    docs[:, seqlen // 3:] = 1
    docs[:, 2 * seqlen // 3:] = 2
    packed = dict(inputs, initial_state=torch.randn(batch, dim, width - 1, device=device, generator=g).to(dt),
                  seq_idx=docs)
    fn = lambda **kw: causal_conv1d(**kw, activation="silu", return_final_state=True, backend="triton")[0]  # noqa: E731
    with torch.no_grad():
        ms_f = bench(lambda: fn(**packed), device)
    lv = leaves(packed)
    ms_fb = bench(fwd_bwd(fn, lv, dy), device, grad_to_none=[v for v in lv.values() if v.is_floating_point()])
    print(row("mambakit triton, 3 docs + initial/final state", ms_f, ms_fb, bytes_f, bytes_fb))

    # one decoding step at batch 64: latency, dominated by the launch
    state = torch.zeros(64, dim, width - 1, device=device)
    xt = torch.randn(64, dim, device=device).to(dt)
    for backend in ("triton", "torch"):
        ms = bench(lambda: causal_conv1d_update(state, xt, inputs["weight"], inputs["bias"], "silu", backend=backend),
                   device)
        print(f"\ncausal_conv1d_update, batch 64, dim {dim}, {backend}: {ms * 1e3:.1f} us", end="")
    print()

    if args.sweep:
        conv_sweep(inputs, dy, device, bytes_f, bytes_fb - bytes_f)


def conv_sweep(inputs, dy, device, bytes_f, bytes_b) -> None:
    """Time the kernels alone (launcher calls) over a few (BLOCK_L, BLOCK_D, num_warps) and TILES."""
    from mambakit.ops.causal_conv1d.triton_conv import causal_conv1d_bwd, causal_conv1d_fwd

    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    print("\nsweep, forward kernel (BLOCK_L, BLOCK_D, num_warps): ms, GB/s")
    for cfg in ((32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (64, 256, 8), (32, 64, 4)):
        ms = bench(lambda: causal_conv1d_fwd(x=x, weight=w, bias=b, initial_state=None, seq_idx=None, silu=True,
                                             return_final_state=False, block_l=cfg[0], block_d=cfg[1],
                                             num_warps=cfg[2]), device)
        print(f"  {cfg}: {ms:.4f} ms, {bytes_f / (ms * 1e-3) / 1e9:.0f} GB/s")
    print("sweep, backward kernel (BLOCK_L, BLOCK_D, num_warps, TILES): ms, GB/s (bytes: x, dy in, dx out)")
    for cfg in ((8, 128, 4, None), (16, 128, 4, None), (16, 128, 8, None), (32, 128, 8, None), (8, 256, 8, None),
                (16, 64, 4, None), (8, 128, 4, 8), (8, 128, 4, 32)):
        ms = bench(lambda: causal_conv1d_bwd(x=x, weight=w, bias=b, initial_state=None, seq_idx=None, silu=True, dy=dy,
                                             dfinal=None, need_dinit=False, block_l=cfg[0], block_d=cfg[1],
                                             num_warps=cfg[2], tiles=cfg[3]), device)
        print(f"  {cfg}: {ms:.4f} ms, {bytes_b / (ms * 1e-3) / 1e9:.0f} GB/s")


# -------------------------------------------------------------------------------------------------
# rms_norm
# -------------------------------------------------------------------------------------------------


def norm_section(args, device: str) -> None:
    rows, hidden = args.batch * args.seqlen, args.dim
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(rows, hidden, device=device, generator=g).to(dt)
    z = torch.randn(rows, hidden, device=device, generator=g).to(dt)
    weight = 1.0 + 0.1 * torch.randn(hidden, device=device, generator=g)
    dy = torch.randn(rows, hidden, device=device, generator=g).to(dt)
    n = rows * hidden * 2
    cases = [("plain", dict(x=x, weight=weight), {}, 2 * n, 5 * n)]
    for group in (512, hidden):
        if hidden % group == 0:
            cases.append((f"gated norm(x * silu(z)), group {group}", dict(x=x, weight=weight, z=z),
                          dict(group_size=group), 3 * n, 8 * n))

    for title, inputs, kw, bytes_f, bytes_fb in cases:
        print(f"\n## rms_norm {title}: {rows} rows x {hidden}, bf16 x/z, float32 weight\n")
        check = leaves(inputs)
        y_t = rms_norm(**check, **kw, backend="triton")
        y_t.backward(dy)
        check32 = leaves({k: v.float() for k, v in inputs.items()})
        y_r = rms_norm(**check32, **kw, backend="torch")
        y_r.backward(dy.float())
        errs = [f"y {max_rel_err(y_t, y_r):.1e}"] + [f"d{k} {max_rel_err(check[k].grad, v.grad):.1e}"
                                                       for k, v in check32.items()]
        print("check, triton bf16 vs torch fp32 (max abs err / max abs):", ", ".join(errs), "\n")
        paths = [("mambakit triton", lambda **a: rms_norm(**a, **kw, backend="triton")),
                 ("mambakit torch", lambda **a: rms_norm(**a, **kw, backend="torch"))]
        if "z" not in inputs:
            paths.append(("PyTorch F.rms_norm bf16", lambda x, weight: F.rms_norm(x, (hidden,), weight.to(dt), 1e-5)))
        if args.peer and "z" in inputs and importlib.util.find_spec("mamba_ssm") is not None:
            from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

            paths.append(("mamba_ssm layernorm_gated (Triton)",
                          lambda x, weight, z: rmsnorm_fn(x, weight, None, z=z, eps=1e-5, group_size=kw["group_size"],
                                                          norm_before_gate=False)))
        print(HEADER)
        for name, fn in paths:
            with torch.no_grad():
                ms_f = bench(lambda: fn(**inputs), device)
            lv = leaves(inputs)
            ms_fb = bench(fwd_bwd(fn, lv, dy), device, grad_to_none=list(lv.values()))
            print(row(name, ms_f, ms_fb, bytes_f, bytes_fb))
        if args.sweep:
            norm_sweep(inputs, kw, dy, device, bytes_f, bytes_fb - bytes_f)


def norm_sweep(inputs, kw, dy, device, bytes_f, bytes_b) -> None:
    """Time the kernels alone over tile sizes (elements per tile) and warps."""
    from mambakit.ops.rms_norm.triton_norm import rms_norm_bwd, rms_norm_fwd

    x, w, z = inputs["x"], inputs["weight"], inputs.get("z")
    group = kw.get("group_size") or x.shape[-1]
    _, rstd = rms_norm_fwd(x2=x, weight=w, z2=z, eps=1e-5, group=group, norm_before_gate=False)
    print("\nsweep, forward kernel (elements per tile, num_warps): ms, GB/s")
    for elems, warps in ((2048, 4), (4096, 8), (4096, 4), (8192, 8), (8192, 16)):
        ms = bench(lambda: rms_norm_fwd(x2=x, weight=w, z2=z, eps=1e-5, group=group, norm_before_gate=False,
                                        elems=elems, num_warps=warps), device)
        print(f"  ({elems}, {warps}): {ms:.4f} ms, {bytes_f / (ms * 1e-3) / 1e9:.0f} GB/s")
    print("sweep, backward kernel (elements per tile, num_warps, row tiles per program): ms, GB/s")
    for elems, warps, tiles in ((1024, 4, None), (2048, 4, None), (2048, 8, None), (4096, 8, None),
                                (4096, 16, None), (2048, 8, 8), (2048, 8, 64)):
        ms = bench(lambda: rms_norm_bwd(x2=x, weight=w, z2=z, rstd=rstd, dy2=dy, group=group, norm_before_gate=False,
                                        elems=elems, num_warps=warps, row_tiles=tiles), device)
        print(f"  ({elems}, {warps}, {tiles}): {ms:.4f} ms, {bytes_b / (ms * 1e-3) / 1e9:.0f} GB/s")


# -------------------------------------------------------------------------------------------------
# causal_conv1d at the training layouts (--train-shapes): each kernel alone, per variant and tile config
# -------------------------------------------------------------------------------------------------

# (variant, block_l, block_d, num_warps, rows or tiles, prefetch): block_l is the tile's rows (tile) or the rows
# per program (stream); the fifth field is ROWS per step (stream) or TILES per program (tile bwd, None: the
# launcher's); prefetch: the stream kernels load the next step's rows before this step's arithmetic.
# ptxas for sm_90a at Mamba-2's layout, registers: fwd tile 91/70/141/136/62, stream 48-96; bwd tile 168 (197 at
# BLOCK_D 256; (16, 128, 4) spills, left out), stream 121 (rows 2, prefetch) / 161 (rows 4, prefetch) / 124
# (rows 4) / 168 (rows 8); none spills.
FWD_CANDIDATES = (
    ("tile", 64, 128, 8, None, True), ("tile", 32, 128, 4, None, True), ("tile", 128, 128, 8, None, True),
    ("tile", 64, 256, 8, None, True), ("tile", 32, 64, 4, None, True),
    ("stream", 128, 256, 2, 4, True), ("stream", 64, 256, 2, 4, True), ("stream", 256, 256, 2, 4, True),
    ("stream", 128, 256, 2, 2, True), ("stream", 128, 256, 2, 4, False), ("stream", 128, 256, 2, 8, False),
    ("stream", 128, 512, 4, 4, True), ("stream", 128, 128, 1, 4, True),
)
BWD_CANDIDATES = (
    ("tile", 8, 128, 4, None, True), ("tile", 8, 64, 2, None, True), ("tile", 8, 256, 8, None, True),
    ("tile", 16, 64, 4, None, True),
    ("stream", 128, 256, 2, 2, True), ("stream", 64, 256, 2, 2, True), ("stream", 256, 256, 2, 2, True),
    ("stream", 512, 256, 2, 2, True), ("stream", 128, 256, 2, 4, True), ("stream", 128, 256, 2, 4, False),
    ("stream", 256, 256, 2, 4, False), ("stream", 128, 256, 2, 8, False), ("stream", 128, 512, 4, 2, True),
    ("stream", 128, 128, 1, 2, True), ("stream", 128, 128, 1, 4, False),
)


def train_layouts(args, device: str, dt: torch.dtype = torch.bfloat16) -> list[tuple[str, dict]]:
    """(name, tensors) per shape: x a column slice of in_proj's output as the fused mixers pass it, dy
    contiguous (the gradient of the conv output), dx a slice of in_proj's output gradient."""
    from mambakit.modules import Mamba1, Mamba2

    m1 = Mamba1(d_model=768, device="meta")  # the 130M shapes: d_model 768, expand 2
    m2 = Mamba2(d_model=768, d_state=128, headdim=64, ngroups=1, device="meta")
    b, L = args.train_batch, args.train_seqlen
    # Mamba-1: xz = (x, z), x first; Mamba-2: zxbcdt = (z, xBC, dt), xBC after d_inner columns of z
    shapes = [(f"Mamba-1 130M: {b} x {L} x {m1.d_inner}, x = xz[..., :{m1.d_inner}] of {m1.in_proj.out_features}",
               m1.in_proj.out_features, 0, m1.d_inner),
              (f"Mamba-2 130M: {b} x {L} x {m2.conv_dim}, x = zxbcdt[..., {m2.d_inner}:{m2.d_inner + m2.conv_dim}] "
               f"of {m2.in_proj.out_features}", m2.in_proj.out_features, m2.in_proj.out_features - m2.conv_dim
               - m2.nheads, m2.conv_dim),
              (f"isolated: {args.batch} x {args.seqlen} x {args.dim} contiguous", None, 0, args.dim)]
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for name, d_in_proj, offset, dim in shapes:
        bb, ll = (args.batch, args.seqlen) if d_in_proj is None else (b, L)
        wide = d_in_proj or dim
        x = torch.randn(bb, ll, wide, device=device, generator=g).to(dt)[..., offset:offset + dim]
        dx = torch.empty(bb, ll, wide, device=device, dtype=dt)[..., offset:offset + dim]
        out.append((f"{name}, {str(dt).removeprefix('torch.')}", dict(x=x, weight=(torch.randn(dim, 4, device=device, generator=g) / 2).to(dt),
                               bias=torch.randn(dim, device=device, generator=g).to(dt),
                               dy=torch.randn(bb, ll, dim, device=device, generator=g).to(dt), dx=dx)))
    return out


def _conv_kernels(t: dict, variant, block_l, block_d, num_warps, extra, prefetch):
    """fwd() and bwd() closures calling the launchers alone with one config (extra: rows or tiles)."""
    from mambakit.ops.causal_conv1d.triton_conv import causal_conv1d_bwd, causal_conv1d_fwd

    common = dict(x=t["x"], weight=t["weight"], bias=t["bias"], initial_state=None, seq_idx=None, silu=True,
                  variant=variant, block_l=block_l, block_d=block_d, num_warps=num_warps)
    fwd_extra = dict(rows=extra, prefetch=prefetch) if variant == "stream" else {}
    bwd_extra = dict(rows=extra, prefetch=prefetch) if variant == "stream" else dict(tiles=extra)

    def fwd():
        return causal_conv1d_fwd(**common, return_final_state=False, **fwd_extra)[0]

    def bwd():
        return causal_conv1d_bwd(**common, dy=t["dy"], dfinal=None, need_dinit=False, dx=t["dx"], **bwd_extra)
    return fwd, bwd


def _train_reference(t: dict):
    """y, dx, dweight, dbias of the torch path in float32 (the check's reference)."""
    # copies: in float32 .float() would return the benchmark's own tensors
    x32, w32, b32 = (t[k].detach().to(torch.float32, copy=True).requires_grad_(True) for k in ("x", "weight", "bias"))
    y = causal_conv1d(x32, w32, b32, activation="silu", backend="torch")
    y.backward(t["dy"].float())
    return y.detach(), x32.grad, w32.grad, b32.grad


def _errs(t, fwd, bwd, ref) -> tuple[float, ...]:
    y = fwd()
    dx, dw, db, _ = bwd()
    return tuple(max_rel_err(a, b) for a, b in zip((y, dx, dw, db), ref))


def train_shapes_section(args, device: str) -> None:
    """Per shape: the copy floor, each variant's default config (check, us, GB/s, % of floor), then the sweep."""
    rep = 100 if args.sweep else 200  # ms per timing: the sweep's ~80 timings and compiles stay under 3 minutes

    def timer(fn) -> float:
        if device != "cuda":
            return bench(fn, device)
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    print("\nconv kernels alone at the training layouts: width 4, bias, silu; fwd = y from x, bwd = dx, "
          "dweight, dbias from x and dy (the launcher, its partial-sum reduction included). Floor: the same "
          "bytes moved by a contiguous copy of x's size (fwd: x in, y out; bwd: 1.5 x that, x and dy in, dx out). "
          "err: max abs err / max abs against the torch path in float32 (y, dx, dweight, dbias).")
    t_start = time.perf_counter()
    # bf16 at every layout (swept), then Mamba-2's layout in float16 and float32 (the defaults only)
    layouts = [(name, t, args.sweep) for name, t in train_layouts(args, device)]
    layouts += [(*train_layouts(args, device, dt)[1], False) for dt in (torch.float16, torch.float32)]
    for name, t, sweep in layouts:
        n_bytes = t["x"].numel() * t["x"].element_size()
        # the floor copies a contiguous tensor of x's size: the bytes at full speed, whatever x's layout
        src = t["x"].contiguous()
        out = torch.empty_like(src)
        floor_f = timer(lambda: out.copy_(src)) * 1e3
        floor_b = 1.5 * floor_f
        ref = _train_reference(t)
        print(f"\n## {name}\n\ncopy floor: fwd {floor_f:.1f} us, bwd {floor_b:.1f} us "
              f"({2 * n_bytes / floor_f / 1e3:.0f} GB/s)\n")
        print("| kernel | variant (block_l, block_d, warps, rows/tiles) | us | GB/s | % of floor | err y, dx, dw, db |")
        print("|---|---|---|---|---|---|")
        best = {}
        for kind, cands in (("fwd", FWD_CANDIDATES), ("bwd", BWD_CANDIDATES)):
            defaults = (("tile", None, None, None, None, True), ("stream", None, None, None, None, True))
            # defaults first, so that a failing config below cannot hide them
            for cand in defaults + (cands if sweep else ()):
                fwd, bwd = _conv_kernels(t, *cand)
                try:
                    errs = _errs(t, fwd, bwd, ref)
                    us = timer(fwd if kind == "fwd" else bwd) * 1e3
                except Exception as e:  # noqa: BLE001  (a config that does not compile: say so, keep sweeping)
                    print(f"| {kind} | {cand} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                    continue
                nb = (2 if kind == "fwd" else 3) * n_bytes
                floor = floor_f if kind == "fwd" else floor_b
                # bf16 / fp16 in and out: ~4e-3 / ~5e-4 expected, float32 ~1e-6; larger is a wrong result
                ok = max(errs) < (1e-4 if t["x"].dtype == torch.float32 else 2e-2)
                label = f"{cand[0]} default" if cand[1] is None else str(cand)
                print(f"| {kind} | {label} | {us:.1f} | {nb / us / 1e3:.0f} | {100 * floor / us:.0f}% | "
                      + ", ".join(f"{e:.1e}" for e in errs) + ("" if ok else " WRONG") + " |")
                if ok and (kind not in best or us < best[kind][0]):
                    best[kind] = (us, label)
        print("\nbest: " + "; ".join(f"{k} {v[1]} {v[0]:.1f} us" for k, v in best.items())
              + f"  ({time.perf_counter() - t_start:.0f} s so far)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--dim", type=int, default=4096, help="conv channels and norm hidden size")
    p.add_argument("--sweep", action="store_true", help="also time tile configs of each kernel")
    p.add_argument("--peer", action="store_true", help="also time causal_conv1d / mamba_ssm when installed")
    p.add_argument("--only", choices=("conv", "norm"), default=None)
    p.add_argument("--train-shapes", action="store_true",
                   help="time the conv kernels alone at the training layouts (with --sweep: tile configs too)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seqlen", type=int, default=2048)
    args = p.parse_args(argv)
    import triton

    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# mambakit causal_conv1d / rms_norm benchmark, {datetime.date.today()}, {dev}, "
          f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}")
    if args.train_shapes:
        train_shapes_section(args, args.device)
        return
    if args.only in (None, "conv"):
        conv_section(args, args.device)
    if args.only in (None, "norm"):
        norm_section(args, args.device)


if __name__ == "__main__":
    main()
