"""mambakit.checkpoints: read and write checkpoint directories (mambakit, mamba_ssm and Hugging Face formats).

    >>> from mambakit.checkpoints import load_pretrained, save_pretrained, convert_checkpoint
    >>> model = load_pretrained("mamba-130m-hf")                 # or MambaLM.from_pretrained(...)
    >>> tok = load_checkpoint_tokenizer("mamba-130m-hf")          # its tokenizer.json (GPT-NeoX-20B)
    >>> save_pretrained(model, "out/mamba-130m", format="mambakit", tokenizer=tok)
    >>> convert_checkpoint("out/mamba-130m", "out/mamba-130m-hf", to="hf")

Only local directories are read: nothing is ever downloaded.
"""

from .errors import CheckpointError
from .pretrained import FORMATS, convert_checkpoint, load_pretrained, save_pretrained
from .tokenizer_files import load_checkpoint_tokenizer

__all__ = ["CheckpointError", "FORMATS", "load_pretrained", "save_pretrained", "convert_checkpoint",
           "load_checkpoint_tokenizer"]
