"""mambakit.checkpoints: reading and writing checkpoint directories."""

from .io import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
