"""Tokenize a corpus once into an on-disk cache of token ids that later runs memory-map instead of re-tokenizing.

Layout of one cache entry, `<cache_dir>/<corpus fingerprint>-<tokenizer fingerprint>/`:

    train.bin    the training stream, EOS doc_1 EOS doc_2 ... (stream.py's layout), raw ids in `dtype`
    val.bin      the held-out stream, the same way
    meta.json    {"version", "dtype", "eos_id", "ntokens": {"train", "val"}, "documents": {"train", "val"},
                  "corpus", "tokenizer"}

dtype is the narrowest of uint8 / uint16 / uint32 that holds the vocabulary (bytes: 1 byte per token; a
50k BPE: 2). The key hashes the corpus's content and reading options (sources.Corpus.fingerprint) and
the tokenizer's saved files, so a changed corpus, split or tokenizer makes a new entry and the old one
is left as it is. An entry is built in a temporary directory beside it and renamed into place whole,
so a reader never sees half an entry, and two processes building the same entry at once (torchrun
ranks, parallel tests) both end up reading the one that was renamed first.

Tokenizing runs in `num_proc` worker processes over chunks of documents, at most 2 x num_proc chunks in
flight (the corpus is streamed through, never held whole), written in document order, with a tqdm bar.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import uuid
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpora import Document
from .errors import DataError
from .sources import Corpus, open_corpus
from .stream import TokenStream
from .tokenizers import ByteTokenizer, Tokenizer

__all__ = ["TokenizedCorpus", "tokenize_corpus", "load_token_streams", "default_cache_dir", "tokenizer_fingerprint",
           "CACHE_ENV"]

CACHE_ENV = "MAMBAKIT_TOKEN_CACHE"  # overrides the default cache directory
_VERSION = 1
_SPLITS = ("train", "val")
_CHUNK_DOCS = 512  # documents per worker task ...
_CHUNK_CHARS = 4 << 20  # ... or this many characters, whichever comes first


def default_cache_dir() -> Path:
    """$MAMBAKIT_TOKEN_CACHE, else $XDG_CACHE_HOME/mambakit/tokens, else ~/.cache/mambakit/tokens."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mambakit" / "tokens"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hex digest of what decides the ids: the tokenizer's class, eos id, vocabulary size and saved files."""
    import hashlib

    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_id, tokenizer.vocab_size]).encode())
    with tempfile.TemporaryDirectory(prefix="mambakit-tok-") as tmp:
        tokenizer.save(tmp)
        for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            digest.update(b"\0file\0" + str(f.relative_to(tmp)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _token_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"a vocabulary of {vocab_size} tokens does not fit uint32 token ids")


# ---------------------------------------------------------------- tokenizing (in this process or in workers)

def _encode_chunk(tokenizer: Tokenizer, dtype: np.dtype, texts: list[str], held: list[bool]) -> list[np.ndarray]:
    """[train ids, held-out ids] of a chunk of documents, each document preceded by the EOS (when there is one)."""
    eos = tokenizer.eos_id
    if isinstance(tokenizer, ByteTokenizer):
        encoded = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]  # no Python int per byte
    elif hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(texts)
    else:
        encoded = [tokenizer.encode(t) for t in texts]
    sep = np.array([] if eos is None else [eos], dtype=dtype)
    out: list[list[np.ndarray]] = [[], []]
    for ids, is_held in zip(encoded, held):
        out[int(is_held)] += [sep, np.asarray(ids, dtype=dtype)]
    return [np.concatenate(parts) if parts else np.zeros(0, dtype=dtype) for parts in out]


_WORKER: dict = {}


def _worker_init(tokenizer: Tokenizer, dtype: np.dtype) -> None:
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _worker_encode(texts: list[str], held: list[bool]) -> list[np.ndarray]:
    return _encode_chunk(_WORKER["tokenizer"], _WORKER["dtype"], texts, held)


def _chunks(documents: Iterator[tuple[Document, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    texts, held, chars = [], [], 0
    for doc, is_held in documents:
        texts.append(doc.text)
        held.append(is_held)
        chars += len(doc.text)
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield texts, held
            texts, held, chars = [], [], 0
    if texts:
        yield texts, held


def _encoded_chunks(corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype,
                    num_proc: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """([train documents, held-out documents], [train ids, held-out ids]) per chunk, in document order."""
    chunks = _chunks(corpus.documents())
    if num_proc <= 1:
        for texts, held in chunks:
            yield _counts(held), _encode_chunk(tokenizer, dtype, texts, held)
        return
    # fork where the platform has it: workers inherit the tokenizer instead of unpickling it
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, initializer=_worker_init,
                                                  initargs=(tokenizer, dtype)) as pool:
        pending: deque = deque()  # bounded: Pool.imap would read the whole corpus ahead into its queue
        for texts, held in chunks:
            pending.append((_counts(held), pool.apply_async(_worker_encode, (texts, held))))
            if len(pending) >= 2 * num_proc:
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()


def _counts(held: list[bool]) -> list[int]:
    return [len(held) - sum(held), sum(held)]


def _resolve_num_proc(num_proc: int, tokenizer: Tokenizer) -> int:
    if num_proc > 0:
        return num_proc
    if isinstance(tokenizer, ByteTokenizer):
        return 1  # encoding bytes is a copy: workers would only add the cost of sending text to them
    return max(1, min(os.cpu_count() or 1, 8))


def _tokenize(corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype, num_proc: int, progress: bool,
              out_dir: Path | None) -> tuple[list, dict, dict]:
    """Tokenize every document; write the splits into out_dir/{train,val}.bin, or keep them in memory (out_dir None).

    Returns (the in-memory arrays or None per split, token counts, document counts).
    """
    from tqdm.auto import tqdm

    files = [open(out_dir / f"{s}.bin", "wb") for s in _SPLITS] if out_dir is not None else None
    kept: list[list[np.ndarray]] = [[], []]
    ntokens, ndocs = [0, 0], [0, 0]
    bar = None
    try:
        for n_docs, parts in _encoded_chunks(corpus, tokenizer, dtype, num_proc):
            if bar is None:  # not before: a corpus that cannot be read prints its error alone, without a bar
                bar = tqdm(total=corpus.n_documents, unit="doc", desc="tokenize", disable=not progress,
                           dynamic_ncols=True)
            for k, ids in enumerate(parts):
                ntokens[k] += ids.size
                if files is not None:
                    files[k].write(ids.tobytes())
                else:
                    kept[k].append(ids)
                ndocs[k] += n_docs[k]
            bar.update(sum(n_docs))
            bar.set_postfix(tokens=f"{sum(ntokens):,}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        for f in files or []:
            f.close()
    arrays = None if files is not None else [np.concatenate(k) if k else np.zeros(0, dtype=dtype) for k in kept]
    return arrays, dict(zip(_SPLITS, ntokens)), dict(zip(_SPLITS, ndocs))


# ---------------------------------------------------------------- the cache

@dataclass
class TokenizedCorpus:
    """The token streams of a corpus. `train` and `val` share the tokenizer; `documents` counts each split's
    documents ({"train": n, "val": m}); `path` is the cache entry (None when kept in memory) and `from_cache`
    is True when this call read the entry back instead of tokenizing."""

    train: TokenStream
    val: TokenStream
    documents: dict
    path: Path | None
    from_cache: bool


def _memmap_stream(path: Path, dtype: np.dtype, ntokens: int, tokenizer: Tokenizer) -> TokenStream:
    if ntokens == 0:  # mmap cannot map an empty file
        return TokenStream(torch.zeros(0, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype), tokenizer)
    array = np.memmap(path, dtype=dtype, mode="r", shape=(ntokens,))
    with warnings.catch_warnings():
        # read-only on purpose: windows are gathered copies, nothing ever writes into the stream
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return TokenStream(torch.from_numpy(array), tokenizer)


def _read_entry(entry: Path, tokenizer: Tokenizer) -> TokenizedCorpus | None:
    """The entry's streams, or None when it is missing or incomplete (then it is rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != _VERSION:
            return None
        dtype = np.dtype(meta["dtype"])
        for split in _SPLITS:
            if (entry / f"{split}.bin").stat().st_size != meta["ntokens"][split] * dtype.itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    streams = [_memmap_stream(entry / f"{s}.bin", dtype, meta["ntokens"][s], tokenizer) for s in _SPLITS]
    return TokenizedCorpus(streams[0], streams[1], dict(meta["documents"]), entry, from_cache=True)


def _discard(path: Path) -> None:
    """Remove a directory that another process may still be reading: rename it out of the way first."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, *, cache_dir: str | Path | None = None, num_proc: int = 0,
                    progress: bool = False) -> TokenizedCorpus:
    """The train and held-out token streams of `corpus`, from the cache in `cache_dir` when an entry exists.

    Args:
        corpus: from `sources.open_corpus`.
        tokenizer: any `Tokenizer`; its EOS precedes every document.
        cache_dir: where entries live; None tokenizes into memory and writes nothing.
        num_proc: tokenizer processes; 0 picks one per core (up to 8), and 1 for the byte tokenizer.
        progress: a tqdm bar over the documents while tokenizing.

    Example:
        >>> tc = tokenize_corpus(open_corpus("corpus.jsonl"), HFTokenizer("tokenizer.json"), cache_dir="cache/")
        >>> tc.train.tokens.dtype, tc.from_cache          # a second call: (torch.uint16, True)
    """
    dtype = _token_dtype(tokenizer.vocab_size)
    procs = _resolve_num_proc(num_proc, tokenizer)
    if cache_dir is None:
        arrays, _, ndocs = _tokenize(corpus, tokenizer, dtype, procs, progress, None)
        streams = [TokenStream(torch.from_numpy(a), tokenizer) for a in arrays]
        return TokenizedCorpus(streams[0], streams[1], ndocs, None, from_cache=False)

    cache_dir = Path(cache_dir)
    entry = cache_dir / f"{corpus.fingerprint[:20]}-{tokenizer_fingerprint(tokenizer)[:20]}"
    found = _read_entry(entry, tokenizer)
    if found is not None:
        return found
    if entry.exists():
        _discard(entry)  # an incomplete or older entry
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _, ntokens, ndocs = _tokenize(corpus, tokenizer, dtype, procs, progress, tmp)
        meta = {"version": _VERSION, "dtype": dtype.name, "eos_id": tokenizer.eos_id, "ntokens": ntokens,
                "documents": ndocs, "corpus": corpus.description, "corpus_fingerprint": corpus.fingerprint,
                "tokenizer": repr(tokenizer)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.exists():
                raise
            # another process renamed its entry into place first: read that one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    built = _read_entry(entry, tokenizer)
    if built is None:
        raise DataError(f"the token cache entry {entry} was written but cannot be read back")
    built.from_cache = False
    return built


def load_token_streams(data: str | Path | None, tokenizer: Tokenizer, *, val_fraction: float | None = 0.05,
                       token_cache: str | Path | None = "auto", num_proc: int = 0, streaming: bool = False,
                       text_column: str = "text", progress: bool = False) -> TokenizedCorpus:
    """Open the corpus at `data` (None = built-in Shakespeare) and return its token streams, cached on disk.

    Args:
        token_cache: "auto" (default_cache_dir()), a directory, or "off" / None (tokenize into memory). An
            "auto" directory that cannot be created falls back to memory with a warning.
        val_fraction, streaming, text_column: as `sources.open_corpus`; num_proc, progress: as `tokenize_corpus`.

    Example:
        >>> tc = load_token_streams("my_texts/", ByteTokenizer())           # tokenized once, then memory-mapped
        >>> tc.train.tokens.shape, tc.documents
    """
    corpus = open_corpus(data, val_fraction=val_fraction, streaming=streaming, text_column=text_column)
    cache_dir = None
    if token_cache == "auto":
        cache_dir = default_cache_dir()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            warnings.warn(f"cannot create the token cache {cache_dir} ({err.strerror or err}): tokenizing in memory; "
                          f"set {CACHE_ENV} to a writable directory to cache")
            cache_dir = None
    elif token_cache not in (None, "off"):
        cache_dir = Path(token_cache)
    result = tokenize_corpus(corpus, tokenizer, cache_dir=cache_dir, num_proc=num_proc, progress=progress)
    if val_fraction is not None and len(result.val) < 2:
        # found now, not after a whole training run whose final evaluation would have nothing to score
        raise DataError(f"{corpus.description}: the held-out split has {result.documents['val']} documents "
                        f"({len(result.val)} tokens) at val_fraction {val_fraction}: raise val_fraction or add data")
    return result
