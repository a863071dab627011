"""`mambakit reproduce dna-species`: species classification from random DNA windows, accuracy against window length,
Mamba vs S4D vs chance (Mamba paper, Section 4.3.3, Figure 6).

Task (`mambakit.data.dna.SpeciesWindows`): a window of L bases drawn uniformly from one species' genomes; name the
species. Every record is split into a train region (first 80%) and a test region (last 20%), so no test base was
seen in training. Full size: the species folders of Debian's `ragout-examples` (E. coli, H. pylori, S. aureus,
V. cholerae: 2-5 complete genomes each) and, when installed, `kleborate-examples`' K. pneumoniae (4 genomes, .fna.xz),
E. coli's relative in the same family, the hard pair; or $MAMBAKIT_SPECIES, a directory with one sub-directory of
FASTA files per species. These bacteria are still far easier to tell apart than the paper's five great apes (human,
chimpanzee, gorilla, orangutan, bonobo: 99% identical DNA), which no package ships. Plasmids and short contigs
(under 2^17 bases) are left out, so every window comes from a chromosome. --quick: three stand-in species from
related order-3 Markov chains.

Models: a `SequenceClassifier` (mean pooling over the sequence) on a backbone of `n_layer` blocks of width
`d_model`, Mamba (Mamba-1) or S4D (S4D-Lin in the Mamba block), trained from scratch at each window length with
the same tokens per step (batch = tokens_per_step / L) and steps, and reverse-complement augmentation. Metric:
accuracy on a fixed set of test windows per length (seeded), against chance = 1 / number of species.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.dna import (DEBIAN_GENOMES, KLEBSIELLA_GENOMES, SpeciesWindows, debian_species, is_ragout_layout,
                        load_genome, random_reverse_complement)
from ..models import MambaConfig
from ..models.classifier import SequenceClassifier
from .common import FINISHED, Run, TrainSettings, figure, save_plot, loss_plot, markdown_table, percent
from .dna_audio_common import markov_genome_fasta, train_module

NAME = "dna-species"
SUMMARY = "Mamba paper Figure 6: species classification from DNA windows of 2^10 .. 2^17 bases, Mamba vs S4D vs chance"
VOCAB = 9
TEST_SEED = 4_000_000_007
INDEPENDENT_MODELS = True  # one model per (mixer, window), none needs another's result: `--workers N` trains N at once


def settings(quick: bool) -> dict:
    """Full size (GPU; not yet run): windows 2^10 .. 2^17 (2^18 is past the shortest species' test region in
    ragout-examples), 2^17 tokens per step, 1000 steps, 512 test windows per length; quick: a CPU smoke run.

    CPU check of the real-data path (2026-12-02, ragout-examples' 4 species, before K. pneumoniae and the plasmid
    filter were added; these settings except windows 2^8 and
    2^10, width 32, 2 layers, 150 steps of 4096 bases, 10 warmup steps, 200 test windows; 2.7 minutes on 1 thread):
    Mamba 81.5% / 75.5%, S4D 75.5% / 59.5%, chance 25%. Far from converged; not a result."""
    if quick:
        return {"species_root": None, "windows_log2": [5, 6], "tokens_per_step": 256, "steps": 4, "lr": 2e-3,
                "warmup_steps": 1, "d_model": 16, "n_layer": 2, "d_state": 4, "test_windows": 12, "eval_batch": 6,
                "test_fraction": 0.2, "min_record": 1}
    return {"species_root": os.environ.get("MAMBAKIT_SPECIES", str(DEBIAN_GENOMES)), "windows_log2": list(range(10, 18)),
            "tokens_per_step": 2 ** 17, "steps": 1000, "lr": 2e-3, "warmup_steps": 50, "d_model": 64, "n_layer": 4,
            "d_state": 16, "test_windows": 512, "eval_batch": 16, "test_fraction": 0.2, "min_record": 2 ** 17}


def _species_files(run: Run, s: dict) -> dict[str, list[Path]]:
    if s["species_root"] is None:
        folder = run.state / "species"
        out = {}
        for i in range(3):
            path = folder / f"standin{i}.fa.gz"
            if not path.exists():
                markov_genome_fasta(path, n_records=1, length=3000, seed=i, divergence=0.3)
            out[f"stand-in {i}"] = [path]
        return out
    root = Path(s["species_root"])
    if not root.is_dir():
        return debian_species(root)  # its DataError says how to install the genomes
    # ragout's layout (some folder has references/, as genome_files decides): its references, not its draft contigs,
    # and Debian's K. pneumoniae where installed; otherwise a folder of FASTA files per species, nothing added
    return debian_species(root, klebsiella=KLEBSIELLA_GENOMES if is_ragout_layout(root) else None)


def _classifier(mixer: str, s: dict, num_classes: int):
    ssm_cfg = {"layer": "Mamba1", "d_state": s["d_state"]} if mixer == "Mamba" else \
        {"layer": "S4D", "d_state": s["d_state"], "A_init": "S4D-Lin"}
    cfg = MambaConfig(d_model=s["d_model"], n_layer=s["n_layer"], vocab_size=VOCAB, ssm_cfg=ssm_cfg)
    return lambda: SequenceClassifier.from_config(cfg, num_classes, pooling="mean")


def prepare(run: Run) -> None:
    """The --quick stand-in genomes, written before `--workers` start (each would otherwise write them at once)."""
    _species_files(run, settings(run.quick))


def run(run: Run) -> int:
    s = run.with_steps(settings(run.quick))  # --steps: every model, the README and the schedules
    files = _species_files(run, s)
    data = SpeciesWindows({name: load_genome(paths, min_length=s["min_record"]) for name, paths in files.items()},
                          test_fraction=s["test_fraction"])
    chance = 1.0 / data.num_classes
    train = TrainSettings(steps=s["steps"], batch_size=0, lr=s["lr"], warmup_steps=s["warmup_steps"], weight_decay=0.1)

    def loss_fn(model, ids, labels):
        return F.cross_entropy(model(ids).float(), labels)

    rows, curves = [], {}
    for k in s["windows_log2"]:
        L = 2 ** k
        batch = max(1, s["tokens_per_step"] // L)

        def make_batch(step: int, g: torch.Generator):
            ids, labels = data.sample("train", batch, L, g)
            return random_reverse_complement(ids, g), labels

        for mixer in ("Mamba", "S4D"):
            key = f"{mixer.lower()}-L{L}"
            model = train_module(run, key, _classifier(mixer, s, data.num_classes),
                                 dataclasses.replace(train, batch_size=batch), make_batch, loss_fn)
            result = None if model is None else run.cached(key, "test", lambda: _evaluate(model, data, L, s,
                                                                                          run.device))
            if result is None:  # the time budget, or another worker's model: go on to the next one
                continue
            record = _record(run, key)
            curves[key] = record["losses"]
            rows.append({"model": key, "mixer": mixer, "window": L, "accuracy": result["accuracy"],
                         "test_windows": result["test_windows"], "chance": chance, "batch_size": batch,
                         "steps": record["steps"], "train_s": round(record["train_s"], 1),
                         "final_loss": record["final_loss"], "params": record["params"]})
    if not run.results_ready():
        return run.unfinished()
    _plot(run.out / "accuracy_vs_window.png", rows, chance)
    loss_plot(run.out / "training_loss.png", curves, "species classification")
    sources = {name: [str(p) for p in paths] for name, paths in files.items()}
    run.write_results(rows, {**s, "species": sources, "longest_test_window": data.max_length("test")},
                      _readme(rows, s, data, chance))
    return FINISHED


def _record(run: Run, key: str) -> dict:
    from .common import _read_json

    return _read_json(run.state / key / "done.json")


@torch.no_grad()
def _evaluate(model, data: SpeciesWindows, L: int, s: dict, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(TEST_SEED + L)
    ids, labels = data.sample("test", s["test_windows"], L, g)
    hits = 0
    for i in range(0, ids.shape[0], s["eval_batch"]):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(ids[i:i + s["eval_batch"]].to(device))
        hits += int((logits.argmax(-1).cpu() == labels[i:i + s["eval_batch"]]).sum())
    return {"accuracy": hits / ids.shape[0], "test_windows": int(ids.shape[0])}


def _plot(path, rows, chance) -> None:
    fig, ax = figure(figsize=(5, 3.5))
    for mixer in ("Mamba", "S4D"):
        pts = sorted((r["window"], 100 * r["accuracy"]) for r in rows if r["mixer"] == mixer)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mixer)
    ax.axhline(100 * chance, color="gray", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 102)
    ax.set_xlabel("window length (bases)")
    ax.set_ylabel("test accuracy (%)")
    save_plot(fig, path, ax, "species classification")


def _readme(rows, s, data, chance) -> str:
    windows = [2 ** k for k in s["windows_log2"]]
    table_rows = []
    for mixer in ("Mamba", "S4D"):
        acc = {r["window"]: r["accuracy"] for r in rows if r["mixer"] == mixer}
        table_rows.append([mixer] + [percent(acc.get(L)) for L in windows])
    table_rows.append(["chance"] + [percent(chance) for _ in windows])
    table = markdown_table(["model"] + [f"L = 2^{int(math.log2(L))}" for L in windows], table_rows)
    return f"""# Species classification from DNA windows (Mamba paper, Figure 6)

Test accuracy (%) of naming the species of a random window of L bases.

{table}

![accuracy against window length](accuracy_vs_window.png) ![training loss](training_loss.png)

**Species** ({data.num_classes}): {', '.join(data.species)}. Each record's first {1 - s['test_fraction']:.0%} is the
train region, the rest the test region (no shared base). Genomes: `{s['species_root']}`, a folder per species
(`MAMBAKIT_SPECIES`; without it ragout-examples' four species; `src/mambakit/reproduce/README.md` says how to add
kleborate-examples' K. pneumoniae as a fifth). {s['test_windows']} test windows per length (seed {TEST_SEED} + L).

**Models**: `SequenceClassifier` (mean pooling) over {s['n_layer']} blocks of width {s['d_model']}, Mamba (Mamba-1) or
S4D (S4D-Lin in the Mamba block), d_state {s['d_state']}. One model per window length, trained from scratch for
{s['steps']} steps of {s['tokens_per_step']:,} bases (batch = bases / L), lr {s['lr']:g}, reverse-complement
augmentation.
"""
