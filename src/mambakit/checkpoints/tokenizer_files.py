"""The tokenizer kept beside a checkpoint's weights, read and written through mambakit.data.

    tokenizer_config.json   mambakit.data's {"type": "bytes"} or {"type": "hf", "eos_token": ...}; in a
                            Hugging Face directory also transformers' own fields (the two share the file:
                            every field is kept and each reader ignores what it does not know)
    tokenizer.json          a Hugging Face `tokenizers` file (e.g. GPT-NeoX-20B's), type "hf" only

A Hugging Face model folder (tokenizer_config.json without "type") reads as an `HFTokenizer` whose
end-of-document token is that file's eos_token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import CheckpointError
from .io import read_json, write_json

__all__ = ["TOKENIZER_FILES", "has_tokenizer", "load_checkpoint_tokenizer", "save_tokenizer", "copy_tokenizer"]

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
# What a converted checkpoint carries across: mambakit's two files and transformers' companions.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def has_tokenizer(directory: Path) -> bool:
    return (directory / TOKENIZER_CONFIG).is_file() or (directory / TOKENIZER_JSON).is_file()


def _token_text(token) -> str | None:
    # transformers writes special tokens as plain strings, or as {"content": ..., ...} in older files
    return token.get("content") if isinstance(token, dict) else token


def load_checkpoint_tokenizer(directory: str | Path):
    """The tokenizer saved with a checkpoint (a mambakit.data ByteTokenizer or HFTokenizer).

    Example:
        >>> tok = load_checkpoint_tokenizer("mamba-130m-hf")      # tokenizer.json of GPT-NeoX-20B
        >>> tok.eos_id
        0
    """
    from ..data import DataError, HFTokenizer, load_tokenizer

    directory = Path(directory)
    try:
        if (directory / TOKENIZER_CONFIG).is_file() and (directory / TOKENIZER_JSON).is_file():
            cfg = read_json(directory / TOKENIZER_CONFIG)
            if "type" not in cfg:  # a Hugging Face folder as transformers wrote it
                return HFTokenizer(directory, eos_token=_token_text(cfg.get("eos_token")))
        return load_tokenizer(directory)
    except DataError as err:
        raise CheckpointError(f"{directory}: cannot load the checkpoint's tokenizer: {err}") from err


def _finish_config(directory: Path, hf: bool) -> None:
    """Make tokenizer_config.json readable by mambakit.data and, in a Hugging Face directory, by transformers."""
    path = directory / TOKENIZER_CONFIG
    cfg = read_json(path) if path.is_file() else {}
    if "type" not in cfg:
        if not (directory / TOKENIZER_JSON).is_file():
            return  # e.g. a sentencepiece-only folder: nothing mambakit can read, left as it came
        cfg["type"] = "hf"
    if cfg["type"] == "hf":
        cfg["eos_token"] = _token_text(cfg.get("eos_token"))
        if hf:
            cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # what transformers 4.x needs to load it
    write_json(path, cfg)


def save_tokenizer(tokenizer, directory: Path, format: str) -> None:
    """tokenizer.save(directory), plus transformers' fields when the checkpoint is in the "hf" format."""
    tokenizer.save(directory)
    _finish_config(directory, hf=format == "hf")


def copy_tokenizer(src: Path, dst: Path, format: str) -> list[str]:
    """Copy the tokenizer files of checkpoint `src` into `dst` as they are (transformers' extra fields and files
    included), then complete tokenizer_config.json for the target format. Returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if copied:
        _finish_config(dst, hf=format == "hf")
    return copied
