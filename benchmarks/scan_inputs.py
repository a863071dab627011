"""The Mamba-1 scan's benchmark inputs, shared by the GPU scan scripts (`gpu_selective_scan.py`, `gpu_scan_ncu.py`,
`gpu_scan_fwd_ab.py`). Torch only: `gpu_scan_fwd_ab.py` runs it under source trees of any age.

x, dt, z: (batch, seqlen, dim) bf16; B, C: (batch, seqlen, 1, dstate) bf16; A: (dim, dstate) float32 in
[-e^2.8, -1]; D: (dim,) float32; dt_bias: (dim,) float32 with softplus(dt_bias) log-uniform in [1e-3, 0.1], as
Mamba initialises it.
"""

from __future__ import annotations

import torch

GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]


def make_inputs(batch: int, seqlen: int, dim: int, dstate: int, seed: int = 0, device: str = "cuda",
                requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """The inputs above from a seeded generator on `device`; with requires_grad, those in GRAD_NAMES are leaves
    that require it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bf = torch.bfloat16

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=gen) * scale

    inp = {
        "x": rnd(batch, seqlen, dim).to(bf),
        "dt": rnd(batch, seqlen, dim, scale=0.5).to(bf),
        "A": -torch.exp(torch.rand(dim, dstate, device=device, generator=gen) * 2.8),
        "B": rnd(batch, seqlen, 1, dstate).to(bf),
        "C": rnd(batch, seqlen, 1, dstate).to(bf),
        "D": rnd(dim),
        "z": rnd(batch, seqlen, dim).to(bf),
        "dt_bias": torch.log(torch.expm1(torch.exp(torch.rand(dim, device=device, generator=gen) * 4.6 - 6.9))),
    }
    if requires_grad:
        inp = {k: v.requires_grad_(k in GRAD_NAMES) for k, v in inp.items()}
    return inp
