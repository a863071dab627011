"""The models `mambakit bench generate|train|quantize` compare: Mamba-1, Mamba-2 and a same-size Transformer.

The Transformer is a MambaLM whose every layer is attention (mamba_ssm's hybrid config: `attn_layer_idx` over
all layers) followed by a gated MLP: pre-norm RMSNorm, rotary positions, SwiGLU, SDPA attention with a KV cache,
tied embeddings (Transformer++). Half as many layers as the Mamba models, each of about twice a Mamba layer's
parameters (attention 4 d^2 + MLP 3 d (8d/3) = 12 d^2 against a Mamba layer's ~6 d^2), so the sizes match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models import MambaConfig, MambaLM

MODELS = ("mamba1", "mamba2", "transformer")


@dataclass
class ModelShape:
    d_model: int
    n_layer: int
    vocab_size: int
    mamba2: dict = field(default_factory=dict)  # Mamba-2 mixer arguments beyond the defaults

    @property
    def name(self) -> str:
        return f"d_model {self.d_model}, {self.n_layer} layers, vocab {self.vocab_size}"


def model_shape(quick: bool) -> ModelShape:
    """The 130M checkpoints' shape (d_model 768, 24 layers, the GPT-NeoX vocabulary); quick: a tiny byte model."""
    if quick:
        return ModelShape(d_model=64, n_layer=2, vocab_size=256,
                          mamba2={"d_state": 16, "headdim": 16, "chunk_size": 16})
    return ModelShape(d_model=768, n_layer=24, vocab_size=50277)


def model_config(name: str, shape: ModelShape) -> MambaConfig:
    if name == "mamba1":
        return MambaConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                           ssm_cfg={"layer": "Mamba1"})
    if name == "mamba2":
        return MambaConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                           ssm_cfg={"layer": "Mamba2", **shape.mamba2})
    if name == "transformer":
        head_dim = min(64, shape.d_model)
        n_layer = max(1, shape.n_layer // 2)
        return MambaConfig(d_model=shape.d_model, n_layer=n_layer, vocab_size=shape.vocab_size,
                           d_intermediate=math.ceil(8 * shape.d_model / 3), attn_layer_idx=list(range(n_layer)),
                           attn_cfg={"num_heads": shape.d_model // head_dim, "rotary_emb_dim": head_dim,
                                     "qkv_proj_bias": False, "out_proj_bias": False})
    raise ValueError(f"bench: model must be one of {MODELS}, got {name!r}")


def build_model(name: str, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> MambaLM:
    torch.manual_seed(0)
    return MambaLM(model_config(name, shape), device=device, dtype=dtype).eval()


def n_params(model: torch.nn.Module) -> int:
    """Parameters counted once (a tied head is the embedding)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
