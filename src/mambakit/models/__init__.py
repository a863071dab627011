"""mambakit.models: the model config, named presets and the Mamba language model."""

from .config import MambaConfig
from .mamba_lm import MambaLM
from .presets import PRESETS, preset

__all__ = ["MambaConfig", "MambaLM", "PRESETS", "preset"]
