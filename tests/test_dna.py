"""DNA: the streaming FASTA reader (plain, .gz, .xz, multi-record, lower case, N runs, constant memory), the
nucleotide tokenizer and reverse complements, genome streams, species windows, `mambakit train --task dna`."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tracemalloc

import numpy as np
import pytest
import torch

from mambakit.data import DataError, load_tokenizer
from mambakit.data.dna import (
    Genome,
    NucleotideTokenizer,
    SpeciesWindows,
    genome_streams,
    iter_fasta,
    load_genome,
    random_reverse_complement,
    read_fasta,
    reverse_complement,
)

MULTI = (">chr1 first record\nACGTacgt\nNNNNNNNNNN\nggcc\n"
         ";a comment line\n"
         ">chr2\r\nTTTT\r\n\r\nRYKM\r\n"
         ">empty\n"
         ">chr3 last\nA C\tG\n")
EXPECTED = [("chr1", "ACGTACGTNNNNNNNNNNGGCC"), ("chr2", "TTTTRYKM"), ("empty", ""), ("chr3", "ACG")]

WRITERS = [
    pytest.param(".fa", lambda p, b: p.write_bytes(b), id="plain"),
    pytest.param(".fa.gz", lambda p, b: p.write_bytes(gzip.compress(b)), id="gz"),
    pytest.param(".fna.xz", lambda p, b: p.write_bytes(lzma.compress(b)), id="xz"),
    pytest.param(".fasta.bz2", lambda p, b: p.write_bytes(bz2.compress(b)), id="bz2"),
]


@pytest.mark.parametrize("suffix, write", WRITERS)
def test_reader_multi_record_lower_case_and_n_runs(tmp_path, suffix, write):
    path = tmp_path / f"genome{suffix}"
    write(path, MULTI.encode())
    assert read_fasta(path) == EXPECTED
    headers = {c.record: c.header for c in iter_fasta(path)}
    assert headers["chr1"] == "chr1 first record" and headers["chr3"] == "chr3 last"


@pytest.mark.parametrize("chunk_bases", [pytest.param(1, id="chunk1"), pytest.param(3, id="chunk3"),
                                         pytest.param(7, id="chunk7"), pytest.param(1 << 20, id="chunk1M")])
def test_reader_chunks_rebuild_every_record(tmp_path, chunk_bases):
    path = tmp_path / "g.fa"
    path.write_text(MULTI)
    chunks = list(iter_fasta(path, chunk_bases=chunk_bases))
    assert all(len(c.seq) <= chunk_bases for c in chunks)
    rebuilt = {}
    for c in chunks:
        assert c.offset == len(rebuilt.get(c.record, b""))  # offsets are positions in the record
        rebuilt[c.record] = rebuilt.get(c.record, b"") + c.seq
    assert [(k, v.decode()) for k, v in rebuilt.items()] == EXPECTED


def test_reader_keeps_a_long_n_run_across_chunks(tmp_path):
    seq = "ACGT" * 100 + "N" * 5000 + "acgt" * 100
    path = tmp_path / "gap.fa.gz"
    path.write_bytes(gzip.compress((">gap\n" + "\n".join(seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n").encode()))
    ids = load_genome(path).tokens[0]
    assert ids.size == len(seq)
    assert np.count_nonzero(ids == 8) == 5000 and (ids[400:5400] == 8).all()


def test_reader_memory_is_constant_on_a_one_line_genome(tmp_path):
    """An 8 Mbp record on a single line: the reader holds at most a chunk and a readline piece."""
    path = tmp_path / "oneline.fa"
    rng = np.random.default_rng(0)
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, 8_000_000)].tobytes()
    path.write_bytes(b">big\n" + bases + b"\n")
    del bases
    tracemalloc.start()
    total = sum(len(c.seq) for c in iter_fasta(path, chunk_bases=1 << 16))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 8_000_000
    assert peak < 1_000_000, f"peak {peak} bytes while reading 8 MB"


@pytest.mark.parametrize("text, message", [
    pytest.param("ACGT\n>r\nAC\n", "before the first '>'", id="sequence-before-header"),
    pytest.param("; only a comment\n", "no FASTA records", id="no-records"),
])
def test_reader_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_fasta(path)


def test_reader_truncated_archive_is_a_data_error(tmp_path):
    path = tmp_path / "cut.fa.xz"
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)[np.random.default_rng(0).integers(0, 4, 40000)].tobytes()
    whole = lzma.compress(b">r\n" + bases)
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="cannot read"):
        read_fasta(path)



@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """Tiny models on a shared 2-core machine: one thread per test process is several times faster than torch's
    default (threads that wait on each other for matrices of a few dozen rows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ---------------------------------------------------------------- tokenizer

def test_tokenizer_ids_case_ambiguity_and_round_trip(tmp_path):
    tok = NucleotideTokenizer()
    assert tok.encode("ACGTN") == [4, 5, 6, 7, 8]
    assert tok.encode("acgtn") == [4, 5, 6, 7, 8]
    assert tok.encode("RYKMSWBDHV-") == [8] * 11  # ambiguity codes and anything else read as N
    assert tok.decode([0, 4, 5, 1, 6, 7, 2, 8, 3]) == "ACGTN"  # specials are not sequence
    assert tok.decode(tok.encode("GATTACANNN")) == "GATTACANNN"
    assert tok.count_bytes([4, 5, 6]) == 3 and tok.vocab_size == 9 and tok.eos_id == 0
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        tok.decode([9])
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), NucleotideTokenizer)


def test_reverse_complement_every_container():
    tok = NucleotideTokenizer()
    ids = tok.encode("AACGTN")
    assert tok.decode(reverse_complement(ids)) == "NACGTT"
    assert reverse_complement(reverse_complement(ids)) == ids  # an involution
    arr = np.array(ids, dtype=np.uint8)
    assert reverse_complement(arr).tolist() == reverse_complement(ids) and reverse_complement(arr).dtype == np.uint8
    batch = torch.tensor([ids, tok.encode("GGGGTT")])
    out = reverse_complement(batch)
    assert out.dtype == batch.dtype and tok.decode(out[1].tolist()) == "AACCCC"


def test_random_reverse_complement_flips_whole_rows():
    tok = NucleotideTokenizer()
    batch = torch.tensor([tok.encode("AACCGGTA")] * 64)
    out = random_reverse_complement(batch, torch.Generator().manual_seed(0))
    flipped = (out != batch).any(1)
    assert 10 < int(flipped.sum()) < 54  # about half, by a seeded coin
    assert torch.equal(out[flipped], reverse_complement(batch[flipped]))
    assert torch.equal(out[~flipped], batch[~flipped])


# ---------------------------------------------------------------- streams and species windows

def test_genome_streams_hold_out_record_tails_and_add_reverse_complements():
    tok = NucleotideTokenizer()
    genome = Genome(["a", "b"], [tok.encode_array("ACGTACGTAC"), tok.encode_array("GGGGGTTTTT")])
    train, val = genome_streams(genome, val_fraction=0.2)
    assert tok.decode(val.tokens.tolist()) == "ACTT" and val.tokens[0] == 0
    assert tok.decode(train.tokens.tolist()) == "ACGTACGT" + "ACGTACGT" + "GGGGGTTT" + "AAACCCCC"
    plain, _ = genome_streams(genome, val_fraction=0.2, reverse_complement_train=False)
    assert len(plain) == 2 * (8 + 1)


def _random_genome(n_records: int, length: int, seed: int) -> Genome:
    rng = np.random.default_rng(seed)
    return Genome([f"r{i}" for i in range(n_records)], [rng.integers(4, 8, length).astype(np.uint8) for _ in range(n_records)])


def _offsets(record: np.ndarray, window: np.ndarray) -> list[int]:
    """Every start where `window` occurs in `record` (a random 64-mer occurs once)."""
    view = np.lib.stride_tricks.sliding_window_view(record, window.size)
    return np.flatnonzero((view == window).all(1)).tolist()


def test_species_windows_train_and_test_regions_are_disjoint():
    genomes = {"x": _random_genome(2, 1000, 0), "y": _random_genome(1, 1500, 1)}
    data = SpeciesWindows(genomes, test_fraction=0.25)
    gen = torch.Generator().manual_seed(0)
    assert data.max_length("train") == 750 and data.max_length("test") == 250
    for split in ("train", "test"):
        ids, labels = data.sample(split, 32, 64, gen)
        assert ids.shape == (32, 64) and ids.dtype == torch.int64 and set(labels.tolist()) == {0, 1}
        for row, label in zip(ids.numpy().astype(np.uint8), labels.tolist()):
            found = [(r.size, o) for r in genomes[data.species[label]].tokens for o in _offsets(r, row)]
            assert len(found) == 1  # the window comes from its own species' genome
            size, offset = found[0]
            cut = int(0.75 * size)
            if split == "train":
                assert offset + 64 <= cut
            else:
                assert offset >= cut
    with pytest.raises(ValueError, match="exceeds"):
        data.sample("test", 1, 251, gen)


def test_species_windows_skip_mostly_n_windows():
    tok = NucleotideTokenizer()
    gappy = Genome(["g"], [tok.encode_array("N" * 600 + "ACGT" * 100)])
    data = SpeciesWindows({"gappy": gappy, "plain": _random_genome(1, 1000, 2)}, test_fraction=0.05,
                          max_n_fraction=0.1)
    ids, labels = data.sample("train", 16, 50, torch.Generator().manual_seed(0))
    assert ((ids == 8).float().mean(1) <= 0.1).all()
    assert (labels == 0).any()


# ---------------------------------------------------------------- mambakit train --task dna

def test_train_task_dna_end_to_end(tmp_path, capsys):
    """A species directory named as ragout's are ("E.Coli": the run is named after all of it), an S4D mixer through
    --model.ssm-cfg (the banner names it, not --layer's default), held-out bits per base."""
    from mambakit.cli.__main__ import main
    from mambakit.models import MambaLM

    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACGTacgt", dtype=np.uint8)
    genomes = tmp_path / "E.Coli"
    genomes.mkdir()
    for i in range(2):
        seq = letters[rng.integers(0, 8, 3000)].tobytes().decode()
        lines = "\n".join(seq[j:j + 70] for j in range(0, len(seq), 70))
        (genomes / f"g{i}.fna.xz").write_bytes(lzma.compress(f">rec{i} test\n{lines}\n".encode()))
    out = tmp_path / "run"
    assert main(["train", "--task", "dna", "--recipe", "tiny", "--data", str(genomes), "--max-steps", "3",
                 "--seqlen", "64", "--out", str(out), "--no-progress",
                 "--model.ssm-cfg", '{"layer": "S4D", "A_init": "S4D-Real"}']) == 0
    printed = capsys.readouterr().out
    assert "NucleotideTokenizer" in printed and "held-out" in printed
    assert "recipe E.Coli: S4D, d_model" in printed
    assert re.search(r"held-out: [0-9.]+ nats/token, [0-9.]+ bits/base", printed)
    assert isinstance(load_tokenizer(out), NucleotideTokenizer)
    config = MambaLM.from_pretrained(out).config
    assert config.vocab_size == 9 and config.layer == "S4D"


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--tokenizer", "t.json"], "leave out --tokenizer", id="tokenizer"),
    pytest.param(["--data", "{tmp}/none.fa"], "data path not found", id="missing-data"),
])
def test_train_task_dna_user_errors(tmp_path, capsys, argv, message):
    from mambakit.cli.__main__ import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", "--task", "dna", "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the classification head

from mambakit.models import MambaConfig  # noqa: E402
from mambakit.models.classifier import SequenceClassifier, pool_sequence  # noqa: E402


def test_pooling_with_and_without_mask():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.equal(pool_sequence(hidden, "mean"), hidden.mean(1))
    assert torch.equal(pool_sequence(hidden, "last"), hidden[:, -1])
    assert torch.equal(pool_sequence(hidden, "max"), hidden.amax(1))
    assert torch.equal(pool_sequence(hidden, "mean", mask)[0], hidden[0, :2].mean(0))
    assert torch.equal(pool_sequence(hidden, "last", mask), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool_sequence(hidden, "max", mask)[0], hidden[0, 1])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_sequence(hidden, "sum")
    with pytest.raises(ValueError, match=r"mask must be bool \(batch, seqlen\) = \(2, 4\)"):
        pool_sequence(hidden, "mean", mask[:, :3])


@pytest.mark.parametrize("layer, pooling", [
    pytest.param("Mamba1", "mean", id="mamba1-mean"),
    pytest.param("Mamba2", "last", id="mamba2-last"),
    pytest.param("S4D", "max", id="s4d-max"),
])
def test_classifier_head_learns_a_toy_task(layer, pooling):
    """Any backbone under the head: class = whether the window holds more G+C than A+T; 40 steps learn it."""
    ssm_cfg = {"layer": layer, "d_state": 8}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=16, chunk_size=16)
    torch.manual_seed(0)
    clf = SequenceClassifier.from_config(MambaConfig(d_model=32, n_layer=1, vocab_size=9, ssm_cfg=ssm_cfg),
                                         num_classes=2, pooling=pooling)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        gc = torch.rand(n, 1, generator=gen) < 0.5
        p_gc = torch.where(gc, 0.8, 0.2)
        is_gc = torch.rand(n, 64, generator=gen) < p_gc
        ids = torch.where(is_gc, 5 + torch.randint(0, 2, (n, 64), generator=gen),
                          torch.tensor([4, 7])[torch.randint(0, 2, (n, 64), generator=gen)])
        return ids, gc[:, 0].long()

    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    for _ in range(40):
        ids, labels = batch(16)
        loss = torch.nn.functional.cross_entropy(clf(ids), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    ids, labels = batch(128)
    with torch.no_grad():
        logits = clf(ids)
    assert logits.shape == (128, 2)
    assert (logits.argmax(-1) == labels).float().mean() > 0.8  # chance is 0.5


def test_classifier_over_a_unet_trunk_with_mask():
    """'Usable for any task': the audio U-Net's hidden states under the same head, padded batch masked."""
    from mambakit.models.unet import AudioUNet, UNetConfig

    unet = AudioUNet(UNetConfig(d_model=8, n_layers=1, pool=[2], d_state=4))
    clf = SequenceClassifier(unet.hidden_states, d_model=8, num_classes=10)
    levels = torch.randint(0, 256, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, 12:] = False
    out = clf(levels, mask)
    assert out.shape == (3, 10)
    # the masked tail does not reach row 0's pooled value (the U-Net is causal, the mean skips it)
    changed = levels.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 256
    assert torch.allclose(clf(changed, mask)[0], out[0], atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(unet.hidden_states, d_model=8, num_classes=1)


# ---------------------------------------------------------------- mambakit reproduce dna-context / dna-species --quick

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_results(out, name, pngs):
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name and results["quick"] is True
    assert results["command"].startswith(f"mambakit reproduce {name} --quick")
    readme = (out / "README.md").read_text()
    assert "quick mode" in readme and "| " in readme
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and f"({png})" in readme
    return results


@pytest.mark.slow
def test_reproduce_dna_context_quick(tmp_path):
    from mambakit.reproduce import FINISHED, reproduce

    out = tmp_path / "dna-context"
    assert reproduce("dna-context", out, quick=True, device="cpu", progress=False) == FINISHED
    results = _check_results(out, "dna-context", ["perplexity_vs_context.png", "training_loss.png"])
    s = results["settings"]
    rows = results["rows"]
    assert {(r["mixer"], r["context"]) for r in rows} == {(m, 2 ** k) for m in ("Mamba", "S4D") for k in s["contexts_log2"]}
    for r in rows:
        assert 1.0 < r["perplexity"] < 9.0 * 1.5 and r["steps"] == s["steps"]  # an untrained model guesses among 9
        assert r["batch_size"] == s["tokens_per_step"] // r["context"]
    readme = (out / "README.md").read_text()
    mamba = sorted((r["context"], r["perplexity"]) for r in rows if r["mixer"] == "Mamba")
    assert f"- Mamba: {mamba[0][1]:.3f} -> {mamba[-1][1]:.3f} perplexity" in readme and "The paper's claim" in readme


def test_context_verdict_follows_the_numbers():
    from mambakit.reproduce.common import context_verdict

    holds = context_verdict({"Mamba": {1024: 3.7, 4096: 3.6, 16384: 3.5}, "S4D": {1024: 3.6, 4096: 3.6, 16384: 3.65}},
                            "Mamba", "S4D", "perplexity")
    assert "claim holds here" in holds and "falls at every longer context (best at 2^14)" in holds
    assert "- S4D: 3.600 -> 3.650 perplexity (+0.050); it does not move one way" in holds  # flat, then up
    worse = context_verdict({"Mamba": {1024: 3.6, 4096: 3.7}, "S4D": {1024: 3.6, 4096: 3.65}}, "Mamba", "S4D", "ppl")
    assert "gains no more" in worse and "(+0.100)" in worse


@pytest.mark.parametrize("quick", [True, False])
def test_dna_context_trains_every_context_on_the_same_tokens(quick):
    """Figure 5's points cost the same compute: every context's batch x context is the step's tokens (a context
    longer than tokens_per_step would get a batch of 1 and more tokens than the others), through the warm-up too."""
    from mambakit.reproduce.dna_context import model_specs, settings, window_length

    s = settings(quick)
    for spec in model_specs(s):
        L = spec.info["context"]
        assert spec.train.batch_size * L == s["tokens_per_step"]
        for step in range(0, s["steps"], max(1, s["steps"] // 50)):
            w = window_length(step, L, s)
            assert max(1, s["tokens_per_step"] // w) * w == s["tokens_per_step"]


def test_dna_context_sequence_length_warmup():
    from mambakit.reproduce.dna_context import window_length

    s = {"slw_start": 16, "slw_fraction": 0.5, "steps": 80}
    lengths = [window_length(step, 128, s) for step in range(80)]
    assert lengths[0] == 16 and lengths[-1] == 128
    assert sorted(set(lengths)) == [16, 32, 64, 128] and lengths == sorted(lengths)
    assert lengths.index(128) == 39  # three doublings over the first half of the steps
    assert window_length(0, 8, s) == 8  # a context below the warm-up start trains at its length throughout
    short = [window_length(step, 128, {**s, "steps": 40}) for step in range(40)]  # --steps 40 (Run.with_steps)
    assert short.index(128) == 18 and short[-1] == 128


@pytest.mark.slow
def test_reproduce_dna_species_quick_through_the_cli(tmp_path, capsys):
    from mambakit.cli.__main__ import main

    out = tmp_path / "dna-species"
    assert main(["reproduce", "dna-species", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    results = _check_results(out, "dna-species", ["accuracy_vs_window.png", "training_loss.png"])
    rows = results["rows"]
    assert {r["mixer"] for r in rows} == {"Mamba", "S4D"} and len(rows) == 2 * len(results["settings"]["windows_log2"])
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["chance"] == pytest.approx(1 / 3)
        assert r["test_windows"] == results["settings"]["test_windows"]
    assert "chance" in (out / "README.md").read_text()


def test_debian_species_layout_and_missing_package(tmp_path):
    from mambakit.data.dna import debian_species

    for species in ("E.Coli", "V.Cholerae"):
        (tmp_path / "ragout" / species / "references").mkdir(parents=True)
        (tmp_path / "ragout" / species / "references" / "a.fasta.gz").write_bytes(gzip.compress(b">r\nACGT\n"))
        (tmp_path / "ragout" / species / "contigs.fasta.gz").write_bytes(gzip.compress(b">c\nAC\n"))  # drafts: not used
    (tmp_path / "kleb").mkdir()
    (tmp_path / "kleb" / "K1.fna.xz").write_bytes(lzma.compress(b">k\nGGCC\n"))
    species = debian_species(tmp_path / "ragout", klebsiella=tmp_path / "kleb")
    assert list(species) == ["E.Coli", "V.Cholerae", "K.Pneumoniae"]
    assert [p.name for p in species["E.Coli"]] == ["a.fasta.gz"]
    assert read_fasta(species["K.Pneumoniae"][0]) == [("k", "GGCC")]
    assert list(debian_species(tmp_path / "ragout", klebsiella=tmp_path / "none")) == ["E.Coli", "V.Cholerae"]
    with pytest.raises(DataError, match="apt-get install ragout-examples"):
        debian_species(tmp_path / "absent")

    # a machine without the packages: the ragout folders copied, K. pneumoniae as a flat folder beside them
    (tmp_path / "ragout" / "K.Pneumoniae").mkdir()
    (tmp_path / "ragout" / "K.Pneumoniae" / "K1.fna.xz").write_bytes(lzma.compress(b">k\nGGCC\n"))
    (tmp_path / "ragout" / "notes").mkdir()  # no FASTA inside: not a species
    species = debian_species(tmp_path / "ragout", klebsiella=tmp_path / "kleb")
    assert list(species) == ["E.Coli", "K.Pneumoniae", "V.Cholerae"]  # the folder's copy, not also kleborate's
    assert [p.name for p in species["K.Pneumoniae"]] == ["K1.fna.xz"]


def test_a_pretraining_corpus_in_ragouts_layout_reads_the_references_not_the_draft_contigs(tmp_path):
    """The draft contigs beside ragout's references re-assemble the same strains: read with them, the held-out
    tail of a contig would be bases the reference's training part holds."""
    from mambakit.data.dna import genome_files, load_dna_corpus

    for species in ("E.Coli", "V.Cholerae"):
        (tmp_path / "ragout" / species / "references").mkdir(parents=True)
        (tmp_path / "ragout" / species / "references" / "ref.fasta.gz").write_bytes(
            gzip.compress(f">{species}\n".encode() + b"ACGT" * 8 + b"\n"))
        (tmp_path / "ragout" / species / "draft_contigs.fasta.gz").write_bytes(gzip.compress(b">c\nACGTACGT\n"))
    files = genome_files(tmp_path / "ragout")
    assert [(p.parent.parent.name, p.name) for p in files] == [("E.Coli", "ref.fasta.gz"),
                                                               ("V.Cholerae", "ref.fasta.gz")]
    assert load_genome(files).names == ["ref.fasta.gz:E.Coli", "ref.fasta.gz:V.Cholerae"]  # no contig "c"
    _, (names, _), _, _ = load_dna_corpus(tmp_path / "ragout")
    assert [d.name for d in names] == ["ref.fasta.gz:E.Coli", "ref.fasta.gz:V.Cholerae"]
    plain = tmp_path / "mine"  # any other folder: every FASTA file in it, as before
    plain.mkdir()
    (plain / "a.fa").write_text(">a\nACGT\n")
    assert genome_files(plain) == plain and genome_files(plain / "a.fa") == plain / "a.fa"



def test_species_folders_follow_ragouts_layout_as_the_pretraining_corpus_does(tmp_path, monkeypatch):
    """dna-species reads a species root the way genome_files reads a corpus: once any folder has references/ (here
    not the first in sorted order, which it used to look at alone) the drafts beside them are left out; a flat
    folder per species (a user's own) gets nothing added, Debian's K. pneumoniae included."""
    from mambakit.reproduce import dna_species

    root = tmp_path / "species"
    (root / "A.Flat").mkdir(parents=True)
    (root / "A.Flat" / "a.fa").write_text(">a\nACGT\n")
    (root / "B.Rag" / "references").mkdir(parents=True)
    (root / "B.Rag" / "references" / "b.fasta").write_text(">b\nGGCC\n")
    (root / "B.Rag" / "contigs.fasta").write_text(">c\nAC\n")  # a draft: not read
    (tmp_path / "kleb").mkdir()
    (tmp_path / "kleb" / "K1.fna").write_text(">k\nTTAA\n")
    monkeypatch.setattr(dna_species, "KLEBSIELLA_GENOMES", tmp_path / "kleb")
    files = dna_species._species_files(None, {"species_root": str(root)})
    assert {k: [p.name for p in v] for k, v in files.items()} == {"A.Flat": ["a.fa"], "B.Rag": ["b.fasta"],
                                                                    "K.Pneumoniae": ["K1.fna"]}
    (root / "B.Rag" / "references" / "b.fasta").unlink()
    (root / "B.Rag" / "references").rmdir()  # now flat folders only: nothing added
    files = dna_species._species_files(None, {"species_root": str(root)})
    assert {k: sorted(p.name for p in v) for k, v in files.items()} == {"A.Flat": ["a.fa"], "B.Rag": ["contigs.fasta"]}
