"""mambakit.checkpoints: read and write checkpoint directories (mambakit, mamba_ssm and Hugging Face formats).

    >>> from mambakit.checkpoints import load_pretrained, save_pretrained, convert_checkpoint
    >>> model = load_pretrained("mamba-130m-hf")                 # or MambaLM.from_pretrained(...)
    >>> model = load_pretrained("state-spaces/mamba-130m-hf")    # a Hub id, through huggingface_hub's cache
    >>> tok = load_checkpoint_tokenizer("mamba-130m-hf")          # its tokenizer.json (GPT-NeoX-20B)
    >>> save_pretrained(model, "out/mamba-130m", format="mambakit", tokenizer=tok)
    >>> convert_checkpoint("out/mamba-130m", "out/mamba-130m-hf", to="hf")

A name that is not a local directory is a Hugging Face Hub id: `resolve_checkpoint` fetches what a checkpoint
needs into huggingface_hub's cache (the `hub` extra; HF_HUB_OFFLINE=1 reads the cache only).
"""

from .errors import CheckpointError
from .hub import push_to_hub, resolve_checkpoint
from .pretrained import FORMATS, convert_checkpoint, load_config, load_pretrained, save_pretrained
from .tokenizer_files import load_checkpoint_tokenizer

__all__ = ["CheckpointError", "FORMATS", "load_pretrained", "load_config", "save_pretrained", "convert_checkpoint",
           "load_checkpoint_tokenizer", "resolve_checkpoint", "push_to_hub"]
