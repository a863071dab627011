"""DNA: a streaming FASTA reader, a nucleotide tokenizer with reverse complements, genome token streams for
`mambakit train --task dna`, and the species-classification windows of the Mamba paper's Section 4.3.2.

Shapes (legend): B batch, L window length in bases, R records of a genome.

Reader (`iter_fasta`). FASTA / multi-FASTA, plain or compressed (.gz, .xz, .bz2 by suffix), read in pieces
of at most `chunk_bases` bases: memory stays constant whatever the size of a record or of a line (a 100 Mbp
chromosome written on one line included). A record starts at a line beginning with '>'; its name is the
header's first word. Lines starting with ';' are comments; blank lines, spaces, tabs and '\\r' are skipped.
Sequence letters are upper-cased (soft-masked repeats are lower case in UCSC / Ensembl genomes) and kept
otherwise as they are: runs of N (gaps of unknown bases) stay in place, so positions keep their meaning.

Tokenizer (`NucleotideTokenizer`), one token per base:

    id   0      1      2      3       4  5  6  7  8
         <eod>  <pad>  <cls>  <mask>  A  C  G  T  N

Every other letter (IUPAC ambiguity codes R, Y, K, M, S, W, B, D, H, V, and anything unexpected) reads as N;
case does not matter. <eod> separates records in a training stream (it is the tokenizer's eos_id); <pad>
pads ragged batches, <cls> and <mask> are kept for classification and masked pretraining. Reverse
complement: reverse the sequence and swap A<->T, C<->G (N and the specials map to themselves); DNA is double
stranded, so both readings are real sequences and make an exact data augmentation.

Genomes (`load_genome`, `genome_streams`). A genome is the token arrays of its records (uint8, one byte per
base: a 5 Mbp bacterial genome is 5 MB). The held-out part is the last `val_fraction` of every record, so
training and held-out bases never overlap.

Species windows (`SpeciesWindows`). Each species is a list of genome files; every record is cut into a
train region (the first 1 - test_fraction of it) and a test region (the rest), and a window of length L is
drawn uniformly from the regions of one split: a uniformly chosen species, then a record with probability
proportional to its usable length, then a start. Test windows never share a base with training windows.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .corpora import COMPRESSED_OPENERS, Document
from .errors import DataError

__all__ = [
    "FastaChunk", "iter_fasta", "read_fasta", "NucleotideTokenizer", "reverse_complement", "random_reverse_complement",
    "Genome", "load_genome", "genome_streams", "load_dna_corpus", "SpeciesWindows", "FASTA_SUFFIXES",
    "DEBIAN_GENOMES", "KLEBSIELLA_GENOMES", "debian_species", "genome_files",
]

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas")
_LINE_LIMIT = 1 << 16  # readline's cap: a longer line comes in pieces, so one-line genomes stay bounded
_HEADER_LIMIT = 1 << 16  # header text kept per record; the rest of an absurdly long header is dropped
_SKIP = b" \t\r\n"
_UPPER = bytes.maketrans(bytes(range(ord("a"), ord("z") + 1)), bytes(range(ord("A"), ord("Z") + 1)))

# Where Debian's `ragout-examples` package installs 16 complete bacterial genomes of 4 species, and
# `kleborate-examples` 4 Klebsiella pneumoniae genomes (.fna.xz), a close relative of E. coli (DATA.md).
DEBIAN_GENOMES = Path("/usr/share/doc/ragout/examples")
KLEBSIELLA_GENOMES = Path("/usr/share/doc/kleborate/examples/data")


@dataclass(frozen=True)
class FastaChunk:
    """A piece of one record: `record` (the header's first word), `offset` (of seq[0] in the record), `seq`
    (upper-case ASCII bases, no line breaks). `header` is the whole header line (without '>')."""

    record: str
    offset: int
    seq: bytes
    header: str = ""


def _open_binary(path: Path):
    opener = COMPRESSED_OPENERS.get(path.suffix.lower(), open)
    return opener(path, "rb")


def iter_fasta(path: str | Path, chunk_bases: int = 1 << 20) -> Iterator[FastaChunk]:
    """Stream the records of a FASTA file as chunks of at most `chunk_bases` bases, in constant memory.

    A record shorter than chunk_bases comes as one chunk; a record with no bases yields one empty chunk (so
    every header is seen). .gz, .xz and .bz2 files are decompressed on the fly.

    Raises:
        DataError: the file is missing or unreadable, holds sequence before its first '>' header, or has no
            record at all (the message names the file and, where it helps, the line).

    Example:
        >>> for chunk in iter_fasta("genome.fa.xz"):
        ...     print(chunk.record, chunk.offset, len(chunk.seq))
        chr1 0 1048576
        chr1 1048576 523211
    """
    if chunk_bases < 1:
        raise ValueError(f"iter_fasta: chunk_bases must be >= 1, got {chunk_bases}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"FASTA file not found: {path}")
    try:
        with _open_binary(path) as f:
            yield from _parse(f, path, chunk_bases)
    except (OSError, EOFError, lzma.LZMAError) as err:  # a truncated or corrupt archive (BadGzipFile is an OSError)
        raise DataError(f"{path}: cannot read ({err})") from err


def _parse(f, path: Path, chunk_bases: int) -> Iterator[FastaChunk]:
    name = header = None
    offset = 0
    buffer = bytearray()
    emitted = False  # whether the current record has yielded a chunk yet
    at_line_start, lineno = True, 0
    while True:
        piece = f.readline(_LINE_LIMIT)
        if not piece:
            break
        starts_line = at_line_start
        at_line_start = piece.endswith(b"\n")
        if starts_line:
            lineno += 1
            if piece[:1] == b">":
                if name is not None and (buffer or not emitted):
                    yield FastaChunk(name, offset, bytes(buffer), header)
                text = bytearray(piece)
                while not text.endswith(b"\n"):  # a header longer than one readline: keep its start only
                    more = f.readline(_LINE_LIMIT)
                    if not more:
                        break
                    if len(text) < _HEADER_LIMIT:
                        text += more
                    if more.endswith(b"\n"):
                        break
                at_line_start = True
                header = text[1:_HEADER_LIMIT].decode("utf-8", errors="replace").strip()
                name = header.split()[0] if header.split() else f"record{lineno}"
                offset, buffer, emitted = 0, bytearray(), False
                continue
            if piece[:1] == b";":
                while not at_line_start:  # skip the rest of a long comment line
                    more = f.readline(_LINE_LIMIT)
                    if not more:
                        break
                    at_line_start = more.endswith(b"\n")
                continue
        seq = piece.translate(_UPPER, _SKIP)
        if not seq:
            continue
        if name is None:
            raise DataError(f"{path}:{lineno}: FASTA sequence data before the first '>' header line")
        buffer += seq
        while len(buffer) >= chunk_bases:
            yield FastaChunk(name, offset, bytes(buffer[:chunk_bases]), header)
            offset += chunk_bases
            del buffer[:chunk_bases]
            emitted = True
    if name is None:
        raise DataError(f"{path}: no FASTA records (no line starts with '>')")
    if buffer or not emitted:
        yield FastaChunk(name, offset, bytes(buffer), header)


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(record name, upper-case sequence) of every record, whole, in file order: for small files (tests, primers).
    Genomes go through `iter_fasta` / `load_genome`, which never hold a record as text."""
    records: dict[str, list[bytes]] = {}
    order: list[str] = []
    for chunk in iter_fasta(path):
        if chunk.offset == 0:
            order.append(chunk.record)
            records.setdefault(chunk.record, [])
        records[chunk.record].append(chunk.seq)
    return [(name, b"".join(records[name]).decode("ascii", errors="replace")) for name in order]


# ---------------------------------------------------------------- tokenizer

_SPECIALS = ("<eod>", "<pad>", "<cls>", "<mask>")
_BASES = "ACGTN"
EOD, PAD, CLS, MASK = range(4)
A, C, G, T, N = range(4, 9)
_ENCODE = np.full(256, N, dtype=np.uint8)  # byte -> id; anything unexpected is N
for _i, _b in enumerate(_BASES):
    _ENCODE[ord(_b)] = _ENCODE[ord(_b.lower())] = 4 + _i
_DECODE = np.frombuffer(b"\x00\x00\x00\x00" + _BASES.encode(), dtype=np.uint8).copy()  # id -> byte (specials: none)
_COMPLEMENT = np.arange(256, dtype=np.uint8)
_COMPLEMENT[[A, C, G, T]] = [T, G, C, A]


class NucleotideTokenizer:
    """One token per base: vocab 9 (<eod> <pad> <cls> <mask> A C G T N), eos_id 0; see the module docstring.

    Follows mambakit.data.Tokenizer (encode, decode, count_bytes, save); `encode_array` is the fast path for
    genomes (NumPy, no Python int per base).

    Example:
        >>> tok = NucleotideTokenizer()
        >>> tok.encode("ACgtNR")
        [4, 5, 6, 7, 8, 8]
        >>> tok.decode(tok.reverse_complement(tok.encode("AACG")))
        'CGTT'
    """

    vocab_size: int = 9
    eos_id: int | None = EOD
    pad_id: int | None = PAD
    cls_id: int = CLS
    mask_id: int = MASK
    bos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    special_tokens: dict[str, str] | None = None
    chat_template: str | None = None

    def encode_array(self, seq: bytes | str) -> np.ndarray:
        """(len(seq),) uint8 ids of an ASCII sequence."""
        raw = seq.encode("ascii", errors="replace") if isinstance(seq, str) else seq
        return _ENCODE[np.frombuffer(raw, dtype=np.uint8)]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """Bases as letters; special tokens are dropped (they are not sequence)."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"NucleotideTokenizer.decode: ids must lie in [0, {self.vocab_size}), got "
                             f"{int(arr.min())}..{int(arr.max())}")
        arr = arr[arr >= A]
        return _DECODE[arr].tobytes().decode("ascii")

    def count_bytes(self, ids) -> int:
        # one base is one byte of FASTA sequence (and <eod> counts as one, as the byte tokenizer's separator):
        # bits per byte is bits per base
        return len(ids)

    def reverse_complement(self, ids):
        """The reverse complement of a list, array or (..., L) tensor of ids (the same type back)."""
        return reverse_complement(ids)

    def save(self, directory: str | Path) -> None:
        from .tokenizers import TOKENIZER_CONFIG

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps({"type": "nucleotides"}, indent=2) + "\n")

    def __repr__(self) -> str:
        return "NucleotideTokenizer(vocab_size=9, eos_id=0)"


def reverse_complement(ids):
    """Reverse complement of token ids along the last axis: a (..., L) tensor, a NumPy array or a list.

    Example:
        >>> reverse_complement(torch.tensor([[4, 4, 5, 8]]))      # AACN -> NGTT
        tensor([[8, 6, 7, 7]])
    """
    if isinstance(ids, torch.Tensor):
        table = torch.from_numpy(_COMPLEMENT).to(device=ids.device, dtype=ids.dtype if ids.dtype != torch.uint8
                                                 else torch.uint8)
        return table[ids.long()].flip(-1)
    if isinstance(ids, np.ndarray):
        return _COMPLEMENT[ids][..., ::-1].astype(ids.dtype)
    return [int(_COMPLEMENT[i]) for i in reversed(ids)]


def random_reverse_complement(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Replace each row of a (B, L) batch of ids by its reverse complement with probability p (augmentation).

    The coin flips come from `generator` (CPU), so a seeded batch is the same on every device.
    """
    if batch.dim() != 2:
        raise ValueError(f"random_reverse_complement: batch must be (batch, seqlen), got {tuple(batch.shape)}")
    flip = (torch.rand(batch.shape[0], generator=generator) < p).to(batch.device)  # (B,)
    return torch.where(flip[:, None], reverse_complement(batch), batch)


# ---------------------------------------------------------------- genomes

@dataclass
class Genome:
    """The records of one or more FASTA files as token arrays: names[i] and tokens[i] ((length,) uint8)."""

    names: list[str] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(t.size for t in self.tokens)


def _fasta_files(path: Path) -> list[Path]:
    def is_fasta(p: Path) -> bool:
        suffixes = [s.lower() for s in p.suffixes]
        if suffixes and suffixes[-1] in COMPRESSED_OPENERS:
            suffixes = suffixes[:-1]
        return bool(suffixes) and suffixes[-1] in FASTA_SUFFIXES

    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"genome path not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_fasta(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no FASTA files inside (expected {' '.join(FASTA_SUFFIXES)}, optionally .gz/.xz/.bz2)")
    return files


def load_genome(paths: str | Path | Sequence[str | Path], min_length: int = 1) -> Genome:
    """Token arrays of every record of the FASTA files at `paths` (files or directories, searched recursively).

    Records shorter than `min_length` bases are skipped (plasmids and short contigs, for window tasks).
    Peak memory is the genome's size in bytes plus one chunk.

    Example:
        >>> genome = load_genome("/usr/share/doc/ragout/examples/E.Coli/references")
        >>> genome.names[:1], len(genome)
        (['NC_000913.3'], 9239033)
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tokenizer = NucleotideTokenizer()
    genome = Genome()
    for path in paths:
        for file in _fasta_files(Path(path)):
            pieces: list[np.ndarray] = []
            current = None
            for chunk in iter_fasta(file):
                if chunk.offset == 0 and current is not None:
                    _add_record(genome, f"{file.name}:{current}", pieces, min_length)
                    pieces = []
                current = chunk.record
                pieces.append(tokenizer.encode_array(chunk.seq))
            _add_record(genome, f"{file.name}:{current}", pieces, min_length)
    if not genome.tokens:
        raise DataError(f"{', '.join(map(str, paths))}: no record of at least {min_length} bases")
    return genome


def _add_record(genome: Genome, name: str, pieces: list[np.ndarray], min_length: int) -> None:
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    if tokens.size >= max(min_length, 1):
        genome.names.append(name)
        genome.tokens.append(tokens)


def genome_streams(genome: Genome, val_fraction: float = 0.05, reverse_complement_train: bool = True):
    """(train, held-out) `TokenStream`s of a genome: <eod> before every record, the held-out part being the last
    `val_fraction` of each record. With reverse_complement_train the training stream also holds the reverse
    complement of every training region, so a random window is either strand with equal probability (the
    reverse-complement augmentation, done once in the data rather than per batch).

    Example:
        >>> train, val = genome_streams(load_genome("genome.fa.gz"), val_fraction=0.05)
        >>> train.tokens.dtype, train.tokenizer
        (torch.uint8, NucleotideTokenizer(vocab_size=9, eos_id=0))
    """
    from .stream import TokenStream

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"genome_streams: val_fraction must be in (0, 1), got {val_fraction}")
    tokenizer = NucleotideTokenizer()
    eod = np.array([EOD], dtype=np.uint8)
    train_parts, val_parts = [], []
    for tokens in genome.tokens:
        cut = int(round(tokens.size * (1.0 - val_fraction)))
        train_parts += [eod, tokens[:cut]]
        if reverse_complement_train:
            train_parts += [eod, reverse_complement(tokens[:cut])]
        if cut < tokens.size:
            val_parts += [eod, tokens[cut:]]
    as_stream = lambda parts: TokenStream(torch.from_numpy(np.concatenate(parts) if parts else  # noqa: E731
                                                           np.zeros(0, dtype=np.uint8)), tokenizer)
    return as_stream(train_parts), as_stream(val_parts)


def load_dna_corpus(path: str | Path | None, val_fraction: float = 0.05):
    """What `mambakit train --task dna` trains on: (tokenizer, (train record names, held-out record names),
    train stream, held-out stream) of the FASTA files at `path` (the Debian genomes when None).

    The tuple has the shape of the training loop's text loader, so the task changes only the data source and
    the tokenizer.
    """
    if path is None:
        if not DEBIAN_GENOMES.is_dir():
            raise DataError(f"--task dna needs FASTA files: give --data PATH (.fa/.fasta/.fna, optionally .gz/.xz), "
                            f"or install Debian's bacterial genomes (apt-get install ragout-examples: {DEBIAN_GENOMES})")
        path = DEBIAN_GENOMES
    genome = load_genome(genome_files(path))  # ragout: references, not draft contigs
    train, val = genome_streams(genome, val_fraction)
    names = [Document(name, "") for name in genome.names]  # one document per record, for the run's log line
    return train.tokenizer, (names, [Document(f"{d.name}#tail", "") for d in names]), train, val


def debian_species(root: str | Path = DEBIAN_GENOMES,
                   klebsiella: str | Path | None = KLEBSIELLA_GENOMES) -> dict[str, list[Path]]:
    """{species name: its genome files}: the species folders of Debian's ragout-examples (E.Coli, H.Pylori,
    S.Aureus, V.Cholerae; complete reference genomes only, draft contigs left out), plus "K.Pneumoniae" from
    kleborate-examples when `klebsiella` is a directory (the species closest to E. coli here: the hard pair).
    A folder of `root` without a references/ subfolder is a species of its own FASTA files, so a copy of the
    ragout folders with a K.Pneumoniae folder beside them (a machine without the Debian packages) gives all five.
    Raises DataError with the install command when ragout-examples is absent."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no genomes at {root}: install them with `apt-get install ragout-examples "
                        "kleborate-examples` (Debian; 20 bacterial genomes of 5 species), or pass your own FASTA files")
    species = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / "references").is_dir():
            files = sorted((d / "references").glob("*.fasta*"))
        else:
            try:
                files = _fasta_files(d)
            except DataError:  # no FASTA inside: not a species
                files = []
        if files:
            species[d.name] = files
    if not species:
        raise DataError(f"{root}: no <species>/references/*.fasta* files")
    if klebsiella is not None and Path(klebsiella).is_dir() and "K.Pneumoniae" not in species:
        species["K.Pneumoniae"] = _fasta_files(Path(klebsiella))
    return species


def genome_files(path: str | Path) -> Path | list[Path]:
    """What `load_genome` should read for a pretraining corpus at `path`: a folder in ragout-examples' layout
    (<species>/references/) gives its complete references only, not the draft contigs beside them (those re-assemble
    the references' own strains, so their held-out tails would be in the references' training part); anything
    else is returned as it is."""
    path = Path(path)
    if is_ragout_layout(path):
        return [f for files in debian_species(path, klebsiella=None).values() for f in files]
    return path


def is_ragout_layout(path: str | Path) -> bool:
    """Whether `path` is a folder in ragout-examples' layout: some <species>/references/ folder inside it."""
    path = Path(path)
    return path.is_dir() and any((d / "references").is_dir() for d in path.iterdir() if d.is_dir())


# ---------------------------------------------------------------- species classification

class SpeciesWindows:
    """Random windows of several species' genomes with their species label, from disjoint train / test regions.

    Args:
        genomes: {species name: Genome}; labels follow the dict's order.
        test_fraction: the tail share of every record that only test windows read.
        max_n_fraction: windows with a larger share of N bases are drawn again (gaps say nothing of a species).

    Example:
        >>> data = SpeciesWindows({"E.Coli": load_genome(ecoli_files), "H.Pylori": load_genome(hp_files)})
        >>> ids, labels = data.sample("train", batch_size=8, length=1024, generator=torch.Generator().manual_seed(0))
        >>> ids.shape, labels.shape                       # (8, 1024) int64 ids, (8,) int64 species
    """

    def __init__(self, genomes: dict[str, Genome], test_fraction: float = 0.2, max_n_fraction: float = 0.1):
        if len(genomes) < 2:
            raise ValueError(f"SpeciesWindows: need at least 2 species, got {len(genomes)}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"SpeciesWindows: test_fraction must be in (0, 1), got {test_fraction}")
        self.species = list(genomes)
        self.max_n_fraction = max_n_fraction
        # regions[split][label] = list of (record tokens, start, end) with [start, end) the split's bases
        self.regions: dict[str, list[list[tuple[np.ndarray, int, int]]]] = {"train": [], "test": []}
        for name in self.species:
            train, test = [], []
            for tokens in genomes[name].tokens:
                cut = int(tokens.size * (1.0 - test_fraction))
                train.append((tokens, 0, cut))
                test.append((tokens, cut, tokens.size))
            self.regions["train"].append(train)
            self.regions["test"].append(test)

    @property
    def num_classes(self) -> int:
        return len(self.species)

    def max_length(self, split: str) -> int:
        """The longest window every species can provide in `split`."""
        return min(max(end - start for _, start, end in regions) for regions in self.regions[split])

    def sample(self, split: str, batch_size: int, length: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) int64, labels (B,) int64): B windows of `length` bases of `split` ("train" or "test")."""
        if split not in self.regions:
            raise ValueError(f"SpeciesWindows.sample: split must be 'train' or 'test', got {split!r}")
        if length > self.max_length(split):
            raise ValueError(f"SpeciesWindows.sample: length {length} exceeds the longest {split} region every "
                             f"species has ({self.max_length(split)} bases)")
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        rows = [self._window(self.regions[split][int(label)], length, generator) for label in labels]
        return torch.from_numpy(np.stack(rows)).long(), labels

    def _window(self, regions, length: int, generator: torch.Generator) -> np.ndarray:
        usable = [(tokens, start, end) for tokens, start, end in regions if end - start >= length]
        weights = torch.tensor([end - start - length + 1 for _, start, end in usable], dtype=torch.float64)
        for _ in range(100):
            tokens, start, end = usable[int(torch.multinomial(weights, 1, generator=generator))]
            offset = start + int(torch.randint(0, end - start - length + 1, (1,), generator=generator))
            window = tokens[offset:offset + length]
            if np.count_nonzero(window == N) <= self.max_n_fraction * length:
                return window
        return window  # a genome of mostly N: take what there is rather than loop forever
