"""Transformer baselines of the Mamba paper's scaling laws (Gu & Dao 2023, Section 4.2.1, Figure 4).

Two recipes, one model class:

    "transformer++"  rotary positions (RoFormer), SwiGLU MLP, RMSNorm, no linear biases: the strong modern
                     recipe (PaLM, LLaMA) that the paper calls Transformer++ (it also trains at a higher
                     learning rate: that is a training setting, see reproduce/lm_scaling.py)
    "gpt3"           learned absolute positions, GELU MLP of 4 d_model, LayerNorm, biases: the GPT-3 recipe

Shapes (legend): B batch, L seqlen (new tokens), M d_model, F MLP hidden, V padded vocab.

    input_ids (B, L) -> embedding (B, L, M) [+ learned position embedding, gpt3]
                     -> n_layer x Block(norm -> MHA -> norm2 -> MLP) -> norm_f -> lm_head -> logits (B, L, V)

The layers are mambakit's own: `modules.MHA` (causal SDPA, rotary, grouped-query heads, the KV cache
`KVState`), `modules.GatedMLP` (SwiGLU), `modules.RMSNorm`, `modules.Block` (pre-norm, fp32 residual), so the
model shares everything above it with `MambaLM`: `TransformerLM` is a `MambaLM` whose backbone is built from a
`TransformerConfig`. Its forward takes the same (input_ids, cache, seq_idx, logits_to_keep); `allocate_cache`
gives one `KVState` per layer, so `generate`, `prefill` (ragged batches through seq_idx: each row's positions
count from its first real token) and the trainer run it unchanged; `save_pretrained` writes the "mambakit"
format (config.json holds the `arch` field that tells the two configs apart) and `from_pretrained` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import MHA, Block, GatedMLP, RMSNorm
from ..modules.attention import document_positions
from ..modules.block import add_and_norm
from ..modules.state import InferenceCache
from .config import MambaConfig
from .mamba_lm import MambaLM

__all__ = ["ARCHS", "GeluMLP", "TransformerConfig", "TransformerBackbone", "TransformerLM", "build_model",
           "config_from_dict", "is_transformer_config"]

ARCHS = ("transformer++", "gpt3")


class GeluMLP(nn.Module):
    """GPT-3's MLP: fc2(gelu(fc1(x))).   x: (..., in_features) -> (..., in_features); hidden F, biases optional.

    The names fc1 / fc2 are those of GatedMLP, so the model's initialisation rescales fc2 alike.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # GPT-2/3's tanh approximation


@dataclass
class TransformerConfig:
    """Architecture of a Transformer language model (flat; derived sizes are properties, not serialised).

    Fields: arch ("transformer++" or "gpt3"); d_model; n_layer; vocab_size; num_heads; num_heads_kv (grouped-query
    attention, None = num_heads); d_intermediate (MLP hidden size; 0 = the recipe's: 8/3 d_model rounded up to a
    multiple of 128 for SwiGLU, which matches the 8 d_model^2 MLP parameters of GPT-3's 4 d_model GELU MLP);
    rotary_emb_fraction (share of each head's dims that rotate, transformer++ only); rotary_emb_base;
    max_position_embeddings (the learned position table of gpt3; its longest sequence); norm_epsilon;
    residual_in_fp32; pad_vocab_size_multiple; tie_embeddings.

    Example:
        >>> cfg = TransformerConfig(d_model=256, n_layer=4, vocab_size=256, num_heads=4)
        >>> cfg.head_dim, cfg.rotary_emb_dim, cfg.mlp_hidden
        (64, 64, 768)
    """

    arch: str = "transformer++"
    d_model: int = 768
    n_layer: int = 12
    vocab_size: int = 50277
    num_heads: int = 12
    num_heads_kv: int | None = None
    d_intermediate: int = 0
    rotary_emb_fraction: float = 1.0
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"TransformerConfig: arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("d_model", "n_layer", "vocab_size", "num_heads", "pad_vocab_size_multiple",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig: d_model ({self.d_model}) must be divisible by num_heads "
                             f"({self.num_heads})")
        kv = self.heads_kv
        if not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
            raise ValueError(f"TransformerConfig: num_heads ({self.num_heads}) must be a multiple of num_heads_kv "
                             f"({self.num_heads_kv!r})")
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"TransformerConfig: d_intermediate must be an int >= 0, got {self.d_intermediate!r}")
        if not 0.0 <= self.rotary_emb_fraction <= 1.0:
            raise ValueError(f"TransformerConfig: rotary_emb_fraction must be in [0, 1], got {self.rotary_emb_fraction}")

    # ---- derived sizes

    @property
    def heads_kv(self) -> int:
        return self.num_heads if self.num_heads_kv is None else self.num_heads_kv

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rotary_emb_dim(self) -> int:
        """Rotated dims per head (even); 0 for gpt3, whose positions are the learned table."""
        if self.arch == "gpt3":
            return 0
        return int(self.head_dim * self.rotary_emb_fraction) // 2 * 2

    @property
    def rms_norm(self) -> bool:
        return self.arch == "transformer++"

    @property
    def bias(self) -> bool:
        """Linear layers with biases (gpt3) or without (transformer++)."""
        return self.arch == "gpt3"

    @property
    def mlp_hidden(self) -> int:
        if self.arch == "gpt3":
            return self.d_intermediate or 4 * self.d_model
        hidden = self.d_intermediate or int(8 * self.d_model / 3)
        return math.ceil(hidden / 128) * 128  # GatedMLP's multiple_of

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def attn_layer_idx(self) -> list[int]:
        """Every layer is attention (read by code that treats attention layers apart, e.g. CUDA graphs)."""
        return list(range(self.n_layer))

    @property
    def attn_cfg(self) -> dict[str, Any]:
        """The MHA arguments of every layer (mamba_ssm's attn_cfg names)."""
        return {"num_heads": self.num_heads, "num_heads_kv": self.heads_kv, "qkv_proj_bias": self.bias,
                "out_proj_bias": self.bias, "rotary_emb_dim": self.rotary_emb_dim,
                "rotary_emb_base": self.rotary_emb_base}

    # ---- serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        """Build from a config.json dict written by `to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TransformerConfig: unknown config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class TransformerBackbone(nn.Module):
    """Embedding (+ positions), the blocks and the final norm: (B, L) ids -> (B, L, M) hidden states.

    Names follow MambaLM's backbone (embedding, layers.i.{norm, mixer, norm2, mlp}, norm_f), plus pos_embedding
    (gpt3). Each layer's mixer is an `MHA`, so `allocate_cache` gives every layer a `KVState`.
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d, eps = config.d_model, config.norm_epsilon
        self.max_positions = config.max_position_embeddings
        norm_cls = partial(RMSNorm, eps=eps) if config.rms_norm else partial(nn.LayerNorm, eps=eps, bias=config.bias)
        self.embedding = nn.Embedding(config.padded_vocab_size, d, **factory)
        self.pos_embedding = nn.Embedding(config.max_position_embeddings, d, **factory) \
            if config.arch == "gpt3" else None
        layers = []
        for i in range(config.n_layer):
            mixer = MHA(d, layer_idx=i, **config.attn_cfg, **factory)
            if config.arch == "gpt3":
                mlp = GeluMLP(d, config.mlp_hidden, bias=config.bias, **factory)
            else:
                mlp = GatedMLP(d, hidden_features=config.mlp_hidden, out_features=d, bias=False, **factory)
            layers.append(Block(d, mixer, norm_cls(d, **factory), mlp=mlp, norm2=norm_cls(d, **factory),
                                residual_in_fp32=config.residual_in_fp32))
        self.layers = nn.ModuleList(layers)
        self.norm_f = norm_cls(d, **factory)

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embedding(input_ids)  # (B, L, M)
        if self.pos_embedding is not None:
            batch, seqlen = input_ids.shape
            # the longest row's last position, known on the host (no device sync): the table's limit
            last = seqlen + (0 if cache is None else cache.seqlen_offset)
            if last > self.max_positions:
                raise ValueError(f"TransformerLM: a gpt3 model has {self.max_positions} learned positions "
                                 f"(max_position_embeddings); this call reaches position {last - 1}")
            start = None if cache is None else cache.layers[0].next_pos
            positions = document_positions(seq_idx, batch, seqlen, start, input_ids.device)  # (B, L)
            hidden = hidden + self.pos_embedding(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cache=None if cache is None else cache.layers[i], seq_idx=seq_idx)
        return add_and_norm(hidden, residual, self.norm_f, residual_in_fp32=False)[0]


class TransformerLM(MambaLM):
    """Transformer language model.   forward(input_ids (B, L), cache=None, seq_idx=None) -> logits (B, L, V).

    Everything but the backbone is MambaLM's: the forward's checks, the tied LM head, allocate_cache (a KV cache
    per layer), generate, save_pretrained ("mambakit" format), from_pretrained.

    Example:
        >>> model = TransformerLM(TransformerConfig(d_model=128, n_layer=2, vocab_size=256, num_heads=4))
        >>> logits = model(torch.randint(0, 256, (2, 64)))                  # (2, 64, 256)
        >>> new = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=20)    # KV cache, ragged prompts
    """

    backbone_cls = TransformerBackbone


def is_transformer_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json dict describes a TransformerLM (it names one of ARCHS in "arch")."""
    return raw.get("arch") in ARCHS


def config_from_dict(raw: dict[str, Any]) -> MambaConfig | TransformerConfig:
    """The config a mambakit config.json dict describes: a TransformerConfig when it names an arch, else MambaConfig."""
    return TransformerConfig.from_dict(raw) if is_transformer_config(raw) else MambaConfig.from_dict(raw)


def build_model(config: MambaConfig | TransformerConfig, device=None, dtype=None) -> MambaLM:
    """The language model a config describes: TransformerLM for a TransformerConfig, MambaLM for a MambaConfig.

    Example:
        >>> model = build_model(TransformerConfig(d_model=64, n_layer=2, vocab_size=256, num_heads=2))
    """
    if isinstance(config, TransformerConfig):
        return TransformerLM(config, device=device, dtype=dtype)
    if isinstance(config, MambaConfig):
        return MambaLM(config, device=device, dtype=dtype)
    raise ValueError(f"build_model: config must be a MambaConfig or a TransformerConfig, got {type(config).__name__}")
