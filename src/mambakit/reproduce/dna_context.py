"""`mambakit reproduce dna-context`: DNA pretraining perplexity against context length, Mamba vs S4D (Mamba paper,
Section 4.3.1, Figure 5 right).

Claim: a selective model keeps using longer context (held-out perplexity falls as the training context grows to
2^20 bases), while a time-invariant model (HyenaDNA there, S4D here) does not improve, or gets worse.

Data: FASTA genomes through `mambakit.data.dna` (one token per base; A C G T N), each record's last 5% held out;
reverse-complement augmentation (each training window is read from either strand with probability 1/2). Full
size: Debian's `ragout-examples` (16 complete bacterial genomes, 4 species, 48.2 Mbp; the draft contigs beside
them are left out, as they re-assemble the same strains and would leak held-out bases) or the directory in
$MAMBAKIT_GENOMES; the paper pretrains on the human genome (HG38), which no package ships. --quick: two small
stand-in genomes from an order-3 Markov chain, written under _state/.

Models: 6 layers of width 128 (as the paper's small models), Mamba (Mamba-1, d_state 16) and S4D (S4D-Lin in the
Mamba block, d_state 16). One model per (mixer, context length L), trained from scratch with the same number of
tokens per step (batch = tokens_per_step / L) and steps, so every point costs the same compute. Sequence-length
warm-up (HyenaDNA's, used by the paper): the window starts at `slw_start` bases and doubles every stage until L,
stages spread over the first `slw_fraction` of training, tokens per step held constant.

Metric: perplexity exp(mean nats per base) on held-out windows of the model's own context length (non-overlapping,
each starting from an empty state), `eval_tokens` bases at most.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from ..data.dna import DEBIAN_GENOMES, genome_files, genome_streams, load_genome, random_reverse_complement
from ..data.synthetic import SyntheticBatch
from ..models import MambaConfig
from .common import (FINISHED, ModelSpec, Run, TrainSettings, context_verdict, figure, loss_plot, markdown_table,
                     save_plot)
from .dna_audio_common import markov_genome_fasta

NAME = "dna-context"
SUMMARY = "Mamba paper Figure 5 (right): DNA perplexity against context length 2^10 .. 2^20, Mamba vs S4D"
VOCAB = 9
INDEPENDENT_MODELS = True  # one model per (mixer, context), none needs another's result: `--workers N` trains N at once


def settings(quick: bool) -> dict:
    """Full size (GPU; not yet run): contexts 2^10 .. 2^20, 2^20 tokens per step (one window of the longest
    context, so every context trains on the same tokens: with fewer tokens per step than bases in a window the
    longest contexts would see more), 250 steps per model (2^28 tokens, ~13 passes over the ~20M bases), lr 8e-3
    (the paper's small-model DNA rate; a constant rate after warmup, as the synthetic experiments); quick: a CPU
    smoke run on stand-in genomes.

    Session 22 changed 2^18 tokens x 2000 steps (as many tokens, but 4x at 2^20) to 500 steps of 2^20; session 23
    halved the steps: a model trains in 55 s (Mamba) to 85 s (S4D) at 2^10..2^14 on an H200, and S4D's step is
    715 ms at 2^20 (session 24), so the twelve take ~15 min of GPU, one model at a time (up to 106 GB each)."""
    if quick:
        return {"genomes": None, "contexts_log2": [5, 6], "tokens_per_step": 256, "steps": 4, "lr": 2e-3,
                "warmup_steps": 1, "d_model": 16, "n_layer": 2, "d_state": 4, "slw_start": 16, "slw_fraction": 0.5,
                "eval_tokens": 512, "eval_batch": 4, "val_fraction": 0.05}
    return {"genomes": os.environ.get("MAMBAKIT_GENOMES", str(DEBIAN_GENOMES)), "contexts_log2": list(range(10, 21, 2)),
            "tokens_per_step": 2 ** 20, "steps": 250, "lr": 8e-3, "warmup_steps": 25, "d_model": 128, "n_layer": 6,
            "d_state": 16, "slw_start": 2 ** 10, "slw_fraction": 0.5, "eval_tokens": 2 ** 22, "eval_batch": 8,
            "val_fraction": 0.05}


def window_length(step: int, context: int, s: dict) -> int:
    """The sequence-length warm-up: slw_start doubling in equal stages over the first slw_fraction of the steps
    (s["steps"]: `run` replaces it with --steps, so a shorter run warms up in proportion)."""
    start = min(s["slw_start"], context)
    stages = int(math.log2(context // start))
    if stages == 0:
        return context
    stage_steps = max(1, int(s["slw_fraction"] * s["steps"]) // stages)
    return min(context, start * 2 ** (step // stage_steps))


def model_specs(s: dict) -> list[ModelSpec]:
    train = TrainSettings(steps=s["steps"], batch_size=0, lr=s["lr"], warmup_steps=s["warmup_steps"], weight_decay=0.1,
                          beta2=0.95)
    base = {"d_model": s["d_model"], "n_layer": s["n_layer"], "vocab_size": VOCAB}
    specs = []
    for k in s["contexts_log2"]:
        L = 2 ** k
        batch = max(1, s["tokens_per_step"] // L)
        t = dataclasses.replace(train, batch_size=batch)
        specs.append(ModelSpec(f"mamba-L{L}", "Mamba", MambaConfig(**base, ssm_cfg={"layer": "Mamba1", "d_state": s["d_state"]}),
                               t, save_checkpoint=False, info={"mixer": "Mamba", "context": L}))
        specs.append(ModelSpec(f"s4d-L{L}", "S4D", MambaConfig(**base, ssm_cfg={"layer": "S4D", "d_state": s["d_state"],
                                                                               "A_init": "S4D-Lin"}),
                               t, save_checkpoint=False, info={"mixer": "S4D", "context": L}))
    return specs


def _genome_path(run: Run, s: dict) -> Path:
    if s["genomes"] is not None:
        return Path(s["genomes"])
    folder = run.state / "genomes"
    for i in range(2):
        if not (folder / f"standin{i}.fa.gz").exists():
            markov_genome_fasta(folder / f"standin{i}.fa.gz", n_records=1, length=4000, seed=i)
    return folder


def prepare(run: Run) -> None:
    """The --quick stand-in genomes, written before `--workers` start (each would otherwise write them at once)."""
    _genome_path(run, settings(run.quick))


def run(run: Run) -> int:
    s = run.with_steps(settings(run.quick))  # --steps: every model, the README and the schedules
    genome = load_genome(genome_files(_genome_path(run, s)))  # ragout's layout: references, not draft contigs
    train_stream, val_stream = genome_streams(genome, s["val_fraction"], reverse_complement_train=False)
    tokens = train_stream.tokens

    def make_batch(context: int):
        def make(step: int, g: torch.Generator) -> SyntheticBatch:
            L = window_length(step, context, s)
            b = max(1, s["tokens_per_step"] // L)  # constant tokens per step through the warm-up
            starts = torch.randint(0, tokens.numel() - L - 1, (b,), generator=g)
            rows = tokens[starts[:, None] + torch.arange(L + 1)].long()  # (b, L + 1)
            rows = random_reverse_complement(rows, g)
            return SyntheticBatch(rows[:, :-1], rows[:, 1:])
        return make

    rows, curves = [], {}
    for spec in model_specs(s):
        L = spec.info["context"]
        model = run.train(spec, make_batch(L))
        result = None if model is None else run.cached(spec, "val", lambda: _evaluate(model, val_stream, L, s,
                                                                                      run.device))
        if result is None:  # the time budget, or another worker's model: go on to the next one
            continue
        record = run.training_record(spec)
        curves[spec.key] = record["losses"]
        rows.append({"model": spec.key, **spec.info, "perplexity": result["perplexity"],
                     "bits_per_base": result["bits_per_base"], "val_tokens": result["tokens"],
                     "batch_size": spec.train.batch_size, "steps": record["steps"],
                     "train_s": round(record["train_s"], 1), "final_loss": record["final_loss"],
                     "params": record["params"]})
    if not run.results_ready():
        return run.unfinished()
    _plot(run.out / "perplexity_vs_context.png", rows)
    loss_plot(run.out / "training_loss.png", curves, "DNA pretraining")
    run.write_results(rows, {**s, "genome_records": genome.names, "genome_bases": len(genome)}, _readme(rows, s, genome))
    return FINISHED


@torch.no_grad()
def _evaluate(model, val_stream, context: int, s: dict, device: torch.device) -> dict:
    from ..evaluation import evaluate_bits_per_byte

    seqlen = min(context, len(val_stream) - 1)
    nats, bits = evaluate_bits_per_byte(model, val_stream, seqlen, s["eval_batch"], s["eval_tokens"],
                                        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return {"perplexity": math.exp(nats), "bits_per_base": bits, "tokens": min(len(val_stream) - 1, s["eval_tokens"])}


def _plot(path, rows) -> None:
    fig, ax = figure(figsize=(5, 3.5))
    for mixer in ("Mamba", "S4D"):
        pts = sorted((r["context"], r["perplexity"]) for r in rows if r["mixer"] == mixer)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mixer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training context length (bases)")
    ax.set_ylabel("held-out perplexity")
    save_plot(fig, path, ax, "DNA pretraining: perplexity vs context")


def _readme(rows, s, genome) -> str:
    contexts = [2 ** k for k in s["contexts_log2"]]
    table_rows = []
    for mixer in ("Mamba", "S4D"):
        ppl = {r["context"]: r["perplexity"] for r in rows if r["mixer"] == mixer}
        table_rows.append([mixer] + [f"{ppl[L]:.3f}" if L in ppl else "-" for L in contexts])
    table = markdown_table(["mixer"] + [f"L = 2^{int(math.log2(L))}" for L in contexts], table_rows)
    return f"""# DNA pretraining: perplexity against context length (Mamba paper, Figure 5 right)

Held-out perplexity per base (lower is better; 4 is a uniform guess over A C G T).

{table}

![perplexity against context](perplexity_vs_context.png) ![training loss](training_loss.png)

**Data**: {len(genome.names)} FASTA records, {len(genome):,} bases ({s['genomes'] or 'stand-in Markov genomes (--quick)'});
the last {s['val_fraction']:.0%} of each record held out; one token per base; reverse-complement augmentation.

**Models**: {s['n_layer']} layers of width {s['d_model']}, Mamba (Mamba-1) and S4D (S4D-Lin in the Mamba block),
d_state {s['d_state']}, no MLP. Each context length L is a separate model trained from scratch for {s['steps']} steps of
{s['tokens_per_step']:,} tokens (batch = tokens / L), with a sequence-length warm-up from {s['slw_start']} bases doubling
over the first {s['slw_fraction']:.0%} of the steps. Evaluation: non-overlapping held-out windows of length L, at most
{s['eval_tokens']:,} bases.

## What it shows

{context_verdict({m: {r["context"]: r["perplexity"] for r in rows if r["mixer"] == m} for m in ("Mamba", "S4D")},
                 "Mamba", "S4D", "perplexity")}

How this differs from the paper's run: bacterial genomes, not the human genome; {s['steps']} steps of
{s['tokens_per_step']:,} tokens for every model ({s['steps'] * s['tokens_per_step'] / 1e6:,.0f}M tokens), so the model at
the longest context sees {max(1, s['tokens_per_step'] // contexts[-1])} window(s) a step and, after the warm-up,
~{max(1, round(s['steps'] * (1 - s['slw_fraction']))) * max(1, s['tokens_per_step'] // contexts[-1])} windows of its
full length in all; the paper trains each model far longer.
"""
