"""Localize the GPU-only dA error of the SSD Triton backward (bf16, headdim 64, dstate 16, chunk 256).

Rebuilds the inputs of tests/ops/test_ssd_triton.py::test_gpu_small_heads_low_precision[bf16-P64-N16-T256]
(seed 0 as the autouse fixture sets it, `_lowp_inputs((2, 2 T + 37, 4, P, 1, N))`, `_upstream`) and prints:

  1. every gradient of the Triton path against the float32 torch path with the test's budget (2x the error
     of the bf16 Listing 1 plus 1e-3 of the scale): whether the failure reproduces, and what else is off;
  2. the backward's intermediates (dt', cs, C B^T, states, dH, the chunk-end terms ddend, the row parts of
     dcs) against a float64 recomputation, and every dA partial (batch, chunk, head) with its error split by
     the launch that made each ingredient. With dcs_i = intra_i (dcb kernel: row sums minus column sums of
     one fp32 tile, i.e. dY_i.y_diag_i - dt'_i x_i.dXd_diag_i) + off_i (dbc kernel's dY_i.y_off_i)
     - dt'_i x_i.dXo_i (dx kernel; dXo the inter-chunk part of dXd) + [i = T - 1] (ddend + <dH, S>), with
     ddend = exp(cs_end) <dH, h_in> (chunk_state_bwd) and <dH, S> = sum_i dt'_i x_i.dXo_i (dx kernel, the same
     row terms), a partial is sum_i dcs_i W_i with W_i = sum_{j <= i} dt'_j, so each ingredient's error enters
     it exactly; "rest" is the dx kernel's own share, cross-checked by rerunning the dx kernel on the exact row
     parts and ddend. (Before 2026-12 the dcb kernel gave the row sums only, the dx kernel subtracted
     dt'_i x_i.dXd_i from its own bf16 dot, and ddend was <dH, h_end> from the bf16 states: the "M", "dH" and
     "states" roundings below then entered dcs through two cancellations and made the error.)
     Next to each error, the same for a float64 model that rounds only where the bf16 kernels round (dot
     operands, bf16 stores): equal columns mean the kernels compute what they were designed to, and the
     error is their designed rounding; then the model with each rounding left out (which one makes it);
  3. dA against its budget for variants, cheapest compiles first, until --time-budget: the same run again
     (determinism, fast_launch's cached launches), Triton's own launch path, emulated roundings on the GPU
     (fp32 FMA dots instead of bf16 tensor cores), other seeds, a zero final-state gradient, no ragged chunk,
     the backward launchers' tile / warp knobs (monkeypatched configs), chunk 128, float32 inputs; each
     next to the model's dA error on the same values.

    .venv/bin/python benchmarks/ssd_grad_probe.py                 # GPU: about 60-80 s, mostly Triton compiles
    .venv/bin/python benchmarks/ssd_grad_probe.py --headdim 64 --dstate 64   # a passing control case
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/ssd_grad_probe.py --device cpu --quick   # interpreter, ~90 s
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/ssd_grad_probe.py --device cpu --sweep 16  # dA of 16 seeds only

On the CPU the seeds draw other values (CPU generator), so to run the interpreter, which reproduces the GPU's
roundings, on the failing values, save them on the GPU and load them on the CPU:

    .venv/bin/python benchmarks/ssd_grad_probe.py --save-inputs ssd_probe_inputs.pt
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/ssd_grad_probe.py --device cpu --quick --inputs ssd_probe_inputs.pt

The same dA error there means the values, not the GPU build (dA is a sum with heavy cancellation); a small one
means the GPU build computes something else.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import math
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' helpers build the inputs and the budget
if importlib.util.find_spec("mambakit") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from mambakit.ops.triton_launch import triton_launch_mode  # noqa: E402
from tests.helpers import low_precision_tolerance, run_with_grads  # noqa: E402
from tests.ops.test_ssd_triton import _grad_names, _lowp_inputs, _run_ssd, _ssd_listing_lowp, _upstream  # noqa: E402


def _mod(name):
    # `mambakit.ops.ssd` is also the name of the public function, so import kernel modules by path
    return importlib.import_module(f"mambakit.ops.ssd.{name}")


ts = _mod("triton_ssd")
KERNEL_MODULES = [_mod(n) for n in ("triton_chunk_scan", "triton_chunk_scan_bwd", "triton_chunk_state",
                                    "triton_state_passing")]
op_dtype = _mod("triton_common").op_dtype

BATCH, NHEADS, LOWP = 2, 4, torch.bfloat16
OPTS = dict(dt_softplus=True)


def make_case(seed: int, headdim: int, dstate: int, seqlen: int, device: str):
    """The test's inputs and upstream gradients (bf16 x, dt, B, C, z, dy; float32 A, D, dt_bias, h0, dfinal)."""
    torch.manual_seed(seed)
    inp = _lowp_inputs((BATCH, seqlen, NHEADS, headdim, 1, dstate), LOWP, device)
    gy, gh = _upstream(inp)
    return inp, [gy.to(LOWP), gh]


def yardstick(inp: dict, upstream: list, chunk: int):
    """The test's check: float32 torch-path gradients and each gradient's budget from the bf16 Listing 1."""
    names = _grad_names(inp)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
    _, ref = _run_ssd(f32, dict(chunk_size=chunk, **OPTS), "torch", [u.float() for u in upstream])
    _, low = run_with_grads(lambda **kw: _ssd_listing_lowp(**kw, chunk_size=chunk, dtype=LOWP, **OPTS),
                            inp, upstream, names)
    return ref, {k: low_precision_tolerance(low[k], ref[k]) for k in names}


def worst(got: torch.Tensor, ref: torch.Tensor):
    """(max abs error, index of it, got there, expected there), in float64."""
    err = (got.detach().double() - ref.detach().double()).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return float(err.max()), idx, float(got[idx]), float(ref[idx])


def chunked(t: torch.Tensor, T: int) -> torch.Tensor:
    """(b, L, ...) -> (b, c, T, ...), zero-padded to whole chunks."""
    pad = -t.shape[1] % T
    t = F.pad(t, [0, 0] * (t.dim() - 2) + [0, pad])
    return t.reshape(t.shape[0], t.shape[1] // T, T, *t.shape[2:])


# Where the bf16 kernels round (a dot operand or a bf16 store); everything else is fp32 in them.
ROUNDINGS = {
    "dY": "dy silu(z) as a dot operand (dcb, dbc, dx kernels)",
    "M": "the dx kernel's decayed C B^T tile (its dot gives dx and ddt; dcs takes the dcb kernel's fp32 tile)",
    "dH": "dH stored bf16 (the dx kernel's dH B term)",
    "states": "the chunk states stored bf16 (the off part, ddend)",
    "walk": "the chunk-state walks' operands x dt' w (forward) and dY w (backward)",
}


def reference_parts(inp: dict, dy: torch.Tensor, dfinal: torch.Tensor, T: int, rounded=frozenset()) -> dict:
    """The Triton backward's intermediates and dA partials recomputed in float64, in the kernels' layouts
    (ops/ssd/triton_chunk_scan_bwd.py's docstring has the formulas; padding rows have dt' = 0).

    rounded: the ROUNDINGS to apply, a model of the bf16 kernels that is float64 everywhere else.
    """
    def rnd(name, t):
        return t.to(LOWP).double() if name in rounded else t

    x, dt, A, B, C, D, z, bias, h0 = (inp[k].double() for k in
                                      ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"))
    b, L, H, P = x.shape
    R = H // B.shape[2]
    v = dt + bias
    dtp = chunked(F.softplus(v), T).permute(0, 1, 3, 2)  # (b, c, H, T)
    cs = (dtp * A[:, None]).cumsum(-1)
    X, dY = chunked(x, T), chunked(dy.double() * F.silu(z), T)  # (b, c, T, H, P)
    Bh, Ch = chunked(B.repeat_interleave(R, 2), T), chunked(C.repeat_interleave(R, 2), T)  # (b, c, T, H, N)
    Xd = X * dtp.permute(0, 1, 3, 2)[..., None]
    tri = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    CB = torch.einsum("bcihn,bcjhn->bchij", Ch, Bh) * tri
    M = CB * torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~tri, -math.inf))
    y_diag = torch.einsum("bchij,bcjhp->bcihp", M, Xd)
    cs_end = cs[..., -1]  # (b, c, H)
    w_out, w_in = torch.exp(cs_end[..., None] - cs), torch.exp(cs)  # (b, c, H, T)
    S = torch.einsum("bcthp,bcthn->bchpn", rnd("walk", w_out.permute(0, 1, 3, 2)[..., None] * Xd), Bh)
    states = [h0]
    for k in range(S.shape[1]):
        states.append(torch.exp(cs_end[:, k])[..., None, None] * states[-1] + S[:, k])
    hs = rnd("states", torch.stack(states, 1))  # (b, c + 1, H, P, N)
    y_off = torch.einsum("bcht,bcthn,bchpn->bcthp", w_in, Ch, hs[:, :-1])
    dH, g = [], dfinal.double()
    for k in reversed(range(S.shape[1])):
        dH.insert(0, g)
        g = torch.exp(cs_end[:, k])[..., None, None] * g + torch.einsum(
            "bthp,bthn->bhpn", rnd("walk", w_in[:, k].transpose(1, 2)[..., None] * dY[:, k]), Ch[:, k])
    dH = torch.stack(dH, 1)  # (b, c, H, P, N): gradient of the state at the end of chunk c
    dYo = rnd("dY", dY)  # as a dot operand
    dXo = torch.einsum("bcht,bchpn,bcthn->bcthp", w_out, rnd("dH", dH), Bh)  # inter-chunk part of dXd
    dXd = torch.einsum("bchij,bcihp->bcjhp", rnd("M", M), dYo) + dXo  # the dx kernel's (dx, ddt)
    dXs = torch.einsum("bchij,bcihp->bcjhp", M, dYo)  # the dcb kernel's fp32 tile's column sums (dcs)
    rows = lambda t: t.permute(0, 1, 3, 2)  # noqa: E731  (b, c, T, H) -> (b, c, H, T)
    diag, off, xdx = rows((dYo * y_diag).sum(-1)), rows((dYo * y_off).sum(-1)), rows((X * dXd).sum(-1))
    intra = diag - dtp * rows((X * dXs).sum(-1))
    # the chunk-end term <dH, h_end> = exp(cs_end) <dH, h_in> (chunk_state_bwd: ddend) + <dH, S> (the dx kernel,
    # as the sum of its row terms dt' x.dXo):
    #     da_j = sum_{i >= j} (intra_i + off_i) + ddend + sum_{i < j} dt'_i x_i.dXo_i
    ddend = torch.exp(cs_end) * (dH * hs[:, :-1]).sum((-1, -2))  # (b, c, H)
    xdo = dtp * rows((X * dXo).sum(-1))
    da = (intra + off).flip(-1).cumsum(-1).flip(-1) + ddend[..., None] + xdo.cumsum(-1) - xdo
    ddt = ((xdx + A[:, None] * da) * torch.sigmoid(chunked(v, T)).permute(0, 1, 3, 2))
    dx = dXd * rows(dtp)[..., None] + D[:, None] * dY
    unchunk = lambda t: t.reshape(b, -1, *t.shape[3:])[:, :L]  # noqa: E731
    bhc = lambda t: t.transpose(1, 2)  # noqa: E731  (b, c, H, ...) -> (b, H, c, ...)
    return dict(dtp=bhc(dtp), cs=bhc(cs), cb=CB[:, :, ::R], states=hs, dH=dH, ddend=bhc(ddend), intra=bhc(intra),
                off=bhc(off), dA_part=bhc((dtp * da).sum(-1)), ddt=unchunk(rows(ddt)), dx=unchunk(dx),
                dA=(dtp * da).sum((0, 1, 3)))


def triton_parts(inp: dict, dy: torch.Tensor, dfinal: torch.Tensor, T: int) -> dict:
    """Launches 1-8 as `ssd_triton_forward` / `ssd_triton_backward` run them, keeping what the op discards:
    rowp (the row parts of dcs), ddend, dH and the dA partials; `dx_launch` reruns launch 8 on other parts."""
    x, dt, B, C, z = (inp[k] for k in ("x", "dt", "B", "C", "z"))
    A, D, bias, h0 = (inp[k].float() for k in ("A", "D", "dt_bias", "initial_state"))
    lim = (0.0, math.inf)
    _, _, (dtp, cs, cb, states, y_pre) = ts.ssd_triton_forward(
        x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=bias, initial_state=h0, seq_idx=None, dt_softplus=True,
        dt_limit=lim, T=T)
    G, N = B.shape[2], B.shape[3]
    dH, _, ddend = ts.chunk_state_bwd(dy, z, C, cs, None, states, dfinal, True, T)
    cfg_dcb, cfg_dbc, cfg_dx, nslot = ts.bwd_config(N, T)
    dcb, rowp = ts.chunk_dcb_bwd(x, dy, z, dtp, cs, None, cb, G, nslot, T, cfg=cfg_dcb)
    ts.chunk_dbc_bwd(x, dy, z, B, C, dtp, cs, None, states, dH, dcb, rowp, T, cfg=cfg_dbc)  # rowp slots >= nblk

    def dx_launch(rowp_, ddend_):
        return ts.chunk_dx_bwd(x, dt, dy, z, y_pre, A, bias, D, B, dtp, cs, None, cb, dH, rowp_, ddend_, True, lim,
                               T, cfg=cfg_dx)

    dx, ddt, _, dA_p, _, _ = dx_launch(rowp, ddend)
    bm = cfg_dx["BLOCK_M"]
    nblk = T // bm
    # slots < nblk: the dcb kernel's tiles (row sums of the tiles left of the diagonal, the diagonal tile's row
    # minus column sums, minus the column sums of the tiles below it); slots >= nblk: the dbc kernel's N blocks
    return dict(dtp=dtp, cs=cs, cb=cb, states=states, dH=dH, ddend=ddend.sum(-1), intra=rowp[:, :, :, :nblk].sum(3),
                off=rowp[:, :, :, nblk:].sum(3), dA_part=dA_p.transpose(1, 2), ddt=ddt, dx=dx, dA=dA_p.sum((0, 1)),
                rowp=rowp, ddend_raw=ddend, nblk=nblk, bm=bm, dx_launch=dx_launch)


def print_gradients(grads: dict, ref: dict, budget: dict) -> None:
    """Step 1: the test's comparison, one row per gradient."""
    print("| grad | max err | budget | err/budget | scale | worst at | got | expected |")
    print("|---|---|---|---|---|---|---|---|")
    for k in grads:
        err, idx, got, exp = worst(grads[k], ref[k])
        flag = "  **FAIL**" if err > budget[k] else ""
        print(f"| d{k} | {err:.3e} | {budget[k]:.3e} | {err / budget[k]:.2f}{flag} | {float(ref[k].abs().max()):.3e} "
              f"| {idx} | {got:.5g} | {exp:.5g} |")


def print_intermediates(tri: dict, ref: dict) -> None:
    """Step 2a: every intermediate against float64, with the launch that writes it."""
    T, bm = tri["dtp"].shape[-1], tri["bm"]
    tiles = (torch.arange(T)[:, None] // bm >= torch.arange(T)[None, :] // bm).to(tri["cb"].device)  # stored tiles
    rows = [("dtp", "1 chunk_decay"), ("cs", "1 chunk_decay"), ("cb", "2 chunk_cb (lower tiles)"),
            ("states", "3 chunk_state_fwd"), ("dH", "5 chunk_state_bwd"), ("ddend", "5 chunk_state_bwd"),
            ("intra", "6 dcb: rowp slots < nblk"), ("off", "7 dbc: rowp slots >= nblk"), ("dx", "8 dx"),
            ("ddt", "8 dx"), ("dA_part", "8 dx (b, H, c)"), ("dA", "sum of partials")]
    print("| tensor | launch | max err | scale | err/scale | worst at | got | expected |")
    print("|---|---|---|---|---|---|---|---|")
    for name, launch in rows:
        got, exp = tri[name], ref[name]
        if name == "cb":
            got, exp = torch.where(tiles, got, 0.0), torch.where(tiles, exp, 0.0)
        err, idx, g, e = worst(got, exp)
        scale = float(exp.abs().max())
        print(f"| {name} | {launch} | {err:.3e} | {scale:.3e} | {err / max(scale, 1e-30):.2e} | {idx} | {g:.5g} "
              f"| {e:.5g} |")


def split(parts: dict, ref: dict, W: torch.Tensor) -> dict:
    """Error of each dA partial (b, H, c) against `ref` and its shares: dA_part = sum_i dcs_i W_i, so an
    ingredient's error e_i enters as sum_i e_i W_i; rest is what is left, the dx kernel's x.dXd and sums."""
    err = dict(total=parts["dA_part"].double() - ref["dA_part"],
               intra=(W * (parts["intra"].double() - ref["intra"])).sum(-1),
               off=(W * (parts["off"].double() - ref["off"])).sum(-1),
               ddend=W[..., -1] * (parts["ddend"].double() - ref["ddend"]))
    err["rest"] = err["total"] - err["intra"] - err["off"] - err["ddend"]
    return err


def print_partials(tri: dict, ref: dict, model: dict, seqlen: int) -> None:
    """Step 2b: each dA partial's error split by ingredient, per (batch, chunk, head) and per head, next to
    the bf16-operand model's (`reference_parts` with every rounding); then the worst partial by row block."""
    b, H, nc, T = tri["dtp"].shape
    W = tri["dtp"].double().cumsum(-1)
    got, exp = split(tri, ref, W), split(model, ref, W)
    exact = torch.zeros_like(tri["rowp"])
    exact[:, :, :, 0], exact[:, :, :, tri["nblk"]] = ref["intra"].float(), ref["off"].float()
    ddend_exact = torch.zeros_like(tri["ddend_raw"])
    ddend_exact[..., 0] = ref["ddend"].float()
    got["alone"] = tri["dx_launch"](exact, ddend_exact)[3].transpose(1, 2).double() - ref["dA_part"]
    cols = [("err", got["total"]), ("model", exp["total"]), ("intra (dcb)", got["intra"]), ("model", exp["intra"]),
            ("off (dbc)", got["off"]), ("ddend (state_bwd)", got["ddend"]), ("model", exp["ddend"]),
            ("rest (dx)", got["rest"]), ("model", exp["rest"]), ("dx alone", got["alone"])]
    print("error of each dA partial (Triton - float64) split by the launch that made the ingredient; 'model': the "
          "same for the bf16-operand model, i.e. what the kernels' designed roundings alone give; 'dx alone': the "
          "dx kernel rerun on the exact intra, off and ddend (should equal rest)\n")
    print("| b | c | h | rows | dA_part | " + " | ".join(n for n, _ in cols) + " |")
    print("|---" * (5 + len(cols)) + "|")
    for i in range(b):
        for c in range(nc):
            for h in range(H):
                print(f"| {i} | {c} | {h} | {min(T, seqlen - c * T)} | {float(ref['dA_part'][i, h, c]):.4g} | "
                      + " | ".join(f"{float(t[i, h, c]):+.3g}" for _, t in cols) + " |")
    print("\nper head, summed over batch and chunks (what the test compares):\n")
    print("| h | dA | " + " | ".join(n for n, _ in cols) + " |")
    print("|---" * (2 + len(cols)) + "|")
    for h in range(H):
        print(f"| {h} | {float(ref['dA_part'][:, h].sum()):.5g} | "
              + " | ".join(f"{float(t[:, h].sum()):+.3g}" for _, t in cols) + " |")
    i, h, c = (int(v) for v in torch.unravel_index(got["total"].abs().argmax(), got["total"].shape))
    bm = tri["bm"]
    ddt_err = chunked((tri["ddt"].double() - ref["ddt"]), T)[i, c, :, h].abs()  # (T,)
    dx_err = chunked((tri["dx"].double() - ref["dx"]), T)[i, c, :, h].abs().amax(-1)
    ddt_scale, dx_scale = float(ref["ddt"].abs().max()), float(ref["dx"].abs().max())
    d_diag, m_diag = W * (tri["intra"].double() - ref["intra"]), W * (model["intra"] - ref["intra"])
    print(f"\nworst partial (b {i}, c {c}, h {h}) by row block of the dx kernel (BLOCK_M {bm}); "
          f"ddt / dx errors relative to their scales {ddt_scale:.3g} / {dx_scale:.3g}\n")
    print("| rows | intra err x W | model | max ddt err / scale | max dx err / scale |")
    print("|---|---|---|---|---|")
    for jb in range(T // bm):
        r = slice(jb * bm, (jb + 1) * bm)
        print(f"| {r.start}-{r.stop - 1} | {float(d_diag[i, h, c, r].sum()):+.3g} "
              f"| {float(m_diag[i, h, c, r].sum()):+.3g} | {float(ddt_err[r].max()) / ddt_scale:.2e} "
              f"| {float(dx_err[r].max()) / dx_scale:.2e} |")


def print_ablation(inp: dict, dy: torch.Tensor, dfinal: torch.Tensor, T: int, exact: dict, model: dict) -> None:
    """Step 2c: the model's dA error per head with all its roundings and with each one left out."""
    print("the bf16-operand model's dA error per head, with all its roundings and with one left out (which "
          "rounding makes the error):\n")
    print("| h | all | " + " | ".join(f"without {r}" for r in ROUNDINGS) + " |")
    print("|---" * (2 + len(ROUNDINGS)) + "|")
    errs = [model["dA"] - exact["dA"]] + [reference_parts(inp, dy, dfinal, T, frozenset(ROUNDINGS) - {r})["dA"]
                                          - exact["dA"] for r in ROUNDINGS]
    for h in range(exact["dA"].shape[0]):
        print(f"| {h} | " + " | ".join(f"{float(e[h]):+.3g}" for e in errs) + " |")
    print("\n" + "; ".join(f"{r}: {what}" for r, what in ROUNDINGS.items()))


def bwd_config_patch(bm: int | None = None, dx: dict | None = None, dbc: dict | None = None):
    """`triton_ssd.bwd_config` with a row block for all three kernels and extra settings for dx / dbc."""
    original = ts.bwd_config

    def patched(dstate, chunk_size):
        cfg_dcb, cfg_dbc, cfg_dx, _ = original(dstate, chunk_size)
        if bm is not None:
            for cfg in (cfg_dcb, cfg_dbc, cfg_dx):
                cfg["BLOCK_M"] = min(bm, chunk_size)
        cfg_dx.update(dx or {})
        cfg_dbc.update(dbc or {})
        nslot = chunk_size // cfg_dbc["BLOCK_M"] + -(-dstate // cfg_dbc["BLOCK_N"])
        return cfg_dcb, cfg_dbc, cfg_dx, nslot

    return mock.patch.object(ts, "bwd_config", patched)


def launcher_cfg_patch(name: str, **cfg):
    """`triton_ssd.<name>` (chunk_state_fwd / chunk_state_bwd) called with the given cfg."""
    return mock.patch.object(ts, name, functools.partial(getattr(ts, name), cfg=cfg))


def emulate_patch():
    """Every SSD kernel with EMULATE on: operands rounded by hand, IEEE fp32 dots (the interpreter's arithmetic)."""
    stack = contextlib.ExitStack()
    for m in KERNEL_MODULES:
        stack.enter_context(mock.patch.object(m, "kernel_flags", lambda dt: {"OP": op_dtype(dt), "EMULATE": True}))
    return stack


def variant_list(seeds: int) -> list:
    """(name, case changes, patch factory or None, GPU only, in --quick), the most telling and the cheapest to
    compile first (another seed, another upstream or length compiles nothing; a config is one kernel)."""
    return [
        ("same run again", {}, None, False, False),
        ("Triton's own launch (no fast_launch cache)", {}, lambda: triton_launch_mode("triton"), True, False),
        ("emulated roundings, fp32 FMA dots", {}, emulate_patch, True, False),
        *[(f"seed {s}", dict(seed=s), None, False, s == 1) for s in range(1, seeds + 1)],
        ("final-state gradient 0", dict(gh0=True), None, False, False),
        ("no ragged chunk (first 2 T tokens)", dict(whole=True), None, False, True),
        ("dx num_warps 8", {}, lambda: bwd_config_patch(dx=dict(num_warps=8)), False, False),
        ("dx num_warps 2", {}, lambda: bwd_config_patch(dx=dict(num_warps=2)), False, False),
        ("dx BLOCK_P 32", {}, lambda: bwd_config_patch(dx=dict(BLOCK_P=32)), False, False),
        ("dbc BLOCK_N 32", {}, lambda: bwd_config_patch(dbc=dict(BLOCK_N=32)), False, False),
        ("state_bwd BLOCK_N 32", {}, lambda: launcher_cfg_patch("chunk_state_bwd", BLOCK_N=32), False, True),
        ("state_bwd BLOCK_P 32", {}, lambda: launcher_cfg_patch("chunk_state_bwd", BLOCK_P=32), False, False),
        ("state_bwd num_warps 8", {}, lambda: launcher_cfg_patch("chunk_state_bwd", num_warps=8), False, False),
        ("dcb/dbc/dx BLOCK_M 32", {}, lambda: bwd_config_patch(bm=32), False, True),
        ("state_fwd parallel path", {}, lambda: launcher_cfg_patch("chunk_state_fwd", PARALLEL=True), False, False),
        ("chunk 128", dict(chunk=128), None, False, False),
        ("float32 inputs, same values", dict(fp32=True), None, False, False),
    ]


def variant_inputs(args, base: dict, seed=None, gh0=False, whole=False):
    """A variant's bf16 inputs and upstream: another seed, a zero final-state gradient, or the first 2 T tokens."""
    if seed is not None and seed != base["seed"]:
        inp, up = make_case(seed, args.headdim, args.dstate, base["seqlen"], args.device)
    else:
        inp, up = dict(base["inp"]), list(base["upstream"])
    if gh0:
        up = [up[0], torch.zeros_like(up[1])]
    if whole:
        n = 2 * args.chunk
        inp.update({k: inp[k][:, :n].contiguous() for k in ("x", "dt", "B", "C", "z")})
        up = [up[0][:, :n].contiguous(), up[1]]
    return inp, up


def model_error(inp: dict, upstream: list, chunk: int) -> torch.Tensor:
    """dA error per head of the bf16-operand model (what the kernels' designed roundings give)."""
    T = ts.kernel_chunk(chunk, inp["x"].shape[1])
    dy, dfinal = upstream[0].contiguous(), upstream[1].float().contiguous()
    return (reference_parts(inp, dy, dfinal, T, frozenset(ROUNDINGS))["dA"]
            - reference_parts(inp, dy, dfinal, T)["dA"])


def run_variants(args, base: dict) -> None:
    """Step 3: dA (and the worst other gradient) against the budget of each variant's own yardstick, with
    the bf16-operand model's dA error on the same values (the size the designed roundings give)."""
    print("| variant | dA err | model | budget | err/budget | worst head: got / expected | worst other grad | s |")
    print("|---|---|---|---|---|---|---|---|")
    refs = {((), args.chunk): base["yardstick"]}
    for name, change, patch, gpu_only, quick in variant_list(args.seeds):
        if (gpu_only and args.device == "cpu") or (args.quick and not quick):
            continue
        t0 = time.perf_counter()
        if t0 - base["t_start"] > args.time_budget:
            print(f"| {name} | skipped: past --time-budget {args.time_budget:g} s | | | | | | |")
            continue
        change = dict(change)
        chunk, fp32 = change.pop("chunk", args.chunk), change.pop("fp32", False)
        inp, up = variant_inputs(args, base, **change)
        key = (tuple(sorted(change.items())), chunk)
        if key not in refs:
            refs[key] = (*yardstick(inp, up, chunk), model_error(inp, up, chunk))
        ref, budget, model = refs[key]
        if fp32:
            inp = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
            up = [u.float() for u in up]
        with patch() if patch else contextlib.nullcontext():
            _, grads = _run_ssd(inp, dict(chunk_size=chunk, **OPTS), "triton", up)
        err, (h,), got, exp = worst(grads["A"], ref["A"])
        others = {k: worst(grads[k], ref[k])[0] / budget[k] for k in grads if k != "A"}
        other = max(others, key=others.get)
        flag = "  **FAIL**" if err > budget["A"] else ""
        print(f"| {name} | {err:.3e} | {'-' if fp32 else f'{float(model.abs().max()):.3e}'} | {budget['A']:.3e} "
              f"| {err / budget['A']:.2f}{flag} | {h}: {got:.5g} / {exp:.5g} | d{other} {others[other]:.2f} "
              f"| {time.perf_counter() - t0:.1f} |", flush=True)


def run_sweep(args) -> None:
    """--sweep: dA of the Triton path against its budget for seeds args.seed .. args.seed + SWEEP - 1 (the test's
    case drawn from each seed), next to the bf16-operand model's dA error; nothing else (a before / after table)."""
    print("| seed | dA err | model | budget | err/budget | worst head: got / expected | worst other grad | s |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for seed in range(args.seed, args.seed + args.sweep):
        t0 = time.perf_counter()
        inp, up = make_case(seed, args.headdim, args.dstate, 2 * args.chunk + 37, args.device)
        ref, budget = yardstick(inp, up, args.chunk)
        model = model_error(inp, up, args.chunk)
        _, grads = _run_ssd(inp, dict(chunk_size=args.chunk, **OPTS), "triton", up)
        err, (h,), got, exp = worst(grads["A"], ref["A"])
        others = {k: worst(grads[k], ref[k])[0] / budget[k] for k in grads if k != "A"}
        other = max(others, key=others.get)
        ratios.append(err / budget["A"])
        flag = "  **FAIL**" if err > budget["A"] else ""
        print(f"| {seed} | {err:.3e} | {float(model.abs().max()):.3e} | {budget['A']:.3e} | {ratios[-1]:.3f}{flag} "
              f"| {h}: {got:.5g} / {exp:.5g} | d{other} {others[other]:.2f} | {time.perf_counter() - t0:.1f} |",
              flush=True)
    r = sorted(ratios)
    print(f"\ndA err/budget over {len(r)} seeds: max {r[-1]:.3f}, median {r[len(r) // 2]:.3f}, "
          f"mean {sum(r) / len(r):.3f}, min {r[0]:.3f}, over budget {sum(x > 1 for x in r)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the kernels in Triton's interpreter")
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--chunk", type=int, default=256, help="chunk_size; seqlen is 2 chunk + 37 as in the test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=6, help="variants with seeds 1..SEEDS (no compiles)")
    p.add_argument("--sweep", type=int, metavar="K", help="only a table of dA against its budget for the K seeds "
                   "SEED .. SEED + K - 1 (before / after comparisons; CPU interpreter ~25 s a seed)")
    p.add_argument("--quick", action="store_true", help="only the variants marked quick (a CPU smoke run)")
    p.add_argument("--time-budget", type=float, help="seconds after which the remaining variants are skipped "
                   "(default 60 on cuda, none on cpu)")
    p.add_argument("--save-inputs", metavar="PATH", help="torch.save the case's inputs and upstream gradients")
    p.add_argument("--inputs", metavar="PATH", help="a --save-inputs file instead of drawing the case (e.g. the "
                   "GPU's values in the CPU interpreter); its shape and chunk override the options above")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("ssd_grad_probe.py: no CUDA device (use --device cpu with TRITON_INTERPRET=1)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("ssd_grad_probe.py: --device cpu needs TRITON_INTERPRET=1 in the environment")
    if args.time_budget is None:
        args.time_budget = 60.0 if args.device == "cuda" else math.inf
    import triton

    if args.sweep:
        print(f"# SSD grad probe, seed sweep: {args.device}, triton {triton.__version__}; batch {BATCH}, seqlen "
              f"{2 * args.chunk + 37}, {NHEADS} heads x headdim {args.headdim}, dstate {args.dstate}, chunk "
              f"{args.chunk}, bf16\n")
        return run_sweep(args)
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    if args.inputs:
        saved = torch.load(args.inputs)
        inp = {k: v.to(args.device) for k, v in saved["inp"].items()}
        upstream = [u.to(args.device) for u in saved["upstream"]]
        args.seed, args.chunk, origin = saved["seed"], saved["chunk"], f"{args.inputs} (drawn on {saved['device']})"
        args.headdim, args.dstate = inp["x"].shape[3], inp["B"].shape[3]
    else:
        inp, upstream = make_case(args.seed, args.headdim, args.dstate, 2 * args.chunk + 37, args.device)
        origin = f"seed {args.seed} on {args.device}"
    seqlen = inp["x"].shape[1]
    if args.save_inputs:
        torch.save(dict(inp={k: v.cpu() for k, v in inp.items()}, upstream=[u.cpu() for u in upstream],
                        seed=args.seed, chunk=args.chunk, device=name), args.save_inputs)
    print(f"# SSD grad probe: {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")
    print(f"case: batch {BATCH}, seqlen {seqlen}, {NHEADS} heads x headdim {args.headdim}, dstate {args.dstate}, "
          f"ngroups 1, chunk {args.chunk}, bf16, D, z, dt_bias, softplus, initial state; inputs: {origin}\n")
    print("## 1. Gradients: Triton bf16 against the float32 torch path (the test's check and budget)\n")
    ref, budget = yardstick(inp, upstream, args.chunk)
    base = dict(inp=inp, upstream=upstream, seed=args.seed, seqlen=seqlen, t_start=t_start)
    _, grads = _run_ssd(inp, dict(chunk_size=args.chunk, **OPTS), "triton", upstream)
    print_gradients(grads, ref, budget)

    print("\n## 2. Inside the backward: launches 1-8 against a float64 recomputation\n")
    T = ts.kernel_chunk(args.chunk, seqlen)
    dy, dfinal = upstream[0].contiguous(), upstream[1].float().contiguous()
    exact = reference_parts(inp, dy, dfinal, T)
    model = reference_parts(inp, dy, dfinal, T, rounded=frozenset(ROUNDINGS))
    tri = triton_parts(inp, dy, dfinal, T)
    print(f"checks: launches replayed here give the op's dA bit for bit: {torch.equal(tri['dA'], grads['A'])}; "
          f"float64 recomputation vs float32 torch path: dA {worst(exact['dA'], ref['A'])[0]:.2e}, "
          f"ddt {worst(exact['ddt'], ref['dt'])[0]:.2e} (scales {float(ref['A'].abs().max()):.3g}, "
          f"{float(ref['dt'].abs().max()):.3g})\n")
    print_intermediates(tri, exact)
    print()
    print_partials(tri, exact, model, seqlen)
    print()
    print_ablation(inp, dy, dfinal, T, exact, model)

    print("\n## 3. Sensitivity: dA of the Triton path under variants (budget: the variant's own yardstick, bf16)\n")
    base["yardstick"] = (ref, budget, model["dA"] - exact["dA"])
    run_variants(args, base)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
