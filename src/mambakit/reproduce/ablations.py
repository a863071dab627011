"""`mambakit reproduce ablations`: the spirit of the Mamba paper's ablation tables (Gu & Dao 2023, Section 4.6,
Tables 6 to 10) on a small language model of the lm-scaling corpus.

Every row is one model of the same size, trained on the same tokens with the same settings, differing in one
field of its config (`ssm_cfg`); the table reports held-out perplexity. Groups:

    Table 6  architecture x SSM layer: the Mamba block (gated) or the ungated block, with the selective S6 layer
             (Mamba1 / Mamba1Ungated) or the LTI S4D layer (S4D, real or complex A)
    Table 7  which of Δ, B, C are selective (Mamba1Ablation's selective_dt / selective_B / selective_C)
    Table 8  real vs complex A. mambakit's S6 scan is real here, so the complex case is the LTI layer's: S4D-Lin
             (complex, A = -1/2 + i pi n) against S4D-Real (A = -(n + 1)), next to S6 with its real S4D-Real init
    Table 9  the size R of Δ's low-rank projection (Mamba1's dt_rank)
    Table 10 the state size N, with B, C selective and with B, C learned per-channel constants (Δ selective)

The data, tokenizer, evaluation, optimiser and schedule are lm-scaling's (see reproduce/lm_scaling.py); one
learning rate for all rows. A config that appears in several tables is trained once.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..models import MambaConfig
from .common import FINISHED, ModelSpec, Run, TrainSettings, figure, markdown_table, save_plot
from .lm_scaling import english_corpus, flops, n_params, train_and_evaluate

NAME = "ablations"
SUMMARY = "Mamba paper Tables 6-10: architecture, selective Δ/B/C, real vs complex A, Δ rank, state size N"
INDEPENDENT_MODELS = True  # every row is its own model at one fixed lr: `--workers N` trains N at once


def settings(quick: bool) -> dict:
    """Full size: d_model 128, 4 Mamba blocks (about 0.5M parameters), seqlen 512, batch 32, 1500 steps at lr 2e-3
    (about 25M tokens per row, 2.5 passes over Shakespeare + KJV in bytes).
    Quick: a CPU smoke run over every group (fewer values per group)."""
    if quick:
        return {"d_model": 16, "n_layer": 1, "seqlen": 32, "batch_size": 4, "steps": 2, "lr": 3e-3, "warmup_steps": 1,
                "dt_ranks": [2, "auto"], "d_states": [1, 4], "eval_tokens": 1024, "eval_batch_size": 8,
                "quick_corpus_chars": 20_000, "neox": False}
    return {"d_model": 128, "n_layer": 4, "seqlen": 512, "batch_size": 32, "steps": 1500, "lr": 2e-3,
            "warmup_steps": 100, "dt_ranks": [1, 2, 4, 8, "auto"], "d_states": [1, 2, 4, 8, 16],
            "eval_tokens": 1_000_000, "eval_batch_size": 16, "quick_corpus_chars": None, "neox": False}


def groups(s: dict) -> list[tuple[str, str, list[tuple[str, dict]]]]:
    """(table, title, [(row label, ssm_cfg)]) for every group."""
    sel = lambda dt, b, c: {"layer": "Mamba1Ablation", "selective_dt": dt, "selective_B": b, "selective_C": c}  # noqa: E731
    return [
        ("Table 6", "architecture x SSM layer", [
            ("Mamba block, S6 (Mamba)", {"layer": "Mamba1"}),
            ("ungated block, S6", {"layer": "Mamba1Ungated"}),
            ("Mamba block, S4D-Real (LTI)", {"layer": "S4D", "A_init": "S4D-Real"}),
            ("Mamba block, S4D-Lin (LTI, complex)", {"layer": "S4D", "A_init": "S4D-Lin"}),
            ("ungated block, S4D-Lin (LTI, complex)", {"layer": "S4D", "A_init": "S4D-Lin", "gated": False}),
        ]),
        ("Table 7", "selective Δ, B, C", [
            ("none (LTI)", sel(False, False, False)),
            ("Δ", sel(True, False, False)),
            ("B", sel(False, True, False)),
            ("C", sel(False, False, True)),
            ("B, C", sel(False, True, True)),
            ("Δ, B, C (Mamba)", sel(True, True, True)),
        ]),
        ("Table 8", "real vs complex A", [
            ("S6, real A (S4D-Real init)", {"layer": "Mamba1"}),
            ("LTI S4D, real A (S4D-Real)", {"layer": "S4D", "A_init": "S4D-Real"}),
            ("LTI S4D, complex A (S4D-Lin)", {"layer": "S4D", "A_init": "S4D-Lin"}),
        ]),
        ("Table 9", "size of Δ's projection (dt_rank)", [
            (f"R = {r if r != 'auto' else math.ceil(s['d_model'] / 16)}" + (" (auto: d_model / 16)" if r == "auto" else ""),
             {"layer": "Mamba1", "dt_rank": r}) for r in s["dt_ranks"]
        ]),
        ("Table 10", "state size N, B and C selective or constant", [
            (f"N = {n}, {'selective' if selective else 'constant'} B, C", sel(True, selective, selective) | {"d_state": n})
            for selective in (False, True) for n in s["d_states"]
        ]),
    ]


def normalised(ssm_cfg: dict, d_model: int) -> dict:
    """The config a row's model is built from: a Mamba-1 config with its defaults spelled out (d_state 16; dt_rank
    "auto" = ceil(d_model / 16)), so that the same model spelled two ways is one model, with one recipe: Table 9's
    R = 8 is "auto" at d_model 128, and Table 10's N = 16 rows are Table 7's."""
    if ssm_cfg["layer"] not in ("Mamba1", "Mamba1Ablation"):
        return ssm_cfg
    ssm_cfg = {"d_state": 16, **ssm_cfg}
    if ssm_cfg.get("dt_rank", "auto") == "auto":
        ssm_cfg["dt_rank"] = math.ceil(d_model / 16)
    return ssm_cfg


def _key(cfg: dict) -> str:
    """One trained model per distinct `normalised` config: Mamba1Ablation with every flag on is trained as such (its
    own row)."""
    text = json.dumps(cfg, sort_keys=True)
    return f"{cfg['layer'].lower()}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def run(run: Run) -> int:
    s = run.with_steps(settings(run.quick))  # --steps: every model, the README and the schedules
    train_stream, val_stream, data = english_corpus(s)
    vocab = data["vocab_size"]
    train = TrainSettings(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], warmup_steps=s["warmup_steps"],
                          min_lr_ratio=0.1, weight_decay=0.1, beta2=0.95, grad_clip=1.0, save_every=1000, log_every=10)
    rows, sections = [], []
    for table, title, entries in groups(s):
        lines = []
        for label, ssm_cfg in entries:
            cfg = normalised(ssm_cfg, s["d_model"])  # one model, one recipe per key
            config = MambaConfig(d_model=s["d_model"], n_layer=s["n_layer"], vocab_size=vocab, ssm_cfg=cfg)
            params = n_params(config)
            spec = ModelSpec(_key(cfg), label, config, train, save_checkpoint=False,
                             info={"family": ssm_cfg["layer"], "params": params, "lr": s["lr"],
                                   "d_model": s["d_model"], "n_layer": s["n_layer"]})
            row = train_and_evaluate(run, spec, train_stream, val_stream, s)
            if row is None:  # the time budget, or another worker's model: go on to the next row
                continue
            row = {**row, "table": table, "ssm_cfg": ssm_cfg, "flops": flops(config, params, row["tokens"], s["seqlen"])}
            rows.append(row)
            lines.append([label, f"{params / 1e3:.1f}K", f"{row['val_ppl']:.3f}", f"{row['val_bpb']:.4f}",
                          row["train_s"]])
        sections.append(f"## {table}: {title}\n\n"
                        + markdown_table(["model", "params", "val ppl", "val bits/byte", "train s"], lines))
    if not run.results_ready():
        return run.unfinished()
    readme = f"""# Ablations at small scale (Mamba paper, Tables 6-10)

One model size (d_model {s['d_model']}, {s['n_layer']} layers), each row trained for {s['steps']} steps of
{s['batch_size']} x {s['seqlen']} tokens at lr {s['lr']:g} (AdamW, cosine to 0.1 x lr, weight decay 0.1) on the
lm-scaling corpus ({'; '.join(data['sources'])}; tokenizer {data['tokenizer']}), held-out perplexity on
{data['val_documents']} whole documents. Each row changes one field of the mixer config (`ssm_cfg` in
results.json). Lower is better; differences smaller than the spread between reruns mean nothing.

![held-out bits per byte of every row](bits_per_byte_by_row.png)

{(chr(10) * 2).join(sections)}

Table 8 note: mambakit's selective scan runs a real A; the complex-vs-real comparison here is the LTI S4D layer's.
"""
    plot_rows(run.out / "bits_per_byte_by_row.png", rows)
    run.write_results(rows, {**s, "data": data}, readme)
    return FINISHED


def plot_rows(path: Path, rows: list[dict]) -> None:
    """One panel per table: each row's held-out bits per byte as a labelled dot, each panel's axis zoomed to its own
    rows' range (the differences are a few percent; compare panels by the labels)."""
    tables = list(dict.fromkeys(r["table"] for r in rows))
    counts = [sum(r["table"] == t for r in rows) for t in tables]
    fig, axes = figure(len(tables), 1, figsize=(7, 1.0 + 0.32 * sum(counts) + 0.45 * len(tables)), squeeze=False,
                       gridspec_kw={"height_ratios": counts})
    for ax, table in zip(axes[:, 0], tables):
        mine = [r for r in rows if r["table"] == table]
        lo, hi = min(r["val_bpb"] for r in mine), max(r["val_bpb"] for r in mine)
        pad = 0.15 * (hi - lo) or 0.01
        y = list(range(len(mine)))[::-1]
        ax.plot([r["val_bpb"] for r in mine], y, "o", color="tab:blue")  # dots: the axis does not start at 0
        ax.grid(axis="x", alpha=0.3)
        ax.margins(y=0.2)
        ax.set_yticks(y, [r["label"] for r in mine], fontsize=7)
        for yi, r in zip(y, mine):
            ax.text(r["val_bpb"], yi, f" {r['val_bpb']:.4f}", va="center", fontsize=7)
        ax.set_xlim(lo - 2 * pad, hi + 2 * pad)
        ax.set_title(table, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("held-out bits per byte (lower is better)")
    save_plot(fig, path, legend=False)
