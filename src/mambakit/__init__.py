"""mambakit: selective state space models (Mamba-1 S6, Mamba-2 SSD) for CPU and GPU in one pip install.

    >>> from mambakit import MambaConfig, MambaLM
    >>> model = MambaLM(MambaConfig(d_model=256, n_layer=4, vocab_size=256))
"""

from .models import MambaConfig, MambaLM

__version__ = "0.1.0"
__all__ = ["MambaConfig", "MambaLM", "__version__"]
