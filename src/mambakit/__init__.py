"""mambakit: selective state space models (Mamba-1 S6, Mamba-2 SSD) for CPU and GPU in one pip install."""

__version__ = "0.1.0"
