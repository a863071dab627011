"""mambakit.ops: the math of selective state space models, one folder per op family.

Each public function validates its inputs, then runs on the backend chosen by `dispatch.select_backend`:
"reference" (sequential float64), "torch" (vectorised PyTorch) or "triton" (fused GPU kernels).

Naming, the same in every family folder:
    __init__.py          the public function(s): checks, then `dispatch.implementation(...)` (mamba_inner's
                         two fused ops have a file each, mamba1.py and mamba2.py)
    reference.py         the "reference" backend: float64 ground truth ("reference" means nothing else)
    torch_<x>.py         the "torch" backend; functions `<op>_torch`, autograd classes `_<Op>TorchFunction`
    triton_<x>.py        the "triton" backend: kernels, launchers (`<op>_triton`) and their torch.library ops
    <x>_policy.py        launch policy as plain Python (no Triton import), tested on CPU
Vocabulary: a *chunk* is the SSD's block (`chunk_size`) and nothing else; the selective scan has
*checkpoint intervals* (steps between saved states) and *time segments* (stretches scanned by their own
programs); prefill feeds *tokens per call*. `state_dtype` is the dtype an inference cache stores SSM states
in; the dtype the ops return states in is `reference.final_state_dtype`.
"""

from .dispatch import pinned_backend, record_backends, use_backend
from .common import pdl_mode
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .cross_entropy import linear_cross_entropy
from .mamba_inner import mamba1_inner, mamba1_step, mamba2_inner
from .norm_linear import add_rms_norm_linear, decode_linear, gated_rms_norm_linear
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
    "add_rms_norm_linear",
    "gated_rms_norm_linear",
    "decode_linear",
    "GatedNormSpec",
    "linear_cross_entropy",
    "mamba1_inner",
    "mamba1_step",
    "mamba2_inner",
    "use_backend",
    "pinned_backend",
    "record_backends",
    "pdl_mode",
]
