"""Fused mixer ops: everything between a Mamba layer's in_proj and its out_proj (Mamba-1), or after in_proj (Mamba-2), as one op.

See README.md: what each saves for the backward and what it recomputes there.
"""

from .mamba1 import mamba1_inner
from .mamba1_step import mamba1_step
from .mamba2 import mamba2_inner

__all__ = ["mamba1_inner", "mamba1_step", "mamba2_inner"]
