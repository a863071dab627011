"""Mamba-2's mixer after in_proj as one op: conv over x‖B‖C -> SSD -> gated RMSNorm -> out_proj.

Shapes (legend): b batch, L seqlen, M d_model, S d_ssm = H P, H nheads, P headdim, G ngroups, N d_state,
K = S + 2 G N conv channels, E = 2 S + 2 G N + H in_proj width, W d_conv, T chunk, c = ceil(L / T).

    (z, xBC, dt) = zxbcdt                          (b, L, S), (b, L, K), (b, L, H)
    xBC = silu(causal_conv1d(xBC))                 then split into x (b, L, H, P), B, C (b, L, G, N)
    y = ssd(x, dt, A, B, C, D, dt_bias, softplus, dt_limit)     (gated by silu(z) inside when there is no norm)
    y = rms_norm(y, norm.weight, z = z, norm.group_size, norm.norm_before_gate)     norm: one GatedNormSpec
    out = y @ out_proj_weight^T + out_proj_bias    (b, L, M)

Why one op: composed of the separate ops, a layer keeps for its backward in_proj's output (views of it),
the conv output xBC, the SSD's dt', cumsum, C B^T and chunk states, y, and the norm's output. The conv
output, the SSD intermediates and the norm output are cheap to make again from in_proj's output, so the
"triton" backend keeps in_proj's output, y before the norm and the parameters, and runs the conv, the
three cheap SSD launches and the norm forward again in its backward (mamba_ssm's
`mamba_split_conv1d_scan_combined` does the same). Per token, bf16, at d_model 768 (S 1536, G 1, N 128,
H 24, T 256), what each saved tensor costs and what it would cost to keep the recomputed ones:

    kept         zxbcdt  E x 2 = 6704 B     y  S x 2 = 3072 B     (rstd 4 B: recomputed with the norm output)
    recomputed   xBC     K x 2 = 3584 B     dt', cs  2 H x 4 = 192 B     C B^T  G T x 4 = 1024 B
                 states  S N x 2 / T = 1536 B     norm output  S x 2 = 3072 B

so about 9.8 kB per token instead of about 19 kB. y is kept, not recomputed: it is the expensive
launch (chunk_scan_fwd, the diagonal blocks' (T, T) x (T, P) matmuls for every head), while the three
recomputed SSD launches read x, B, C, dt once (dt' / cs: one pass over dt; C B^T: G T N per token;
chunk states: one pass over x and B). Without the norm, the SSD's y before its z gate (float32, as
the separate SSD keeps it: dz needs it unrounded) is kept instead, and the gated output that
out_proj saw is y_pre * silu(z) again.

The "torch" and "reference" backends compose the public ops (autograd through them): the same math,
the ground truth of the tests, and the CPU path. Only d_mlp = 0 layers (in_proj = [z, xBC, dt]) take
this op; Mamba2 modules with an MLP half keep the composed path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..causal_conv1d import causal_conv1d
from ..checks import ShapeChecker
from ..common import autocast_dtype
from ..dispatch import implementation
from ..rms_norm import GatedNormSpec
from ..ssd import ssd

__all__ = ["mamba2_inner"]


def _views(zxbcdt: torch.Tensor, xBC: torch.Tensor | None, H: int, P: int, G: int, N: int):
    """z (b, L, S), xBC_in (b, L, K), dt (b, L, H) of zxbcdt, and x (b, L, H, P), B, C (b, L, G, N) of the
    conv output: all views (the launchers take any strides with a contiguous last dim)."""
    S, K = H * P, H * P + 2 * G * N
    z, xBC_in, dt = zxbcdt[..., :S], zxbcdt[..., S:S + K], zxbcdt[..., S + K:]
    if xBC is None:
        return z, xBC_in, dt
    x = xBC[..., :S].unflatten(-1, (H, P))
    B = xBC[..., S:S + G * N].unflatten(-1, (G, N))
    C = xBC[..., S + G * N:].unflatten(-1, (G, N))
    return z, xBC_in, dt, x, B, C


# ----------------------------------------------------------------------------------------------
# torch / reference: the public ops in a row
# ----------------------------------------------------------------------------------------------


def mamba2_inner_composed(*, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm: GatedNormSpec | None,
                          out_proj_weight, out_proj_bias, dims, chunk_size, dt_limit, seq_idx,
                          backend: str) -> torch.Tensor:
    """The op as the public ops in a row on `backend` (autograd through each): the module's unfused math."""
    H, P, G, N = dims
    S = H * P
    batch, seqlen, _ = zxbcdt.shape
    # split, not slices: autograd joins split's gradients in one cat, where each slice's backward would zero a
    # tensor of zxbcdt's full size and add it (three times; 10% of a CPU training step of the README's model)
    z, xBC, dt = torch.split(zxbcdt, [S, S + 2 * G * N, H], dim=-1)
    xBC = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx, backend=backend)
    x, B, C = torch.split(xBC, [S, G * N, G * N], dim=-1)
    y = ssd(x.reshape(batch, seqlen, H, P), dt, A, B.reshape(batch, seqlen, G, N), C.reshape(batch, seqlen, G, N),
            D=D, z=None if norm is not None else z.reshape(batch, seqlen, H, P), dt_bias=dt_bias,
            dt_softplus=True, dt_limit=dt_limit, chunk_size=chunk_size, seq_idx=seq_idx, backend=backend)
    y = y.reshape(batch, seqlen, S)
    if norm is not None:
        y = norm(y, z=z, backend=backend)
    return F.linear(y, out_proj_weight, out_proj_bias)


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------


def mamba2_inner(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None,
    norm: GatedNormSpec | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None = None,
    *,
    headdim: int,
    ngroups: int,
    d_state: int,
    chunk_size: int = 256,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Conv, SSD, gated RMSNorm and out_proj of a Mamba-2 layer, from in_proj's output.

    Only layers without an MLP half (d_mlp = 0, i.e. d_ssm = d_inner) fit this layout; `Mamba2` keeps the
    composed ops otherwise. The math is the module's: dt' = clamp(softplus(dt + dt_bias), *dt_limit).

    Args:
        zxbcdt: (batch, seqlen, 2 * d_ssm + 2 * ngroups * d_state + nheads) in_proj's output, laid out
            [z (d_ssm) | x (d_ssm) | B (ngroups * d_state) | C (ngroups * d_state) | dt (nheads)].
        conv_weight: (d_ssm + 2 * ngroups * d_state, width) depthwise conv taps over x‖B‖C (Conv1d weight
            squeezed); conv_bias: (same channels,) or None.
        dt_bias: (nheads,) or None.   A: (nheads,) float32 (= -exp(A_log)).   D: (nheads,), (nheads, headdim)
            or None.
        norm: the gated RMSNorm as one `GatedNormSpec` (weight (d_ssm,), eps, group_size dividing d_ssm or
            None for one group, norm_before_gate: norm(y) * silu(z) instead of norm(y * silu(z)));
            `RMSNormGated.spec()` makes it from the module. None means no norm: z then gates the SSD
            output (y * silu(z)), as `Mamba2(rmsnorm=False)`.
        out_proj_weight: (d_model, d_ssm).   out_proj_bias: (d_model,) or None.
        headdim, ngroups, d_state: nheads = A's length, d_ssm = nheads * headdim; ngroups divides nheads.
        chunk_size: the SSD's block length (the result does not depend on it beyond rounding).
        dt_limit: (low, high) clamp of dt'.
        seq_idx: (batch, seqlen) int, nondecreasing: packed documents (conv window and state restart).
        backend: None (Triton on CUDA, PyTorch otherwise), "reference", "torch" or "triton". "triton" is
            one autograd node that keeps zxbcdt and the SSD output only (see the file's docstring);
            the others compose the public ops.
    Returns:
        out: (batch, seqlen, d_model), out_proj's output.

    Example:
        >>> layer = Mamba2(d_model=256, headdim=32, d_state=64)
        >>> out = mamba2_inner(layer.in_proj(u), layer.conv1d.weight[:, 0], layer.conv1d.bias,
        ...                    layer.dt_bias, -torch.exp(layer.A_log.float()), layer.D, layer.norm.spec(),
        ...                    layer.out_proj.weight, headdim=32, ngroups=1, d_state=64)   # (B, L, 256)
    """
    chk = ShapeChecker("mamba2_inner")
    for name, value in (("headdim", headdim), ("ngroups", ngroups), ("d_state", d_state)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"mamba2_inner: {name} must be a positive int, got {value!r}")
    chk.tensor("A", A, ("nheads",), dtypes=(torch.float32, torch.float64))
    H, P, G, N = chk.size("nheads"), headdim, ngroups, d_state
    if H % G:
        raise ValueError(f"mamba2_inner: ngroups={G} must divide nheads={H} (A's length)")
    chk.sizes.update(d_ssm=H * P, conv_dim=H * P + 2 * G * N, d_in_proj=2 * H * P + 2 * G * N + H)
    if isinstance(zxbcdt, torch.Tensor) and zxbcdt.dim() == 3 and zxbcdt.shape[-1] != chk.size("d_in_proj"):
        chk.fail("zxbcdt", f"must be (batch, seqlen, d_in_proj={chk.size('d_in_proj')}) = [z | x | B | C | dt] with "
                           f"d_ssm = nheads * headdim = {H * P}, ngroups * d_state = {G * N}, nheads = {H} "
                           f"(d_mlp = 0 layers only), got {tuple(zxbcdt.shape)}")
    chk.tensor("zxbcdt", zxbcdt, ("batch", "seqlen", "d_in_proj"))
    chk.tensor("conv_weight", conv_weight, ("conv_dim", "width"))
    if chk.size("width") < 2:
        raise ValueError(f"mamba2_inner: conv_weight must have width >= 2, got shape {tuple(conv_weight.shape)}")
    chk.tensor("conv_bias", conv_bias, ("conv_dim",), optional=True)
    chk.tensor("dt_bias", dt_bias, ("nheads",), optional=True)
    if isinstance(D, torch.Tensor) and D.dim() == 2:
        chk.sizes["headdim"] = P
        chk.tensor("D", D, ("nheads", "headdim"))
    else:
        chk.tensor("D", D, ("nheads",), optional=True)
    if norm is not None and not isinstance(norm, GatedNormSpec):
        raise ValueError(f"mamba2_inner: norm must be a GatedNormSpec or None, got {type(norm).__name__}")
    chk.tensor("norm.weight", None if norm is None else norm.weight, ("d_ssm",), optional=True)
    chk.tensor("out_proj_weight", out_proj_weight, ("d_model", "d_ssm"))
    chk.tensor("out_proj_bias", out_proj_bias, ("d_model",), optional=True)
    chk.seq_idx(seq_idx)
    S = H * P
    if norm is not None and S % norm.group:
        raise ValueError(f"mamba2_inner: norm.group_size={norm.group_size} must divide d_ssm={S}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"mamba2_inner: chunk_size must be a positive int, got {chunk_size!r}")
    if len(dt_limit) != 2 or not (0.0 <= dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"mamba2_inner: dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit}")
    name, fn = implementation("mamba2_inner", backend, zxbcdt.device, empty=zxbcdt.shape[1] == 0)
    args = dict(zxbcdt=zxbcdt, conv_weight=conv_weight, conv_bias=conv_bias, dt_bias=dt_bias, A=A, D=D,
                norm=norm, out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias,
                dims=(H, P, G, N), chunk_size=chunk_size, dt_limit=tuple(dt_limit), seq_idx=seq_idx)
    if name == "triton":
        amp = autocast_dtype(zxbcdt.device)
        if amp is None:
            return fn(**args)
        # under autocast, out_proj runs in the autocast dtype as nn.Linear would (differentiable casts: the
        # weight's gradient comes back in its own dtype); conv, SSD and norm take their parameters as they are
        with torch.autocast(zxbcdt.device.type, enabled=False):
            return fn(**{**args, "zxbcdt": zxbcdt.to(amp), "out_proj_weight": out_proj_weight.to(amp),
                                          "out_proj_bias": None if out_proj_bias is None else out_proj_bias.to(amp)})
    return fn(**args, backend=name)
