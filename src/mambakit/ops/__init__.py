"""mambakit.ops: the math of selective state space models, one folder per op family.

Each public function validates its inputs, then runs on the backend chosen by `dispatch.select_backend`:
"reference" (sequential float64), "torch" (vectorised PyTorch) or "triton" (fused GPU kernels).
"""

from .dispatch import pinned_backend, use_backend
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .mamba_inner import mamba1_inner, mamba2_inner
from .rms_norm import GatedNormSpec, add_rms_norm, rms_norm
from .selective_scan import selective_scan, selective_state_update
from .ssd import ssd, ssd_state_update

__all__ = [
    "selective_scan",
    "selective_state_update",
    "ssd",
    "ssd_state_update",
    "causal_conv1d",
    "causal_conv1d_update",
    "rms_norm",
    "add_rms_norm",
    "GatedNormSpec",
    "mamba1_inner",
    "mamba2_inner",
    "use_backend",
    "pinned_backend",
]
