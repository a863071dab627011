"""What an op cannot beat on this device: the copy and matmul ceilings, measured in-process, and each op's
bytes and FLOPs.

    floor = max(bytes / copy ceiling, FLOPs / matmul ceiling)       (seconds)
    floor_fraction = floor / measured time                          (1.0: at the floor; 0.1: 10x above it)

Bytes are what any implementation must move: inputs read and outputs written once, in their dtypes. FLOPs are
the op's arithmetic counted at the matmul ceiling, which only the SSD's and attention's matmuls can reach:
for the Mamba-1 scan (element-wise multiply-adds and exponentials) the FLOP floor is a loose lower bound and
the byte floor is the one that binds. The ceilings are measured by `measure_ceilings` in the same process as
the ops, so a floor is comparable with a time measured beside it (a busy CPU lowers both).

Shapes (legend): b batch, L seqlen, D channels (Mamba-1), N dstate, H heads, P headdim, G groups, T chunk,
E attention head dim, e bytes per element of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .timing import median_ms, time_interleaved


def best_ms(fn, device: torch.device, repeats: int = 5) -> float:
    """A ceiling is a best case: do_bench's median on CUDA, the fastest of `repeats` calls on a (shared) CPU."""
    if device.type == "cuda":
        return median_ms(fn, device)
    return min(time_interleaved({"fn": fn}, repeats, warmup=1)["fn"]) * 1e3


@dataclass
class Ceilings:
    """Measured ceilings: copy_gbps (bytes read + written per second, 1e9) and matmul_tflops (dtype's FLOPs)."""

    copy_gbps: float
    matmul_tflops: float
    dtype: str

    def floor_ms(self, flops: float, nbytes: float) -> float:
        return max(nbytes / (self.copy_gbps * 1e9), flops / (self.matmul_tflops * 1e12)) * 1e3


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Ceilings:
    """Copy ceiling: a copy into a preallocated buffer (256 MB on CUDA, 64 MB on CPU: beyond the caches);
    matmul ceiling: a square matmul in `dtype` (8192 on CUDA, 1024 on CPU). Quick: small sizes, seconds."""
    cuda = device.type == "cuda"
    numel = (8 if quick else 64 if cuda else 16) * 2 ** 20 // 4 * (4 if cuda else 1)  # float32 elements
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_ms = best_ms(lambda: dst.copy_(src), device)
    n = 256 if quick else 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = best_ms(lambda: a @ b, device)
    return Ceilings(copy_gbps=2 * src.nbytes / (copy_ms * 1e-3) / 1e9,
                    matmul_tflops=2 * n ** 3 / (mm_ms * 1e-3) / 1e12, dtype=str(dtype).removeprefix("torch."))


def scan_flops_and_bytes(b: int, L: int, D: int, N: int, G: int, e: int) -> tuple[float, float, float, float]:
    """Mamba-1 selective scan with z gating: (fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes).

    Per (b, l, d, n) the forward does dt*A, exp, dt*B*x, the state update and C*h: 8 FLOPs; the backward
    about twice that. Forward I/O: x, dt, z, B, C in, y out; the backward reads them again with dy and writes
    dx, ddt, dz, dB, dC.
    """
    fwd = 8.0 * b * L * D * N
    io_fwd = e * (4 * b * L * D + 2 * b * L * G * N)
    io_bwd = io_fwd + e * (7 * b * L * D + 4 * b * L * G * N)
    return fwd, 3 * fwd, io_fwd, io_bwd


def ssd_flops_and_bytes(b: int, L: int, H: int, P: int, G: int, N: int, T: int,
                        e: int) -> tuple[float, float, float, float]:
    """Mamba-2 SSD, chunked: matmul FLOPs (dense T x T diagonal blocks, C B^T once per group) and minimal bytes:
    (fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes)."""
    nc = math.ceil(L / T)
    fwd = b * nc * (G * 2 * T * T * N + H * (2 * T * T * P + 2 * 2 * T * P * N))
    # backward: dC, dB from dCB (per group); per head dXd_diag, dCB, and four (T x P x N) products
    bwd = b * nc * (G * 2 * 2 * T * T * N + H * (2 * 2 * T * T * P + 4 * 2 * T * P * N))
    io_fwd = e * (2 * b * L * H * P + b * L * H + 2 * b * L * G * N)  # x, dt, B, C in; y out
    # backward adds dy, x, dt, B, C in and dx, ddt, dB, dC out
    io_bwd = io_fwd + e * (3 * b * L * H * P + 2 * b * L * H + 4 * b * L * G * N)
    return float(fwd), float(fwd + bwd), float(io_fwd), float(io_bwd)


def attention_flops_and_bytes(b: int, L: int, H: int, E: int, e: int) -> tuple[float, float, float, float]:
    """Causal attention (FlashAttention's count: QK^T and PV, half of the L x L square; the backward 2.5x the
    forward): (fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes). I/O: q, k, v in, o out; the backward reads
    q, k, v, o, do and writes dq, dk, dv."""
    fwd = 2.0 * b * H * L * L * E
    io = e * b * L * H * E
    return fwd, 3.5 * fwd, 4 * io, 12 * io
