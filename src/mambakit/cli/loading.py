"""Loading a model for the commands that run one (`generate`, `serve`, `eval`): one place for the checks.

Each step raises a `UsageError` (one line, exit status 2) for what the user can fix: a directory that is
neither a model directory nor a Hub id, a device that does not exist, a tokenizer whose vocabulary is
larger than the model's. The commands call `checkpoint_dir` first, check their own flags, then
`load_model`, so that a mistyped flag is reported before minutes of loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # torch and the model classes load only when a command runs (fast --help)
    import torch

    from ..data.tokenizers import Tokenizer
    from ..models import MambaLM

__all__ = ["LoadedModel", "checkpoint_dir", "load_model"]


@dataclass
class LoadedModel:
    """What `load_model` returns: the model on its device, its tokenizer, and where both came from."""

    directory: Path
    device: torch.device
    tokenizer: Tokenizer
    lm: MambaLM


def checkpoint_dir(model: str, revision: str | None = None) -> Path:
    """The local directory of `model`: a directory as given, or a Hub id's snapshot in huggingface_hub's cache.

    Raises UsageError when `model` is neither an existing directory nor a Hub id, or when the directory
    has no config.json.

    Example:
        >>> directory = checkpoint_dir("runs/shakespeare")
    """
    from ..checkpoints import resolve_checkpoint
    from ..checkpoints.hub import looks_like_hub_id

    if not Path(model).is_dir() and not looks_like_hub_id(model):
        raise UsageError(f"model directory not found: {model}")
    directory = resolve_checkpoint(model, revision)  # a Hub id: its snapshot in huggingface_hub's cache
    if not (directory / "config.json").is_file():
        raise UsageError(f"no config.json in {model}: not a model directory (train one with `mambakit train`)")
    return directory


def load_model(directory: Path, device: str = "auto", dtype: str | None = "auto") -> LoadedModel:
    """Resolve `device`, then load the tokenizer and the model of `directory` (from `checkpoint_dir`) onto it.

    Args:
        directory: a model directory.   device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "float32", "bfloat16", "float16"; "auto" is bfloat16 on CUDA and float32 elsewhere; None keeps
            what `MambaLM.from_pretrained` picks by default.
    Raises:
        UsageError: an unknown or unavailable device, or a tokenizer vocabulary larger than the model's
            (a CheckpointError, printed as a user error too, when the directory has no tokenizer).

    Example:
        >>> loaded = load_model(checkpoint_dir("runs/shakespeare"), device="cpu")
        >>> loaded.lm, loaded.tokenizer
    """
    import torch

    from ..checkpoints import load_checkpoint_tokenizer
    from ..models import MambaLM
    from ..training import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    # also reads a Hugging Face folder's tokenizer (a CheckpointError, printed as a user error, if none)
    tokenizer = load_checkpoint_tokenizer(directory)
    lm = MambaLM.from_pretrained(directory, dtype=None if dtype is None else getattr(torch, dtype), device=dev)
    if tokenizer.vocab_size > lm.config.padded_vocab_size:
        raise UsageError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                         f"({lm.config.padded_vocab_size}): they do not belong together")
    return LoadedModel(directory=directory, device=dev, tokenizer=tokenizer, lm=lm)
