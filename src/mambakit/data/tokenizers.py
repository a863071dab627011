"""Tokenizers: raw bytes (built in) and Hugging Face `tokenizer.json` files (through `tokenizers`).

Both share one small interface (`Tokenizer`): `encode`, `decode`, `vocab_size`, `eos_id` (the
end-of-document token that separates documents in a training stream and stops generation),
`count_bytes` (how many bytes of text a run of token ids stands for, the denominator of bits per
byte) and `save(dir)`. `load_tokenizer(dir)` reads back what `save` wrote:

    dir/tokenizer_config.json   {"type": "bytes"}  or  {"type": "hf", "eos_token": "<|endoftext|>"}
    dir/tokenizer.json          the Hugging Face tokenizer itself (type "hf" only)

Token ids are plain Python ints in lists; the data layer turns streams of them into tensors.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import DataError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "IncrementalDecoder", "TOKENIZER_CONFIG"]

TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"

# End-of-document names tried in order when a tokenizer.json does not say which token ends a document.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer, training, evaluation and the CLI need from a tokenizer."""

    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def count_bytes(self, ids: list[int]) -> int: ...

    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """One token per UTF-8 byte: vocab 256, nothing to train, nothing out of vocabulary.

    The end-of-document token is byte 0 (NUL), which never occurs in ordinary text; a NUL that
    does occur in a document is kept as it is (and reads as a document boundary to the model).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169])
        'hé'
    """

    vocab_size: int = 256
    eos_id: int | None = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, text: str) -> bytes:
        """The same ids as `encode`, as a `bytes` object (cheap to turn into a uint8 tensor)."""
        return text.encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        # errors="replace": a sampled model can emit byte sequences that are not valid UTF-8.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def count_bytes(self, ids: list[int]) -> int:
        # Every token is exactly one byte (the end-of-document byte included), so bits per byte
        # is bits per token.
        return len(ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps({"type": "bytes"}, indent=2) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256, eos_id=0)"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise DataError(
            "HFTokenizer needs the `tokenizers` package: pip install tokenizers (or pip install 'mambakit[data]')"
        ) from err
    return tokenizers


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (BPE, Unigram, WordPiece) run by the `tokenizers` package.

    Args:
        path: a `tokenizer.json` file, or a directory holding one.
        eos_token: the token that ends a document; None tries common names
            (<|endoftext|>, </s>, <eos>, ...) and leaves `eos_id` None when none exists,
            in which case documents are concatenated without a separator.

    Example:
        >>> tok = HFTokenizer("20B_tokenizer.json")     # GPT-NeoX-20B, as used by the Mamba checkpoints
        >>> tok.decode(tok.encode("To be, or not to be"))
        'To be, or not to be'
    """

    def __init__(self, path: str | Path, eos_token: str | None = None):
        tokenizers = _import_tokenizers()
        path = Path(path)
        if path.is_dir():
            path = path / HF_TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise DataError(f"{path}: not a valid tokenizer.json ({err})") from err
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        elif self._tok.token_to_id(eos_token) is None:
            raise DataError(f"eos_token {eos_token!r} is not in the vocabulary of {path}")
        self.eos_token = eos_token
        self.eos_id = None if eos_token is None else self._tok.token_to_id(eos_token)

    def encode(self, text: str) -> list[int]:
        # No special tokens added: document boundaries are the data layer's business.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts at once (the `tokenizers` package runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def count_bytes(self, ids: list[int]) -> int:
        """UTF-8 bytes of the text that `ids` decode to, each end-of-document token counted as 1 byte.

        The end-of-document token counts as one byte (not as the length of its name, e.g. 13 for
        "<|endoftext|>"), so bits per byte means the same as for `ByteTokenizer`, whose separator
        is one byte. The runs between separators are decoded whole, not token by token: byte-level
        BPE pieces can split a multi-byte character.
        """
        ids = [int(i) for i in ids]
        total, start = 0, 0
        for i, t in enumerate(ids + [None]):
            if t is None or t == self.eos_id:
                if i > start:
                    total += len(self._tok.decode(ids[start:i], skip_special_tokens=False).encode("utf-8"))
                if t is not None:
                    total += 1
                start = i + 1
        return total

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_TOKENIZER_FILE))
        cfg = {"type": "hf", "eos_token": self.eos_token}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """Read the tokenizer that `save(directory)` wrote (e.g. into a training checkpoint).

    A directory with a `tokenizer.json` but no `tokenizer_config.json` (a Hugging Face model
    folder) loads as an `HFTokenizer`.

    Example:
        >>> ByteTokenizer().save("ckpt"); load_tokenizer("ckpt")
        ByteTokenizer(vocab_size=256, eos_id=0)
    """
    directory = Path(directory)
    cfg_path = directory / TOKENIZER_CONFIG
    if not cfg_path.is_file():
        if (directory / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer(directory)
        raise DataError(f"no {TOKENIZER_CONFIG} or {HF_TOKENIZER_FILE} in {directory}")
    try:
        cfg = json.loads(cfg_path.read_text())
        kind = cfg["type"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{cfg_path}: expected a JSON object with a \"type\" field ({err})") from err
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(directory, eos_token=cfg.get("eos_token"))
    raise DataError(f"{cfg_path}: unknown tokenizer type {kind!r} (expected \"bytes\" or \"hf\")")


class IncrementalDecoder:
    """Turn token ids arriving one at a time into text that can be printed as it comes.

    Text is held back while it ends in an incomplete UTF-8 character (a byte tokenizer emits
    a multi-byte character over several tokens), so what has been printed never has to change.

    Example:
        >>> dec = IncrementalDecoder(ByteTokenizer())
        >>> [dec.push(t) for t in "é!".encode()] + [dec.flush()]
        ['', 'é', '!', '']
    """

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer):
        self.tokenizer = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") if isinstance(tokenizer, ByteTokenizer) else None
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        if self._bytes is not None:
            return self._bytes.decode(bytes([int(token_id)]))
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        # A trailing U+FFFD is usually half a character split across byte-level BPE tokens.
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def flush(self) -> str:
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids)
        new, self._emitted = text[self._emitted:], len(text)
        return new
