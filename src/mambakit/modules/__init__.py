"""mambakit.modules: the layers (Mamba-1 and Mamba-2 mixers, norms, gated MLP, residual block)."""

from .attention import MHA, KVState
from .block import Block
from .mamba1 import Mamba1
from .mamba1_ablation import Mamba1Ablation
from .mamba1_ungated import Mamba1Ungated
from .mamba2 import Mamba2
from .mlp import GatedMLP
from .norm import RMSNorm, RMSNormGated
from .quantized import Int8Linear, quantize_weights
from .s4d import S4D
from .state import InferenceCache, MixerState

__all__ = ["Mamba1", "Mamba2", "GatedMLP", "RMSNorm", "RMSNormGated", "Block", "MixerState", "InferenceCache",
           "Mamba1Ungated", "S4D", "MHA", "KVState", "Mamba1Ablation", "Int8Linear", "quantize_weights"]
