"""MambaConfig: a flat dataclass whose fields and defaults are those of mamba_ssm's config.json.

A mamba_ssm `config.json` loads as it is (`MambaConfig.from_dict(json.load(f))`). Derived sizes are
computed in `__post_init__` and are not serialised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .mixers import MIXERS, canonical_mixer_name, mixer_args, mixer_defaults, mixer_sizes, unknown_mixer_args


@dataclass
class MambaConfig:
    """Architecture of a Mamba language model.

    Fields (as in mamba_ssm): d_model; d_intermediate (gated-MLP hidden size after each mixer, 0 = none);
    n_layer; vocab_size; ssm_cfg (mixer kwargs, with "layer": "Mamba1" (default), "Mamba2", or the
    baselines "Mamba1Ungated" and "S4D", or "Mamba1Ablation" (selective Δ / B / C flags)); attn_layer_idx / attn_cfg (the layers that are attention, `MHA(**attn_cfg)`); rms_norm (else LayerNorm); residual_in_fp32;
    fused_add_norm (accepted, numerics identical); pad_vocab_size_multiple; tie_embeddings; norm_epsilon
    (the residual-stream norms' eps, as mamba_ssm's MixerModel argument).
    Derived: `layer` (the mixer name), `model_type` ("mamba" / "mamba2"), `padded_vocab_size`, `mixer_kwargs`,
    `mixer_args` (every constructor argument of the mixer) and `mixer_sizes` (d_inner, nheads, ...): what
    checkpoints and generation need, read from the config instead of from a built mixer.
    `ssm_cfg["layer"]` is stored in the one spelling of models/mixers.py ("Mamba2"); "mamba2" is accepted.

    Example:
        >>> cfg = MambaConfig(d_model=256, n_layer=4, vocab_size=256, ssm_cfg={"layer": "Mamba2", "d_state": 64})
        >>> cfg.padded_vocab_size, cfg.layer
        (256, 'Mamba2')
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict[str, Any] = field(default_factory=dict)
    attn_layer_idx: list[int] = field(default_factory=list)
    attn_cfg: dict[str, Any] = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5  # mamba_ssm's MixerModel argument; absent from its config.json, hence the default

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"MambaConfig: d_intermediate must be an int >= 0, got {self.d_intermediate!r}")
        self.ssm_cfg = dict(self.ssm_cfg or {})
        self.attn_cfg = dict(self.attn_cfg or {})
        self.attn_layer_idx = list(self.attn_layer_idx or [])
        if "layer" in self.ssm_cfg:  # left out means Mamba1, as in mamba_ssm; kept out so the file round-trips
            try:
                self.ssm_cfg["layer"] = canonical_mixer_name(self.ssm_cfg["layer"])
            except ValueError:
                raise ValueError(f"MambaConfig: ssm_cfg['layer'] must be one of {tuple(MIXERS)}, got "
                                 f"{self.ssm_cfg['layer']!r}") from None
        unknown = unknown_mixer_args(self.layer, self.ssm_cfg)
        if unknown:
            raise ValueError(f"MambaConfig: ssm_cfg holds {unknown}, which mambakit's {self.layer} does not take "
                             f"(it takes {sorted(mixer_defaults(self.layer))})")
        bad = [i for i in self.attn_layer_idx if not (0 <= i < self.n_layer)]
        if bad:
            raise ValueError(f"MambaConfig: attn_layer_idx {bad} outside [0, n_layer={self.n_layer})")

    @property
    def layer(self) -> str:
        return canonical_mixer_name(self.ssm_cfg.get("layer", "Mamba1"))

    @property
    def model_type(self) -> str:
        """"mamba" or "mamba2", as Hugging Face names these architectures (tools such as peft read it); derived
        from the mixer, not stored in config.json."""
        return "mamba2" if self.layer == "Mamba2" else "mamba"

    @property
    def mixer_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.ssm_cfg.items() if k != "layer"}

    @property
    def mixer_args(self) -> dict[str, Any]:
        """Every constructor argument of the mixer: its defaults overridden by ssm_cfg."""
        return mixer_args(self.layer, self.ssm_cfg)

    @property
    def mixer_sizes(self) -> dict[str, Any]:
        """The mixer's derived sizes (see models.mixers.mixer_sizes): d_inner, d_state, d_conv; Mamba2 also
        d_ssm, headdim, nheads, ngroups, d_mlp, conv_dim, norm_groups, norm_eps, by the module's own formula
        (modules.mamba2.mamba2_sizes), with its ValueError for sizes that do not divide."""
        return mixer_sizes(self.layer, self.d_model, self.mixer_args)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        """Build from a mamba_ssm (or mambakit) config.json dict; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MambaConfig: unknown config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
