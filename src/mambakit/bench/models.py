"""The models `mambakit bench generate|train|quantize` compare: Mamba-1, Mamba-2 and a same-size Transformer.

The Transformer is `models.TransformerLM` in its "transformer++" recipe: pre-norm RMSNorm, rotary positions,
SwiGLU MLP, SDPA attention with a KV cache, no biases, tied embeddings; heads of 64. Half as many layers as
the Mamba models, each of about twice a Mamba layer's parameters (attention 4 d^2 + MLP 3 d (8d/3) = 12 d^2
against a Mamba layer's ~6 d^2), so the sizes match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models import MambaConfig, MambaLM, TransformerConfig
from ..models import build_model as build_lm

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


def model_config(name: str, shape: ModelShape) -> MambaConfig | TransformerConfig:
    if name == "mamba1":
        return MambaConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                           ssm_cfg={"layer": "Mamba1"})
    if name == "mamba2":
        return MambaConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                           ssm_cfg={"layer": "Mamba2", **shape.mamba2})
    if name == "transformer":
        return TransformerConfig(arch="transformer++", d_model=shape.d_model, n_layer=max(1, shape.n_layer // 2),
                                 vocab_size=shape.vocab_size, num_heads=max(1, shape.d_model // 64))
    raise ValueError(f"bench: model must be one of {MODELS}, got {name!r}")


def build_model(name: str, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> MambaLM:
    torch.manual_seed(0)
    return build_lm(model_config(name, shape), device=device, dtype=dtype).eval()


def n_params(model: torch.nn.Module) -> int:
    """Parameters counted once (a tied head is the embedding)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
