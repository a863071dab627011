"""Data layer: tokenizers (bytes, Hugging Face), corpora (each file type and its errors), streams and windows."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

from mambakit.data import (
    SHAKESPEARE_HELD_OUT,
    ByteTokenizer,
    DataError,
    Document,
    HFTokenizer,
    IncrementalDecoder,
    RandomWindows,
    TokenStream,
    eval_target_count,
    eval_windows,
    load_corpus,
    load_documents,
    load_tokenizer,
    segment_windows,
    shakespeare_documents,
    split_documents,
)

TEXTS = [
    pytest.param("To be, or not to be: that is the question.", id="ascii"),
    pytest.param("Élan — naïve café, 東京, 🐍\n\ttabs", id="multibyte"),
    pytest.param("", id="empty"),
]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A small byte-level BPE tokenizer.json trained here (no hub), with <|endoftext|> as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer"] * 50
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.count_bytes(ids) == len(text.encode("utf-8"))


def test_byte_tokenizer_decodes_invalid_utf8_with_replacement():
    assert ByteTokenizer().decode([104, 0xFF, 105]) == "h\ufffdi"


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_round_trip(bpe_path, text):
    tok = HFTokenizer(bpe_path)
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.count_bytes(ids) == len(text.encode("utf-8"))


def test_hf_tokenizer_counts_eos_as_one_byte(bpe_path):
    tok = HFTokenizer(bpe_path)
    a, b = "To be", "né"
    ids = [tok.eos_id] + tok.encode(a) + [tok.eos_id] + tok.encode(b)
    assert tok.count_bytes(ids) == 2 + len(a.encode()) + len(b.encode())


def test_tokenizers_save_and_load(tmp_path, bpe_path):
    ByteTokenizer().save(tmp_path / "bytes")
    loaded = load_tokenizer(tmp_path / "bytes")
    assert isinstance(loaded, ByteTokenizer)
    assert json.loads((tmp_path / "bytes" / "tokenizer_config.json").read_text()) == {"type": "bytes"}

    original = HFTokenizer(bpe_path)
    original.save(tmp_path / "hf")
    loaded = load_tokenizer(tmp_path / "hf")
    assert isinstance(loaded, HFTokenizer)
    text = "Whether 'tis nobler in the mind"
    assert loaded.encode(text) == original.encode(text)
    assert (loaded.vocab_size, loaded.eos_id) == (original.vocab_size, original.eos_id)


@pytest.mark.parametrize("setup, message", [
    pytest.param("empty", "no tokenizer_config.json or tokenizer.json", id="missing"),
    pytest.param("unknown-type", "unknown tokenizer type 'wordpiece-v0'", id="unknown-type"),
    pytest.param("bad-json", "expected a JSON object", id="bad-json"),
])
def test_load_tokenizer_errors(tmp_path, setup, message):
    if setup == "unknown-type":
        (tmp_path / "tokenizer_config.json").write_text('{"type": "wordpiece-v0"}')
    elif setup == "bad-json":
        (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match=message):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_missing_package_is_a_clear_error(monkeypatch, bpe_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(DataError, match="pip install tokenizers"):
        HFTokenizer(bpe_path)


@pytest.mark.parametrize("kind", [pytest.param("bytes", id="bytes"), pytest.param("hf", id="hf")])
def test_incremental_decoder_never_prints_half_characters(bpe_path, kind):
    tok = ByteTokenizer() if kind == "bytes" else HFTokenizer(bpe_path)
    text = "né 東京 🐍 to be"
    pieces = []
    dec = IncrementalDecoder(tok)
    for t in tok.encode(text):
        pieces.append(dec.push(t))
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# ---------------------------------------------------------------- corpora

def test_text_markdown_and_gz_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "b.md").write_text("# Title\n")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("gamma")
    assert load_documents(tmp_path / "a.txt") == [Document("a.txt", "alpha\nbeta\n")]
    assert [d.text for d in load_documents(tmp_path / "b.md")] == ["# Title\n"]
    assert [d.text for d in load_documents(tmp_path / "c.txt.gz")] == ["gamma"]


def test_jsonl_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\u2028lines"}\n')
    docs = load_documents(path)
    assert [d.text for d in docs] == ["one", "two\u2028lines"]
    assert docs[0].name == f"{Path(path).name}:1" and docs[1].name == f"{Path(path).name}:3"


@pytest.mark.parametrize("content, message", [
    pytest.param('{"text": "ok"}\n{"body": "no text"}\n', r"d\.jsonl:2: no \"text\" field", id="missing-text"),
    pytest.param('{"text": "ok"}\n{"text": 5}\n', r"d\.jsonl:2: the \"text\" field is int", id="non-string"),
    pytest.param('{"text": "ok"}\n{broken\n', r"d\.jsonl:2: not valid JSON", id="bad-json"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_documents(path)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_documents(path)


@pytest.mark.parametrize("suffix", [pytest.param(".fa", id="fa"), pytest.param(".fasta.gz", id="fasta-gz"),
                                    pytest.param(".fna", id="fna")])
def test_fasta_records_are_documents(tmp_path, suffix):
    content = ">chr1 description\nACGT\nacgn\n;comment\n\n>chr2\nTTTT\n"
    path = tmp_path / f"g{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(content)
    else:
        path.write_text(content)
    docs = load_documents(path)
    assert [(d.name, d.text) for d in docs] == [(f"{Path(path).name}:chr1", "ACGTacgn"), (f"{Path(path).name}:chr2", "TTTT")]


@pytest.mark.parametrize("suffix, content, texts", [
    pytest.param(".fa.xz", ">chr1 x\nACGT\n>chr2\nTT\n", ["ACGT", "TT"], id="fa-xz"),
    pytest.param(".fna.bz2", ">chr1 x\nACGT\n>chr2\nTT\n", ["ACGT", "TT"], id="fna-bz2"),
    pytest.param(".txt.xz", "alpha\n", ["alpha\n"], id="txt-xz"),
    pytest.param(".jsonl.bz2", '{"text": "one"}\n', ["one"], id="jsonl-bz2"),
])
def test_xz_and_bz2_files_are_read_as_gz_files_are(tmp_path, suffix, content, texts):
    """`mambakit train --data genome.fa.xz` (no --task dna) reads through load_documents: .xz and .bz2 are
    decompressed by suffix as .gz is, given alone and found inside a directory."""
    import bz2
    import lzma

    opener = lzma.open if suffix.endswith(".xz") else bz2.open
    path = tmp_path / "data" / f"g{suffix}"
    path.parent.mkdir()
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(content)
    assert [d.text for d in load_documents(path)] == texts
    assert [d.text for d in load_documents(path.parent)] == texts


@pytest.mark.parametrize("suffix", [pytest.param(".fa.xz", id="xz"), pytest.param(".fa.bz2", id="bz2")])
def test_corrupt_xz_or_bz2_file_is_a_data_error(tmp_path, suffix):
    path = tmp_path / f"g{suffix}"
    path.write_bytes(b"not compressed at all")
    with pytest.raises(DataError, match=r"cannot read"):
        load_documents(path)


def test_fasta_without_header_is_an_error(tmp_path):
    (tmp_path / "g.fa").write_text("ACGT\n>chr1\nAC\n")
    with pytest.raises(DataError, match=r"g\.fa:1: FASTA sequence data before the first '>'"):
        load_documents(tmp_path / "g.fa")


def test_directory_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "A"}\n')
    (tmp_path / "sub" / "c.fa").write_text(">x\nCC\n")
    (tmp_path / "notes.csv").write_text("ignored")
    (tmp_path / ".hidden" / "secret.txt").write_text("ignored")
    (tmp_path / "empty.txt").write_text("")
    assert [d.text for d in load_documents(tmp_path)] == ["B", "A", "CC"]


@pytest.mark.parametrize("setup, message", [
    pytest.param("missing", "data path not found", id="missing-path"),
    pytest.param("unsupported", r"unsupported file type '\.csv'", id="unsupported-suffix"),
    pytest.param("empty-dir", "no supported files inside", id="empty-directory"),
    pytest.param("not-utf8", "not UTF-8 text", id="not-utf8"),
])
def test_load_documents_errors(tmp_path, setup, message):
    path = tmp_path / "x"
    if setup == "unsupported":
        path = tmp_path / "x.csv"
        path.write_text("a,b")
    elif setup == "empty-dir":
        path.mkdir()
        (path / "readme.csv").write_text("a")
    elif setup == "not-utf8":
        path = tmp_path / "x.txt"
        path.write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(DataError, match=message):
        load_documents(path)


def test_shakespeare_corpus_and_its_held_out_plays():
    docs = shakespeare_documents()
    names = [d.name for d in docs]
    assert len(docs) == 38 and names == sorted(names)
    assert set(SHAKESPEARE_HELD_OUT) <= set(names)
    train, val = load_corpus()
    assert [d.name for d in val] == sorted(SHAKESPEARE_HELD_OUT)
    assert not {d.name for d in train} & {d.name for d in val}
    assert len(train) + len(val) == len(docs)
    assert val[0].text.startswith("# ")


def _docs(n: int) -> list[Document]:
    return [Document(f"doc{i:02d}", f"document {i} " * (10 + i)) for i in range(n)]


def test_split_documents_holds_out_whole_documents_deterministically():
    docs = _docs(40)
    train, val = split_documents(docs, val_fraction=0.1)
    assert split_documents(docs, 0.1) == (train, val)
    assert {d.name for d in train}.isdisjoint(d.name for d in val) and len(train) + len(val) == len(docs)
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in docs)
    assert 0.1 <= share <= 0.2
    # the choice depends on names, not order
    train_r, val_r = split_documents(list(reversed(docs)), val_fraction=0.1)
    assert {d.name for d in val_r} == {d.name for d in val}


def test_split_single_document_holds_out_its_tail():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = split_documents([Document("novel", text)], val_fraction=0.05)
    assert train[0].text + val[0].text == text
    assert val[0].text.startswith("line ") and train[0].text.endswith("\n")
    assert 0.04 < len(val[0].text) / len(text) < 0.06


# ---------------------------------------------------------------- streams and windows

def test_stream_layout_puts_eos_before_every_document():
    stream = TokenStream.from_documents([Document("a", "hi"), Document("b", "é")], ByteTokenizer())
    assert stream.tokens.dtype == torch.uint8
    assert stream.tokens.tolist() == [0, 104, 105, 0, 0xC3, 0xA9]


def test_hf_stream_uses_the_tokenizer_eos(bpe_path):
    tok = HFTokenizer(bpe_path)
    docs = [Document("a", "To be"), Document("b", "the question")]
    stream = TokenStream.from_documents(docs, tok)
    assert stream.tokens.dtype == torch.int32
    assert stream.tokens.tolist() == [tok.eos_id] + tok.encode("To be") + [tok.eos_id] + tok.encode("the question")


@pytest.fixture
def counting_stream():
    """A stream whose token at position i is i % 251, so a window's start is readable from its first token."""
    return TokenStream((torch.arange(5000) % 251).to(torch.uint8), ByteTokenizer())


def test_random_windows_shape_contiguity_and_determinism(counting_stream):
    a = RandomWindows(counting_stream, seqlen=32, batch_size=6, seed=7)
    b = RandomWindows(counting_stream, seqlen=32, batch_size=6, seed=7)
    c = RandomWindows(counting_stream, seqlen=32, batch_size=6, seed=8)
    batches_a = [a.next_batch() for _ in range(3)]
    batches_b = [b.next_batch() for _ in range(3)]
    assert all(x.shape == (6, 33) and x.dtype == torch.int64 for x in batches_a)
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not torch.equal(batches_a[0], c.next_batch())
    diffs = (batches_a[0][:, 1:] - batches_a[0][:, :-1]) % 251
    assert bool((diffs == 1).all()), "each window must be a contiguous slice of the stream"


def test_random_windows_ranks_split_the_global_batch(counting_stream):
    single = RandomWindows(counting_stream, seqlen=16, batch_size=8, seed=3)
    ranks = [RandomWindows(counting_stream, seqlen=16, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        assert torch.equal(single.next_batch(), torch.cat([r.next_batch() for r in ranks]))


def test_random_windows_state_dict_resumes_the_sequence(counting_stream):
    a = RandomWindows(counting_stream, seqlen=16, batch_size=4, seed=0)
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()
    b = RandomWindows(counting_stream, seqlen=16, batch_size=4, seed=123)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(), expected)


def test_random_windows_rejects_a_too_short_stream():
    with pytest.raises(DataError, match="fewer than seqlen"):
        RandomWindows(TokenStream(torch.zeros(10, dtype=torch.uint8), ByteTokenizer()), seqlen=10, batch_size=1, seed=0)


@pytest.mark.parametrize("n, seqlen, batch, max_tokens", [
    pytest.param(101, 10, 4, None, id="exact-multiple"),
    pytest.param(107, 10, 4, None, id="short-tail"),
    pytest.param(107, 10, 3, 45, id="max-tokens"),
])
def test_eval_windows_cover_every_target_once_in_order(n, seqlen, batch, max_tokens):
    stream = TokenStream(torch.arange(n, dtype=torch.int32), ByteTokenizer())
    windows = list(eval_windows(stream, seqlen, batch, max_tokens))
    assert all(w.shape[0] <= batch and w.shape[1] <= seqlen + 1 for w in windows)
    targets = torch.cat([w[:, 1:].reshape(-1) for w in windows])
    inputs_first = torch.cat([w[:, :1].reshape(-1) for w in windows])
    count = eval_target_count(stream, max_tokens)
    assert targets.tolist() == list(range(1, count + 1))
    assert bool((inputs_first % seqlen == 0).all())


def test_eval_windows_ranks_partition_the_windows():
    stream = TokenStream(torch.arange(95, dtype=torch.int32), ByteTokenizer())
    parts = [list(eval_windows(stream, 10, 2, rank=r, world_size=3)) for r in range(3)]
    targets = sorted(t for part in parts for w in part for t in w[:, 1:].reshape(-1).tolist())
    assert targets == list(range(1, 95))


@pytest.mark.parametrize("n, seqlen, batch, world, max_tokens", [
    pytest.param(101, 10, 4, 1, None, id="one-rank"),
    pytest.param(107, 10, 3, 2, None, id="two-ranks"),
    pytest.param(107, 4, 8, 1, 45, id="max-tokens"),
    pytest.param(6, 10, 4, 1, None, id="shorter-than-a-window"),
])
def test_segment_windows_give_each_row_a_contiguous_run_that_continues_from_window_to_window(n, seqlen, batch, world,
                                                                                             max_tokens):
    """Every target once; row r of each window continues row r of the window before (what a carried state needs);
    the ranks' rows partition the segments; padding past a segment's end is never scored."""
    stream = TokenStream(torch.arange(n, dtype=torch.int32), ByteTokenizer())
    scored = []
    for rank in range(world):
        windows = list(segment_windows(stream, seqlen, batch, max_tokens, rank=rank, world_size=world))
        assert all(i.shape == t.shape and i.shape[0] <= batch and i.shape[1] <= seqlen for i, t in windows)
        rows = windows[0][0].shape[0]
        for r in range(rows):
            ins = torch.cat([i[r] for i, t in windows])
            outs = torch.cat([t[r] for i, t in windows])
            real = outs != -100
            assert bool(real[:int(real.sum())].all())  # padding only at the end of a row
            assert torch.equal(outs[real], ins[real] + 1)  # each target is the next token of its input
            run = ins[real]
            assert torch.equal(run, torch.arange(int(run[0]), int(run[0]) + len(run)))  # contiguous across windows
            scored += outs[real].tolist()
    assert sorted(scored) == list(range(1, eval_target_count(stream, max_tokens) + 1))


def test_train_and_held_out_streams_share_no_document(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"unique-{i:02d}-" + "x" * (100 + 7 * i))
    train_docs, val_docs = load_corpus(tmp_path, val_fraction=0.1)
    tok = ByteTokenizer()
    train = bytes(TokenStream.from_documents(train_docs, tok).tokens.tolist())
    val = bytes(TokenStream.from_documents(val_docs, tok).tokens.tolist())
    held = [f"unique-{i:02d}-".encode() for i in range(30) if f"unique-{i:02d}-".encode() in val]
    assert held and all(marker not in train for marker in held)
    assert len(held) + sum(f"unique-{i:02d}-".encode() in train for i in range(30)) == 30


@pytest.mark.parametrize("kind", ["files", "datasets"])
def test_the_held_out_split_does_not_depend_on_how_the_corpus_path_is_written(tmp_path, monkeypatch, kind):
    """Relative or absolute, moved or copied: the same documents are held out (their names are relative to the
    corpus root), so runs on the same data are scored on the same text."""
    from mambakit.data.sources import open_corpus

    def make(root):
        root.mkdir(parents=True)
        texts = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
        if kind == "files":
            for i, text in enumerate(texts):
                (root / f"sub{i % 3}").mkdir(exist_ok=True)
                (root / f"sub{i % 3}" / f"d{i:02d}.txt").write_text(text)
        else:
            import datasets

            datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root))

    make(tmp_path / "a" / "corpus")
    make(tmp_path / "elsewhere" / "copy")
    monkeypatch.chdir(tmp_path / "a")

    def held(path):
        corpus = open_corpus(path, val_fraction=0.2)
        return corpus.fingerprint, sorted(d.name for d, h in corpus.documents() if h)

    absolute = held(tmp_path / "a" / "corpus")
    assert absolute[1] and all(not n.startswith(str(tmp_path)) for n in absolute[1])
    assert held("corpus") == held("./corpus/") == absolute == held(tmp_path / "elsewhere" / "copy")
