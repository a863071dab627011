"""Reference RMSNorm, plain and gated (Mamba-2's norm(y * silu(z)), Dao & Gu 2024, Section 7.3).

    rms_norm(x)            = x / sqrt(mean(x^2) + eps) * weight
    gated, default         = rms_norm(x * silu(z))           (norm_before_gate=False)
    gated, norm first      = rms_norm(x) * silu(z)           (norm_before_gate=True)

With group_size, the mean runs over consecutive groups of that many channels (one per SSD group),
so the layer behaves the same under tensor parallelism. Computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x, weight, eps=1e-5, z=None, group_size=None, norm_before_gate=False):
    """x, z: (..., hidden); weight: (hidden,); returns x's dtype."""
    f64 = torch.float64
    h = x.to(f64)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(f64))
    hidden = h.shape[-1]
    g = hidden if group_size is None else group_size
    hg = h.reshape(*h.shape[:-1], hidden // g, g)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    out = hg.reshape(h.shape) * weight.to(f64)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(f64))
    return out.to(x.dtype)
