"""`mambakit bench kernels`: the Mamba-1 scan and the Mamba-2 SSD against seqlen, forward and forward+backward,
beside causal SDPA attention of the same width and the PyTorch paths (the Mamba papers' Figure 8, left).

Implementations timed (rows of results.json, `impl`):
    mambakit      the op with its default backend (Triton on CUDA, the vectorised PyTorch path on CPU)
    pytorch       backend="torch" (CUDA only: on CPU it is the default already)
    reference     backend="reference", the sequential recurrence (short seqlens only: a Python loop over L)
    sdpa          F.scaled_dot_product_attention, causal, heads of 64 spanning the op's width (D for the scan,
                  H x P for the SSD): FlashAttention's kernel on CUDA where PyTorch picks it
    mamba_ssm, mambapy, fla    peers, when importable (else a note in results.json says why not)

Each row also holds the op's floor (floors.py: bytes at the copy ceiling, FLOPs at the matmul ceiling, both
measured here), the time as a fraction of it, the peak CUDA memory of forward+backward and the bytes autograd
saves for the backward. A variant that runs out of memory stops at that seqlen (noted) and the others go on.

Shapes (legend): b batch, L seqlen, D channels, N dstate, H heads, P headdim, G groups (1), E head dim (64).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..ops import selective_scan, ssd
from .floors import attention_flops_and_bytes, measure_ceilings, scan_flops_and_bytes, ssd_flops_and_bytes
from .timing import is_out_of_memory, median_ms, peak_memory_bytes, saved_bytes

OPS = ("mamba1_scan", "mamba2_ssd")


@dataclass
class KernelShapes:
    batch: int
    dim: int            # Mamba-1 channels D
    dstate1: int        # Mamba-1 N
    nheads: int         # Mamba-2 H
    headdim: int        # Mamba-2 P
    dstate2: int        # Mamba-2 N
    chunk: int          # SSD chunk size T
    seqlens: list[int]
    dtype: str
    reference_max_len: int  # the sequential reference only up to here
    attn_head_dim: int = 64
    repeats: int = 5


def kernel_shapes(device: torch.device, quick: bool) -> KernelShapes:
    """CUDA: the shapes of issue 18's table (scan dim 4096 N 16; SSD 64 x 64 heads, N 128; batch 2; bf16) over
    seqlen 512 ... 256K. CPU: the 130M model's widths (dim 1536; 24 x 64 heads) in float32, seqlen 256 ... 2048.
    Quick: tiny widths and seqlens, a seconds-long run of the whole pipeline."""
    if quick:
        return KernelShapes(batch=1, dim=32, dstate1=8, nheads=2, headdim=16, dstate2=16, chunk=16,
                            seqlens=[32, 64, 128], dtype="float32", reference_max_len=64, attn_head_dim=16, repeats=1)
    if device.type == "cuda":
        return KernelShapes(batch=2, dim=4096, dstate1=16, nheads=64, headdim=64, dstate2=128, chunk=256,
                            seqlens=[512, 2048, 8192, 32768, 131072, 262144], dtype="bfloat16",
                            reference_max_len=2048)
    return KernelShapes(batch=1, dim=1536, dstate1=16, nheads=24, headdim=64, dstate2=128, chunk=256,
                        seqlens=[256, 512, 1024, 2048], dtype="float32", reference_max_len=256, repeats=3)


# ---- inputs ------------------------------------------------------------------------------------------------


def scan_inputs(s: KernelShapes, L: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """selective_scan's arguments at (b, L, D) with N = dstate1, ngroups 1, z gating, D and dt_bias."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt_ = getattr(torch, s.dtype)
    b, D, N = s.batch, s.dim, s.dstate1

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=g) * scale

    return {"x": rnd(b, L, D).to(dt_), "dt": rnd(b, L, D, scale=0.5).to(dt_), "z": rnd(b, L, D).to(dt_),
            "A": -torch.exp(torch.rand(D, N, device=device, generator=g) * 2.8),
            "B": rnd(b, L, 1, N).to(dt_), "C": rnd(b, L, 1, N).to(dt_), "D": rnd(D),
            "dt_bias": torch.log(torch.expm1(torch.exp(torch.rand(D, device=device, generator=g) * 4.6 - 6.9)))}


def ssd_inputs(s: KernelShapes, L: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """ssd's arguments at (b, L, H, P) with N = dstate2, ngroups 1, D per head and dt_bias, no z."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt_ = getattr(torch, s.dtype)
    b, H, P, N = s.batch, s.nheads, s.headdim, s.dstate2

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=g) * scale

    return {"x": rnd(b, L, H, P).to(dt_), "dt": rnd(b, L, H, scale=0.5).to(dt_),
            "A": -(1 + 15 * torch.rand(H, device=device, generator=g)),
            "B": rnd(b, L, 1, N).to(dt_), "C": rnd(b, L, 1, N).to(dt_), "D": rnd(H),
            "dt_bias": torch.log(torch.expm1(torch.exp(torch.rand(H, device=device, generator=g) * 4.6 - 6.9)))}


def attention_inputs(b: int, L: int, width: int, head_dim: int, dtype: str,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """q, k, v (b, H, L, E) with H x E = width."""
    H = max(width // head_dim, 1)
    g = torch.Generator(device=device).manual_seed(0)
    return {k: torch.randn(b, H, L, head_dim, device=device, generator=g).to(getattr(torch, dtype)) for k in "qkv"}


SCAN_GRADS = ("x", "dt", "z", "A", "B", "C", "D", "dt_bias")
SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def _scan(backend: str | None) -> Callable[[dict], torch.Tensor]:
    return lambda i: selective_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                                    dt_softplus=True, backend=backend)


def _ssd(backend: str | None, chunk: int) -> Callable[[dict], torch.Tensor]:
    return lambda i: ssd(i["x"], i["dt"], i["A"], i["B"], i["C"], D=i["D"], dt_bias=i["dt_bias"], dt_softplus=True,
                         chunk_size=chunk, backend=backend)


def _sdpa(i: dict) -> torch.Tensor:
    return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=True)


# ---- peers: their layouts differ, so each gets its inputs converted once, outside the timed call ----------


def peer_notes(enabled: bool = True) -> dict[str, str | None]:
    """Each peer's status: None when it will be timed (importable), else the note results.json carries."""
    if not enabled:
        return {name: "skipped: peers turned off (--no-peers)" for name in ("mamba_ssm", "mambapy", "fla")}
    return {name: None if importlib.util.find_spec(module) is not None else f"skipped: {module} is not importable"
            for name, module in (("mamba_ssm", "mamba_ssm"), ("mambapy", "mambapy"), ("fla", "fla"))}


def _mamba_ssm_scan(i: dict) -> tuple[dict, Callable[[dict], torch.Tensor]]:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    # (b, D, L) channels-first layout; B, C as (b, G, N, L)
    conv = {"u": i["x"].transpose(1, 2).contiguous(), "delta": i["dt"].transpose(1, 2).contiguous(),
            "z": i["z"].transpose(1, 2).contiguous(), "A": i["A"], "D": i["D"], "delta_bias": i["dt_bias"],
            "B": i["B"].permute(0, 2, 3, 1).contiguous(), "C": i["C"].permute(0, 2, 3, 1).contiguous()}
    return conv, lambda c: selective_scan_fn(c["u"], c["delta"], c["A"], c["B"], c["C"], c["D"], z=c["z"],
                                             delta_bias=c["delta_bias"], delta_softplus=True)


def _mamba_ssm_ssd(chunk: int):
    def make(i: dict):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return dict(i), lambda c: mamba_chunk_scan_combined(c["x"], c["dt"], c["A"], c["B"], c["C"], chunk, D=c["D"],
                                                            dt_bias=c["dt_bias"], dt_softplus=True)
    return make


def _mambapy_scan(i: dict) -> tuple[dict, Callable[[dict], torch.Tensor]]:
    """mambapy's selective scan (its MambaBlock.selective_scan: materialised (b, L, D, N) terms, parallel pscan)
    with the same softplus(dt + dt_bias) and z gate around it."""
    from mambapy.pscan import pscan

    def call(c):
        delta = F.softplus(c["dt"] + c["dt_bias"])  # (b, L, D)
        deltaA = torch.exp(delta.unsqueeze(-1) * c["A"])  # (b, L, D, N)
        BX = delta.unsqueeze(-1) * c["B"][:, :, 0].unsqueeze(2) * c["x"].unsqueeze(-1)  # (b, L, D, N)
        hs = pscan(deltaA, BX)
        y = (hs @ c["C"][:, :, 0].unsqueeze(-1)).squeeze(3) + c["D"] * c["x"]
        return y * F.silu(c["z"])
    return dict(i), call


def _fla_ssd(i: dict) -> tuple[dict, Callable[[dict], torch.Tensor]]:
    """fla's simple GLA is the SSD without D: q = C, k = B (per head), v = dt' x, log-decay g = dt' A, scale 1."""
    from fla.ops.simple_gla import chunk_simple_gla

    def call(c):
        H = c["x"].shape[2]
        delta = F.softplus(c["dt"].float() + c["dt_bias"])  # (b, L, H)
        q = c["C"].expand(-1, -1, H, -1)
        k = c["B"].expand(-1, -1, H, -1)
        v = (c["x"] * delta[..., None]).to(c["x"].dtype)
        o, _ = chunk_simple_gla(q, k, v, g=delta * c["A"], scale=1.0)
        return o + c["D"][:, None] * c["x"]
    return dict(i), call


# ---- timing one variant --------------------------------------------------------------------------------


def time_variant(call: Callable[[dict], torch.Tensor], inputs: dict[str, torch.Tensor], grad_names: tuple[str, ...],
                 device: torch.device, repeats: int) -> dict:
    """fwd_ms (no grad), fwd_bwd_ms (torch.autograd.grad of every floating input named in grad_names), the peak
    CUDA memory of fwd+bwd (MB, None off CUDA) and the bytes autograd saves for the backward (MB)."""
    leaves = {k: v.detach().requires_grad_(k in grad_names and v.is_floating_point()) for k, v in inputs.items()}
    params = [v for v in leaves.values() if v.requires_grad]

    def fwd():
        with torch.no_grad():
            return call(inputs)

    dy = torch.randn_like(fwd())

    def fwd_bwd():
        return torch.autograd.grad(call(leaves), params, dy)

    row = {"fwd_ms": median_ms(fwd, device, repeats), "fwd_bwd_ms": median_ms(fwd_bwd, device, repeats)}
    peak = peak_memory_bytes(fwd_bwd, device)
    row["peak_mb"] = None if peak is None else peak / 2 ** 20
    row["saved_mb"] = saved_bytes(lambda: call(leaves)) / 2 ** 20
    return row


def run_kernels(device: torch.device, quick: bool, log: Callable[[str], None] = print, peers: bool = True) -> dict:
    """Time every op x implementation x seqlen; returns {"shapes", "ceilings", "rows", "notes"}."""
    s = kernel_shapes(device, quick)
    ceilings = measure_ceilings(device, getattr(torch, s.dtype), quick)
    log(f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s, matmul {ceilings.matmul_tflops:.3f} TFLOP/s ({ceilings.dtype})")
    peers = peer_notes(peers)
    notes = [f"{name}: {note}" for name, note in peers.items() if note]
    e = torch.finfo(getattr(torch, s.dtype)).bits // 8
    rows: list[dict] = []
    stopped: set[tuple[str, str]] = set()  # (op, impl) that ran out of memory: longer seqlens are skipped
    for op in OPS:
        width = s.dim if op == "mamba1_scan" else s.nheads * s.headdim
        for L in s.seqlens:
            if op == "mamba1_scan":
                inputs, grads = scan_inputs(s, L, device), SCAN_GRADS
                flops = scan_flops_and_bytes(s.batch, L, s.dim, s.dstate1, 1, e)
                variants = {"mambakit": _scan(None), "reference": _scan("reference")}
                if device.type == "cuda":
                    variants["pytorch"] = _scan("torch")
                peer_makers = {"mamba_ssm": _mamba_ssm_scan, "mambapy": _mambapy_scan}
            else:
                inputs, grads = ssd_inputs(s, L, device), SSD_GRADS
                flops = ssd_flops_and_bytes(s.batch, L, s.nheads, s.headdim, 1, s.dstate2, s.chunk, e)
                variants = {"mambakit": _ssd(None, s.chunk), "reference": _ssd("reference", s.chunk)}
                if device.type == "cuda":
                    variants["pytorch"] = _ssd("torch", s.chunk)
                peer_makers = {"mamba_ssm": _mamba_ssm_ssd(s.chunk), "fla": _fla_ssd}
            attn = attention_inputs(s.batch, L, width, s.attn_head_dim, s.dtype, device)
            H = attn["q"].shape[1]
            todo: list[tuple[str, Callable, dict, tuple, tuple]] = [
                (impl, fn, inputs, grads, flops) for impl, fn in variants.items()
                if impl != "reference" or L <= s.reference_max_len]
            todo.append(("sdpa", _sdpa, attn, ("q", "k", "v"),
                         attention_flops_and_bytes(s.batch, L, H, s.attn_head_dim, e)))
            for impl, make in peer_makers.items():
                if peers[impl] is None and (impl != "mambapy" or L <= 4096):  # mambapy holds (b, L, D, N) terms
                    try:
                        peer_inputs, call = make(inputs)
                    except Exception as err:  # a peer's API that moved: noted, never fatal to the benchmark
                        notes.append(f"{impl} ({op}): {type(err).__name__}: {err}")
                        peers[impl] = "failed"
                        continue
                    todo.append((impl, call, peer_inputs, tuple(peer_inputs), flops))
            for impl, call, inp, names, (f_fwd, f_fb, b_fwd, b_fb) in todo:
                if (op, impl) in stopped:
                    continue
                try:
                    row = time_variant(call, inp, names, device, s.repeats)
                except Exception as err:
                    if not is_out_of_memory(err) and impl in ("mambakit", "pytorch", "reference", "sdpa"):
                        raise  # our own ops and PyTorch's must run: a failure here is a bug, not a note
                    stopped.add((op, impl))
                    notes.append(f"{impl} ({op}) stopped at seqlen {L}: {type(err).__name__}: {str(err)[:200]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                row.update(op=op, impl=impl, seqlen=L,
                           fwd_floor_ms=ceilings.floor_ms(f_fwd, b_fwd), fwd_bwd_floor_ms=ceilings.floor_ms(f_fb, b_fb))
                row["fwd_floor_fraction"] = row["fwd_floor_ms"] / row["fwd_ms"]
                row["fwd_bwd_floor_fraction"] = row["fwd_bwd_floor_ms"] / row["fwd_bwd_ms"]
                rows.append(row)
                log(f"{op:12s} {impl:10s} L={L:<7d} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwd_bwd_ms']:9.3f} ms  "
                    f"floor fraction {row['fwd_floor_fraction']:.3f} / {row['fwd_bwd_floor_fraction']:.3f}")
            del inputs, attn
    return {"shapes": asdict(s), "ceilings": asdict(ceilings), "rows": rows, "notes": notes}


def plot_kernels(result: dict, out_dir, device_name: str) -> list[str]:
    """kernels_time.png (time vs seqlen, fwd and fwd+bwd, per op), kernels_floor.png (floor fraction),
    kernels_memory.png (peak CUDA memory, or autograd's saved bytes off CUDA). Returns the file names."""
    from .report import line_panels

    rows = result["rows"]
    names = []
    for fname, keys, ylabel, logy in [
        ("kernels_time.png", ("fwd_ms", "fwd_bwd_ms"), "time (ms)", True),
        ("kernels_floor.png", ("fwd_floor_fraction", "fwd_bwd_floor_fraction"), "floor / time", True),
        ("kernels_memory.png", ("peak_mb" if any(r["peak_mb"] is not None for r in rows) else "saved_mb",),
         "MB", True),
    ]:
        def part(key: str) -> str:
            return "forward+backward" if key.startswith("fwd_bwd") else "forward" if key.startswith("fwd") else ""

        panels = [(f"{op} {part(key)}", [r for r in rows if r["op"] == op], key) for op in OPS for key in keys]
        line_panels(out_dir / fname, panels, x="seqlen", series="impl", ylabel=ylabel, logy=logy,
                    title=f"mambakit bench kernels ({device_name})", ncols=len(keys))
        names.append(fname)
    return names
