"""Data at scale: packed documents with seq_idx, the on-disk token cache, `datasets` directories and streaming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mambakit.data import (
    ByteTokenizer,
    DataError,
    Document,
    HFTokenizer,
    TokenStream,
    load_corpus,
    load_documents,
    load_token_streams,
    open_corpus,
    seq_idx_from_eos,
    split_window,
    tokenize_corpus,
)
from mambakit.data import token_cache as token_cache_module
from mambakit.evaluation import evaluate_bits_per_byte, token_nll_sum
from mambakit.models import MambaConfig, MambaLM
from tests.helpers import assert_close

LAYERS = [pytest.param("Mamba1", id="mamba1"), pytest.param("Mamba2", id="mamba2")]
EOS = 0


def _model(layer: str, vocab: int = 64) -> MambaLM:
    ssm = {"layer": layer, "d_state": 8}
    if layer == "Mamba2":
        ssm.update(headdim=16, chunk_size=8)  # chunks of 8: documents start mid-chunk and span chunks
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, ssm_cfg=ssm)).eval()


def _documents(lengths: list[int], vocab: int = 64) -> list[torch.Tensor]:
    """Token documents, each EOS + body (bodies avoid EOS)."""
    g = torch.Generator().manual_seed(1)
    return [torch.cat([torch.tensor([EOS]), torch.randint(1, vocab, (n,), generator=g)]) for n in lengths]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A small byte-level BPE tokenizer.json trained here (no hub), with <|endoftext|> as its EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "to be or not to be"] * 50, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def _texts(n: int = 30) -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "to", "be", "or", "not", "é", "東京"]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 11)) for i in range(n)]


def _jsonl_corpus(directory, texts: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    half = len(texts) // 2
    for name, part in (("a.jsonl", texts[:half]), ("b.jsonl", texts[half:])):
        (directory / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return str(directory)


# ---------------------------------------------------------------- packing with seq_idx

def test_seq_idx_counts_documents_from_each_eos():
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
    assert seq_idx_from_eos(ids, eos_id=0).tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]
    assert seq_idx_from_eos(ids, eos_id=0).dtype == torch.int32
    batch = split_window(torch.tensor([[4, 0, 5, 6]]), eos_id=0)
    assert batch.inputs.tolist() == [[4, 0, 5]] and batch.targets.tolist() == [[0, 5, 6]]
    assert batch.seq_idx.tolist() == [[0, 1, 1]]
    assert split_window(torch.tensor([[4, 0, 5, 6]]), eos_id=None).seq_idx is None
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \(batch, seqlen\), got torch.float32 "
                                         r"\(3,\)"):
        seq_idx_from_eos(torch.zeros(3), eos_id=0)


@pytest.mark.parametrize("layer", LAYERS)
def test_packing_with_seq_idx_equals_each_document_alone(layer):
    model = _model(layer)
    # two rows, each several documents; lengths cross the conv width (4) and the SSD chunk (8) both ways
    rows = [_documents([5, 1, 17, 9]), _documents([2, 30, 3])]
    width = max(sum(d.numel() for d in docs) for docs in rows)
    packed = torch.full((2, width), EOS, dtype=torch.long)
    for r, docs in enumerate(rows):
        flat = torch.cat(docs)
        packed[r, :flat.numel()] = flat  # the tail of a short row is one more (EOS-only) document
    seq_idx = seq_idx_from_eos(packed, EOS)
    with torch.no_grad():
        logits = model(packed, seq_idx=seq_idx)  # (2, width, V)
        unpacked = model(packed)
    for r, docs in enumerate(rows):
        start = 0
        for k, doc in enumerate(docs):
            with torch.no_grad():
                alone = model(doc[None])[0]  # (len, V), from an empty state
            assert_close(logits[r, start:start + doc.numel()], alone, name=f"row {r} document {k}")
            start += doc.numel()
    # without seq_idx the second document reads the first one's state: the comparison above is not vacuous
    second = slice(rows[0][0].numel(), rows[0][0].numel() + rows[0][1].numel())
    assert (unpacked[0, second] - logits[0, second]).abs().max() > 1e-3


@pytest.mark.parametrize("layer", LAYERS)
def test_packed_gradients_equal_the_sum_over_documents_alone(layer):
    model = _model(layer)
    docs = _documents([6, 11, 4])
    packed = torch.cat(docs)[None]  # (1, L)
    batch = split_window(torch.cat([packed, torch.tensor([[EOS]])], dim=1), EOS)
    loss = token_nll_sum(model(batch.inputs, seq_idx=batch.seq_idx), batch.targets, 64)
    packed_grads = torch.autograd.grad(loss, list(model.parameters()))
    # each document alone predicts its body and then the next document's EOS (the end of this one)
    total = sum(token_nll_sum(model(d[None]), torch.cat([d[1:], torch.tensor([EOS])])[None], 64) for d in docs)
    alone_grads = torch.autograd.grad(total, list(model.parameters()))
    assert_close(loss, total, name="loss")
    for (name, _), a, b in zip(model.named_parameters(), packed_grads, alone_grads):
        assert_close(a, b, name=name)


def test_evaluation_resets_at_each_document_like_training():
    model = _model("Mamba2", vocab=256)
    docs = [Document(str(i), t) for i, t in enumerate(["to be or not", "the rest", "is silence, and more"])]
    stream = TokenStream.from_documents(docs, ByteTokenizer())
    n = len(stream) - 1
    nats, _ = evaluate_bits_per_byte(model, stream, seqlen=n, batch_size=1)  # one window holds every document
    # independent: each document alone from an empty state, predicting its bytes and the next separator
    total = 0.0
    with torch.no_grad():
        for k, d in enumerate(docs):
            ids = [EOS] + list(d.text.encode()) + ([EOS] if k < len(docs) - 1 else [])
            ids = torch.tensor(ids)[None]
            total += float(token_nll_sum(model(ids[:, :-1]), ids[:, 1:], 256))
    assert nats == pytest.approx(total / n, rel=1e-6)
    carried, _ = evaluate_bits_per_byte(model, stream, seqlen=n, batch_size=1, reset_at_eos=False)
    assert abs(carried - nats) > 1e-4


@pytest.mark.parametrize("reset", [pytest.param(True, id="reset"), pytest.param(False, id="no-reset")])
def test_the_trainer_passes_seq_idx_to_the_model(tmp_path, monkeypatch, reset):
    import mambakit.training.loop as loop
    from mambakit.training import tiny_recipe, train

    seen = []
    real = loop.forward_backward

    def spy(model, window, *args, **kwargs):
        seen.append(window)
        return real(model, window, *args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", spy)
    data = _jsonl_corpus(tmp_path / "data", _texts())
    cfg = tiny_recipe().replace(data=data, max_steps=2, seqlen=48, out_dir=str(tmp_path / "run"), progress=False,
                                sample_tokens=0, token_cache=str(tmp_path / "cache"), reset_at_eos=reset)
    train(cfg)
    assert len(seen) == 2
    for batch in seen:
        if reset:
            assert torch.equal(batch.seq_idx, seq_idx_from_eos(batch.inputs, 0))
            assert int(batch.seq_idx.max()) > 0  # short documents: every window crosses a boundary
        else:
            assert batch.seq_idx is None


# ---------------------------------------------------------------- the token cache

class _CountingTokenizer(HFTokenizer):
    """An HFTokenizer that counts the texts it encodes (in this process: the tests use num_proc=1 here)."""

    encoded = 0

    def encode_batch(self, texts):
        type(self).encoded += len(texts)
        return super().encode_batch(texts)


def test_token_cache_is_built_once_and_reused(tmp_path, bpe_path):
    data = _jsonl_corpus(tmp_path / "data", _texts())
    tok = _CountingTokenizer(bpe_path)
    _CountingTokenizer.encoded = 0
    first = load_token_streams(data, tok, token_cache=tmp_path / "cache", num_proc=1)
    assert not first.from_cache and _CountingTokenizer.encoded == 30
    assert first.train.tokens.dtype == torch.uint16  # a 400-token vocabulary: 2 bytes per token
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.path.iterdir()}
    second = load_token_streams(data, tok, token_cache=tmp_path / "cache", num_proc=1)
    assert second.from_cache and _CountingTokenizer.encoded == 30  # read back, not tokenized again
    assert second.path == first.path and {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                                          for p in second.path.iterdir()} == files
    # the same ids as tokenizing the documents in memory (the layout of TokenStream.from_documents)
    train_docs, val_docs = load_corpus(data)
    for cached, docs in ((second.train, train_docs), (second.val, val_docs)):
        assert cached.tokens.long().tolist() == TokenStream.from_documents(docs, tok).tokens.tolist()
    assert second.documents == {"train": len(train_docs), "val": len(val_docs)}
    meta = json.loads((second.path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["ntokens"]["train"] == len(second.train)


def test_a_changed_corpus_or_tokenizer_makes_a_new_cache(tmp_path, bpe_path):
    data = tmp_path / "data"
    _jsonl_corpus(data, _texts())
    cache = tmp_path / "cache"
    bpe = HFTokenizer(bpe_path)
    base = load_token_streams(str(data), bpe, token_cache=cache)
    with open(data / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    grown = load_token_streams(str(data), bpe, token_cache=cache)
    other_tokenizer = load_token_streams(str(data), ByteTokenizer(), token_cache=cache)
    other_split = load_token_streams(str(data), ByteTokenizer(), token_cache=cache, val_fraction=0.2)
    results = [base, grown, other_tokenizer, other_split]
    assert [r.from_cache for r in results] == [False, False, False, False]
    assert len({r.path for r in results}) == 4
    assert sorted(p.name for p in cache.iterdir()) == sorted(r.path.name for r in results)  # no temporaries left
    assert base.path.is_dir()  # an entry whose corpus changed is left as it is
    assert grown.documents["train"] + grown.documents["val"] == 31
    assert other_tokenizer.train.tokens.dtype == torch.uint8
    # the corpus as it was before finds its entry again: the key is the content, not the file times
    _jsonl_corpus(data, _texts())
    again = load_token_streams(str(data), bpe, token_cache=cache)
    assert again.from_cache and again.path == base.path
    # a copy elsewhere shares the entry, unsplit (as `mambakit eval` reads it) and split: the held-out documents are
    # picked by their names, which are relative to the corpus root
    copy = _jsonl_corpus(tmp_path / "copy", _texts())
    whole = load_token_streams(str(data), bpe, token_cache=cache, val_fraction=None)
    assert load_token_streams(copy, bpe, token_cache=cache, val_fraction=None).path == whole.path
    assert load_token_streams(copy, bpe, token_cache=cache).path == base.path


def test_an_incomplete_cache_entry_is_rebuilt(tmp_path):
    data = _jsonl_corpus(tmp_path / "data", _texts())
    built = load_token_streams(data, ByteTokenizer(), token_cache=tmp_path / "cache")
    expected = built.train.tokens.clone()
    with open(built.path / "train.bin", "r+b") as f:
        f.truncate(10)  # as a crash or a full disk would leave it
    rebuilt = load_token_streams(data, ByteTokenizer(), token_cache=tmp_path / "cache")
    assert not rebuilt.from_cache and torch.equal(rebuilt.train.tokens, expected)


def test_worker_processes_write_the_same_cache_as_one_process(tmp_path, monkeypatch, bpe_path):
    monkeypatch.setattr(token_cache_module, "_CHUNK_DOCS", 3)  # many chunks in flight, written in order
    data = _jsonl_corpus(tmp_path / "data", _texts(40))
    tok = HFTokenizer(bpe_path)
    one = tokenize_corpus(open_corpus(data), tok, cache_dir=None, num_proc=1)
    two = tokenize_corpus(open_corpus(data), tok, cache_dir=tmp_path / "cache", num_proc=2)
    assert torch.equal(one.train.tokens, two.train.tokens) and torch.equal(one.val.tokens, two.val.tokens)
    assert one.documents == two.documents


def test_building_the_cache_shows_a_progress_bar(tmp_path, capsys):
    data = _jsonl_corpus(tmp_path / "data", _texts())
    load_token_streams(data, ByteTokenizer(), token_cache=tmp_path / "cache", progress=True)
    err = capsys.readouterr().err
    assert "tokenize" in err and "30/30" in err


def test_an_unwritable_default_cache_falls_back_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MAMBAKIT_TOKEN_CACHE", str(blocker / "tokens"))
    data = _jsonl_corpus(tmp_path / "data", _texts())
    with pytest.warns(UserWarning, match="cannot create the token cache"):
        result = load_token_streams(data, ByteTokenizer())
    assert result.path is None and len(result.train) > 0


# ---------------------------------------------------------------- datasets directories, json / parquet / text

def test_a_datasets_directory_loads_its_text_column(tmp_path):
    import datasets

    texts = _texts()
    datasets.Dataset.from_dict({"text": texts, "n": list(range(30))}).save_to_disk(str(tmp_path / "ds"))
    corpus = open_corpus(tmp_path / "ds")
    docs = list(corpus.documents())
    assert sorted(d.text for d, _ in docs) == sorted(texts)
    assert 0 < sum(held for _, held in docs) < 30 and corpus.n_documents == 30
    # a different column, and the error that names the columns there are
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds2"))
    whole = open_corpus(tmp_path / "ds2", text_column="content", val_fraction=None)
    assert [d.text for d, _ in whole.documents()] == texts
    with pytest.raises(DataError, match=r"no 'text' column \(columns: content\)"):
        list(open_corpus(tmp_path / "ds2").documents())


def test_a_dataset_dict_holds_out_its_validation_split(tmp_path):
    import datasets

    texts = _texts()
    splits = {"train": texts[:25], "validation": texts[25:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dd"))
    streams = load_token_streams(str(tmp_path / "dd"), ByteTokenizer(), token_cache=tmp_path / "cache")
    assert streams.documents == {"train": 25, "val": 5}
    expected = TokenStream.from_documents([Document(str(i), t) for i, t in enumerate(texts[25:])], ByteTokenizer())
    assert torch.equal(streams.val.tokens, expected.tokens)


def _write(directory, fmt: str, texts: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        return _jsonl_corpus(directory, texts)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts[:10]}), directory / "a.parquet")
        pq.write_table(pa.table({"text": texts[10:]}), directory / "b.parquet")
        return str(directory)
    for i, t in enumerate(texts):  # text: one file is one document
        (directory / f"{i:03d}.txt").write_text(t + "\n\n" + t)
    return str(directory)


@pytest.mark.parametrize("fmt", [pytest.param("jsonl", id="json"), pytest.param("parquet", id="parquet"),
                                 pytest.param("txt", id="text")])
def test_streaming_reads_the_same_documents_as_reading_whole(tmp_path, fmt):
    path = _write(tmp_path / fmt, fmt, _texts())
    corpus = open_corpus(path, streaming=True, val_fraction=None)
    assert corpus.n_documents is None  # nothing is read before the documents are asked for
    streamed = [d.text for d, _ in corpus.documents()]
    assert streamed == [d.text for d in load_documents(path)]
    # the streamed split: a hash of the position, so the same every time and about val_fraction of the documents
    split = open_corpus(path, streaming=True, val_fraction=0.3)
    marks = [held for _, held in split.documents()]
    assert marks == [held for _, held in split.documents()] and 0 < sum(marks) < len(marks)


@pytest.mark.slow  # 15-35 s on 2 cores: out of the fast lane, CI runs it
def test_training_reads_a_streamed_corpus_and_a_datasets_directory(tmp_path):
    import datasets

    from mambakit.training import tiny_recipe, train

    texts = _texts(60)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    path = _write(tmp_path / "json", "jsonl", texts)
    for data, streaming in ((str(tmp_path / "ds"), False), (path, True)):
        cfg = tiny_recipe().replace(data=data, streaming=streaming, max_steps=2, seqlen=32, val_fraction=0.2,
                                    out_dir=str(tmp_path / f"run-{streaming}"), progress=False, sample_tokens=0,
                                    token_cache=str(tmp_path / "cache"))
        result = train(cfg)
        assert result.step == 2 and math.isfinite(result.val_bpb)


def test_streaming_refuses_what_it_cannot_stream(tmp_path):
    (tmp_path / "genome.fa").write_text(">chr1\nACGT\n")
    with pytest.raises(DataError, match=r"cannot stream '.fa' files \(FASTA is read whole"):
        open_corpus(tmp_path / "genome.fa", streaming=True)
    with pytest.raises(DataError, match="data path not found"):
        open_corpus(tmp_path / "missing", streaming=True)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"record 0 has no 'text' field \(fields: body\)"):
        list(open_corpus(tmp_path / "rows.jsonl", streaming=True).documents())


def test_an_empty_streamed_held_out_split_is_refused_before_training(tmp_path):
    path = _write(tmp_path / "one", "jsonl", _texts(2))
    with pytest.raises(DataError, match=r"the held-out split has 0 documents \(0 tokens\) at val_fraction 0.01"):
        load_token_streams(path, ByteTokenizer(), streaming=True, val_fraction=0.01, token_cache="off")


def test_token_ids_are_stored_in_the_narrowest_dtype():
    assert token_cache_module._token_dtype(256) == np.uint8
    assert token_cache_module._token_dtype(50280) == np.uint16
    assert token_cache_module._token_dtype(128256) == np.uint32
