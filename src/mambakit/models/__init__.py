"""mambakit.models: the model configs, named presets, the Mamba language model and the Transformer baselines."""

from .config import MambaConfig
from .mamba_lm import MambaLM
from .presets import PRESETS, preset
from .transformer import TransformerConfig, TransformerLM, build_model

__all__ = ["MambaConfig", "MambaLM", "PRESETS", "preset", "TransformerConfig", "TransformerLM", "build_model"]
