"""Tokenizers: raw bytes (built in), Hugging Face `tokenizer.json` files (through `tokenizers`), sentencepiece
`tokenizer.model` files (through `sentencepiece`) and, for any other Hugging Face tokenizer folder,
transformers' `AutoTokenizer`.

All share one small interface (`Tokenizer`): `encode`, `decode`, `vocab_size`, `eos_id` (the
end-of-document token that separates documents in a training stream and stops generation),
`count_bytes` (how many bytes of text a run of token ids stands for, the denominator of bits per
byte) and `save(dir)`. `load_tokenizer(dir)` reads back what `save` wrote:

    dir/tokenizer_config.json   {"type": "bytes"}, {"type": "hf", "eos_token": "<|endoftext|>"}
                                or {"type": "sentencepiece", "eos_token": "</s>"}
    dir/tokenizer.json          the Hugging Face tokenizer itself (type "hf" only)
    dir/tokenizer.model         the sentencepiece model (type "sentencepiece" only)

Beyond the interface, a tokenizer loaded with a checkpoint carries what the checkpoint's config files say
(mambakit.checkpoints sets them): `bos_id`, `pad_id`, `stop_ids` (every id that ends generation),
`special_tokens` ({"bos_token": ..., "eos_token": ...}, the names chat templates use) and `chat_template`.
Streaming text out of token ids is mambakit.data.streaming's `IncrementalDecoder`.

Token ids are plain Python ints in lists; the data layer turns streams of them into tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import DataError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "TransformersTokenizer",
           "load_tokenizer", "TOKENIZER_CONFIG"]

TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"

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


class _CheckpointFields:
    """What a checkpoint's config files add to a tokenizer (set by mambakit.checkpoints; None / empty otherwise).

    bos_id, pad_id: begin-of-sequence and padding ids. stop_ids: every id that ends generation (eos_id and,
    e.g., generation_config.json's list). special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...}, the
    names a chat template reads. chat_template: a Jinja template (see mambakit.data.chat). stop_strings: texts that
    end generation (generation_config.json's "stop_strings"; e.g. the end of turn of a model fine-tuned on
    conversations with mambakit's default template).
    """

    bos_id: int | None = None
    pad_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    special_tokens: dict[str, str] | None = None
    chat_template: str | None = None
    stop_strings: tuple[str, ...] = ()


class ByteTokenizer(_CheckpointFields):
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


def _count_bytes(decode, eos_id: int | None, ids: list[int]) -> int:
    """UTF-8 bytes of what `ids` decode to, each `eos_id` counted as 1 byte and the runs between them decoded whole."""
    ids = [int(i) for i in ids]
    total, start = 0, 0
    for i, t in enumerate(ids + [None]):
        if t is None or t == eos_id:
            if i > start:
                total += len(decode(ids[start:i]).encode("utf-8"))
            if t is not None:
                total += 1
            start = i + 1
    return total


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise DataError(
            "HFTokenizer needs the `tokenizers` package: pip install tokenizers (or pip install 'mambakit[data]')"
        ) from err
    return tokenizers


class HFTokenizer(_CheckpointFields):
    """A Hugging Face `tokenizer.json` (BPE, Unigram, WordPiece) run by the `tokenizers` package.

    Args:
        path: a `tokenizer.json` file, or a directory holding one.
        eos_token: the token that ends a document; None tries common names
            (<|endoftext|>, </s>, <eos>, ...) and leaves `eos_id` None when none exists,
            in which case documents are concatenated without a separator.
        guess_eos: False leaves `eos_id` None when `eos_token` is None (a checkpoint's configs decide it).

    Example:
        >>> tok = HFTokenizer("20B_tokenizer.json")     # GPT-NeoX-20B, as used by the Mamba checkpoints
        >>> tok.decode(tok.encode("To be, or not to be"))
        'To be, or not to be'
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, guess_eos: bool = True):
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
        if eos_token is None and guess_eos:
            eos_token = next((t for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        elif eos_token is not None and self._tok.token_to_id(eos_token) is None:
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

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (what `tokenizers.decoders.DecodeStream` steps through)."""
        return self._tok

    def count_bytes(self, ids: list[int]) -> int:
        """UTF-8 bytes of the text that `ids` decode to, each end-of-document token counted as 1 byte.

        The end-of-document token counts as one byte (not as the length of its name, e.g. 13 for
        "<|endoftext|>"), so bits per byte means the same as for `ByteTokenizer`, whose separator
        is one byte. The runs between separators are decoded whole, not token by token: byte-level
        BPE pieces can split a multi-byte character.
        """
        return _count_bytes(self.decode, self.eos_id, ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_TOKENIZER_FILE))
        cfg = {"type": "hf", "eos_token": self.eos_token}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


class SentencePieceTokenizer(_CheckpointFields):
    """A sentencepiece `tokenizer.model` (Llama-, T5-, Mistral-style BPE or Unigram) run by `sentencepiece`.

    Args:
        path: a `tokenizer.model` file, or a directory holding one.
        eos_token: the token that ends a document; None takes the model's own end-of-sentence piece (the
            trainer's `eos_id`, e.g. "</s>"), or none when the model was trained without one.
        added_tokens: tokens beyond the model's pieces, {text: id} (transformers' `added_tokens_decoder`,
            e.g. chat markers); they and the model's control pieces ("<s>", "</s>") are recognised in text
            given to `encode` and written out by `decode`, as transformers does.

    Example:
        >>> tok = SentencePieceTokenizer("llama/tokenizer.model")
        >>> tok.decode(tok.encode("To be, or not to be"))
        'To be, or not to be'
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, added_tokens: dict[str, int] | None = None):
        try:
            import sentencepiece
        except ImportError as err:
            raise DataError("a tokenizer.model needs the `sentencepiece` package: pip install sentencepiece "
                            "(or pip install 'mambakit[data]')") from err
        path = Path(path)
        if path.is_dir():
            path = path / SENTENCEPIECE_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise DataError(f"{path}: not a valid sentencepiece model ({err})") from err
        n = self._sp.get_piece_size()
        # text <-> id of every token written as itself: control pieces and the added tokens
        self._special = {self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i)}
        self._special.update({str(t): int(i) for t, i in (added_tokens or {}).items()})
        self._special_text = {i: t for t, i in self._special.items()}
        self.vocab_size = max([n] + [i + 1 for i in self._special.values()])
        # longest first, so that "<|im_start|>" is not read as a shorter token it begins with
        names = sorted(self._special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        if eos_token is None:
            own = self._sp.eos_id()
            eos_token = self._sp.id_to_piece(own) if own >= 0 else None
        self.eos_token = eos_token
        self.eos_id = None if eos_token is None else self.token_to_id(eos_token)
        if eos_token is not None and self.eos_id is None:
            raise DataError(f"eos_token {eos_token!r} is not in the vocabulary of {path}")

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        i = self._sp.piece_to_id(token)  # unknown pieces map to the unk id: tell them apart
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        if token_id in self._special_text:
            return self._special_text[token_id]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS added (the data layer and chat templates place them); special tokens written in the text
        # become their ids, the text between them goes through the model.
        parts = self._split.split(text) if self._split is not None else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._special_text:
                out.append(self._sp.decode(run))
                out.append(self._special_text[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def count_bytes(self, ids: list[int]) -> int:
        """As HFTokenizer.count_bytes: each end-of-document token 1 byte, the runs between them decoded whole."""
        return _count_bytes(self.decode, self.eos_id, ids)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / SENTENCEPIECE_FILE).resolve() != self.path.resolve():
            shutil.copyfile(self.path, directory / SENTENCEPIECE_FILE)
        cfg = {"type": "sentencepiece", "eos_token": self.eos_token}
        added = {t: i for t, i in self._special.items() if i >= self._sp.get_piece_size()}
        if added:
            cfg["added_tokens"] = added
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"eos_token={self.eos_token!r})")


class TransformersTokenizer(_CheckpointFields):
    """Any tokenizer transformers' `AutoTokenizer` loads from a folder (vocab.json + merges.txt, a custom class,
    ...), for the folders that neither `tokenizers` nor `sentencepiece` reads directly.

    Example:
        >>> tok = TransformersTokenizer("gpt2-folder")       # vocab.json + merges.txt, no tokenizer.json
    """

    def __init__(self, directory: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise DataError(f"{directory}: this tokenizer needs transformers' AutoTokenizer: pip install "
                            "transformers") from err
        self.path = Path(directory)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{directory}: transformers' AutoTokenizer cannot load it ({err})") from err
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.chat_template = getattr(self._tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.get_vocab().get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.convert_ids_to_tokens(int(token_id))

    def count_bytes(self, ids: list[int]) -> int:
        return _count_bytes(self.decode, self.eos_id, ids)

    def save(self, directory: str | Path) -> None:
        self._tok.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"TransformersTokenizer({str(self.path)!r}, {type(self._tok).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer | SentencePieceTokenizer:
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
    if kind == "nucleotides":  # DNA: one token per base (mambakit.data.dna)
        from .dna import NucleotideTokenizer

        return NucleotideTokenizer()
    if kind == "hf":
        return HFTokenizer(directory, eos_token=cfg.get("eos_token"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(directory, eos_token=cfg.get("eos_token"), added_tokens=cfg.get("added_tokens"))
    raise DataError(f"{cfg_path}: unknown tokenizer type {kind!r} (expected \"bytes\", \"hf\", "
                    "\"sentencepiece\" or \"nucleotides\")")
