"""Int8 weight-only linear layers for inference: `Int8Linear` and `quantize_weights(model)`.

Shapes (legend): N out_features, K in_features, R rows (every leading dimension of the input flattened).

    scale_N = max_k |W_NK| / 127                   per output channel, symmetric (no zero point)
    q_NK = round(W_NK / scale_N)  in [-127, 127]   int8
    y_RN = (x_RK @ q_NK^T) * scale_N + bias_N

Why weight-only: a decode step multiplies one row per sequence by every weight matrix once, so its time is
the time to read the weights (0.52 GB a token for the 130M shape in float32); int8 weights read a quarter of
that. Activations stay in floating point.

On CPU the product is `torch._weight_int8pack_mm`, PyTorch's own int8 weight-only kernel. Its fast path takes
bfloat16 activations (with float32 or float16 inputs it ran 3-6x slower than even the float32 matmul on
the AVX-512 machine of BENCHMARKS.md), so the input is rounded to bfloat16 for the product and the output
returned in the input's dtype. That kernel also needs in_features to be a multiple of 16 (torch 2.13 CPU: other
sizes crash the process or return garbage), so a layer of another width, and any layer off the CPU (CUDA),
dequantizes its weight into the matmul instead, `F.linear(x, q.to(dtype)) * scale`. Inference only: neither
path has a backward.

A quantized layer is not a plain `nn.Linear`, so the fused mixer paths call it as a module
(`modules/fusion.py`) instead of reading its weight: quantizing changes what is computed, never what is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8",)
PACKED_K_MULTIPLE = 16  # torch._weight_int8pack_mm on CPU reads in_features in blocks of 16 (see the docstring)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight (N, K) float -> (q (N, K) int8, scale (N,) float32).

    Example:
        >>> q, scale = quantize_int8(torch.randn(64, 32))
        >>> (q.float() * scale[:, None]).shape
        torch.Size([64, 32])
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8: weight must be a floating-point (out_features, in_features) tensor, got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    w = weight.detach().float()
    # an all-zero row would divide by zero: any positive scale represents it exactly
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and a float32 scale per output channel (inference only).

    forward(x (..., in_features)) -> (..., out_features) in x's dtype. Build it from a trained layer with
    `Int8Linear.from_linear(linear)`; `.weight` gives the (N, K) weight it multiplies by, dequantized.

    Example:
        >>> layer = Int8Linear.from_linear(nn.Linear(768, 1536))
        >>> layer(torch.randn(2, 5, 768)).shape
        torch.Size([2, 5, 1536])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        # the CPU kernel wants its scales in the activations' dtype (bfloat16); kept beside the float32 ones
        self.register_buffer("_scale_bf16", torch.ones(out_features, dtype=torch.bfloat16, device=device),
                             persistent=False)
        # the dtype of the float layer it replaces (activations, caches): an empty buffer, so model.to(dtype) moves it
        self.register_buffer("_float_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The int8 copy of `linear` (its weight is read, not kept: a tied weight stays with its other owner)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Int8Linear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        q, scale = quantize_int8(linear.weight)
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device,
                  dtype=linear.weight.dtype)
        out.weight_int8.copy_(q)
        out.scale.copy_(scale)
        out._scale_bf16.copy_(scale)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._scale_bf16.copy_(self.scale)  # derived from the stored float32 scales

    @property
    def weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight this layer multiplies by, dequantized into a new tensor of the
        replaced layer's dtype and device: what code that asks an nn.Linear for its weight's device or dtype (cache
        allocation) reads. Not for hot paths: every access builds it."""
        return (self.weight_int8.to(torch.float32) * self.scale.float()[:, None]).to(self._float_dtype.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: x must be (..., {self.in_features}), got {tuple(x.shape)}")
        x_RK = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and self.in_features % PACKED_K_MULTIPLE == 0:
            y_RN = torch._weight_int8pack_mm(x_RK.to(torch.bfloat16).contiguous(), self.weight_int8, self._scale_bf16)
        else:
            y_RN = F.linear(x_RK, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        y_RN = y_RN.to(x.dtype)
        if self.bias is not None:
            y_RN = y_RN + self.bias.to(x.dtype)
        return y_RN.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_weights(model: nn.Module, scheme: str = "int8", *, skip: Iterable[str] = ()) -> nn.Module:
    """Replace every plain `nn.Linear` of `model` by its `Int8Linear` copy, in place; returns `model`.

    `skip` names submodules to leave in floating point (their qualified names, e.g. "lm_head"). A tied LM head
    gets its own int8 copy while the embedding keeps the float weight (a lookup reads one row a token, so
    quantizing it would save no time). The model is for inference afterwards: the int8 layers have no backward.
    Embeddings, norms, the convolutions and the SSM parameters (A_log, D, dt_bias) stay as they are.

    Example:
        >>> from mambakit import MambaConfig, MambaLM
        >>> lm = quantize_weights(MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256)).eval())
        >>> lm.generate([[1, 2, 3]], max_new_tokens=8)           # greedy, int8 weights
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_weights: scheme must be one of {SCHEMES}, got {scheme!r}")
    skip = set(skip)
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(skip - names)
    if unknown:
        raise ValueError(f"quantize_weights: skip names {unknown} are not submodules of the model")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name and name not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear))
    return model
