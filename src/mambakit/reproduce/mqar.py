"""`mambakit reproduce mqar`: multi-query associative recall, Mamba-1 vs Mamba-2 vs attention (Mamba-2 paper,
Section 9.1, Figure 8; Arora et al. 2023, "Zoology").

MQAR (data/synthetic.py has the exact spec): K key-value pairs, then every key again as a query whose value
must be recalled. A recurrent model must hold all K pairs in its state, so a larger state (N = d_state) helps:
the Mamba-2 paper's point is that SSD's larger states (N = 64, 256) solve what Mamba-1's N = 16 cannot.

Grid: sequence lengths T = 256 and 512 with K = T / 8 pairs; Mamba-1 and Mamba-2 at d_state 16 / 64 / 256;
attention (rotary) as the reference that solves it at any state size. 2 layers, d_model 64, no MLP. Accuracy is the
share of queries of a fixed test set answered by argmax. No checkpoints are kept (14 models x 3 seeds).

Every model trains from several seeds and the table reports the median (results.json: min, max, every seed);
a model stops early once its accuracy on a validation set of its own (VAL_SEED) is >= `target` twice in a row.
Recurrent models learn associative recall only in a narrow window of learning rates (Okpekpe & Orvieto 2025,
"Revisiting associative recall in modern recurrent models"), which the paper handles with a sweep; here one rate
per family (below).

The recipe, and why it departs from the paper (vocabulary 8192, lr 2e-3 for all, 4000 steps did not learn on an
H200: after 4000 steps attention at T = 256 had 1.0% test accuracy, loss 7.44 of ln 8192 = 9.01; Mamba-2 N16
0.8%, N64 5.7%):

- **Vocabulary 256, not 8192** (a departure from the paper). With 8192 ids each of the 4095 keys occurs about
  once in two batches, and the rows of its embedding (tied to the output head) learn that slowly; models sit on
  the plateau where they predict some value of the row, not the queried one (accuracy ~1/K). The task is the same
  at any vocabulary: K distinct keys (127 available; T = 512 uses 64 per row), each value one of 128, so the state
  must still hold K associations of 7 bits each. It also makes the resume state small: `_state/<model>/train.pt`
  (weights, AdamW moments, best-evaluation copy) is 0.9 (attention) to 4.4 MB (Mamba-1 N256)
  instead of 11-15 MB at 8192.
- **Learning rate per family**: attention 5e-3, the SSMs 2e-3 (Zoology and the Mamba-2 paper sweep the rate per
  model and report the best). On the CPU proxy attention at 2e-3 stayed on its plateau where 5e-3 solved it; Mamba-2
  N64 at T 64 had 37% at step 600 with 2e-3 (vocabulary 1024) but 10.5% with 5e-3 (vocabulary 256).
  The full run (session 20, results/mqar/) left every Mamba-1 on the plateau at 2e-3. A CPU study at T 32
  (BENCHMARKS.md, "why MQAR's Mamba-1 stays on the plateau") found Mamba-1 leaving it at ~3,100 steps at 2e-3
  (Mamba-2 N64: ~1,300) and sooner at higher rates (1e-2: ~750-1,000, but one seed of three not within 2,000),
  with no bug and no help from other A or dt initialisations: the next candidate for Mamba-1 is a higher rate.
- **4000 steps at most** (batch 64, 100-step warmup, then constant; weight decay 0.1 as Zoology), with early
  stopping at 99% validation accuracy. A 2000-step pilot on an H200 (reproduce/README.md) trained 29 of the 42 runs
  in 240 s with `--workers 6` (21-108 s per model) and left Mamba-2 N64 at T 256 still rising (97.3%, 89.6%, 8.3%),
  hence 4000: the full grid is then about 12-15 GPU-minutes.
- **A length curriculum** for every model (`curriculum`): 300 steps at T 32, then 300 at each doubling below the
  tested length (T 64, 128; for T 512 also 256), always K = T / 8, then the tested length to the end; like Zoology,
  which trains on a mixture of shorter rows with fewer pairs. Without it attention never left its plateau at
  T 256 (6.0-6.8%: two seeds on an H200 in 2000 steps, the CPU proxy in 1200). A model leaves the plateau during
  a short stage and carries what it learnt to T 256. CPU proxy, session 18 (`benchmarks/mqar_probe.py`'s first
  version), attention at T 256 (validation, 128 rows): stages from T 64 (64, 128 x 300 steps): seed 0 99.6% at
  step 700, seed 2 91.3% at 1200 and rising, seed 1 6.4% at 1200 (5.4-6.3% also with 600 steps at T 64, at lr
  1e-2 and at lr 2e-3); stages from T 32 (32, 64, 128 x 300): seed 1 99.5% at step 1000 (seeds 0 and 2 not rerun). Stages of 150 steps were too short (seed 0 from T 64:
  6.4% at 1500). Mamba-2 N64 (seed 0, stages from T 64) was not hurt: 4.4% at step 1000, 0.8-0.9% for 700 steps
  without (the CPU proxy is far slower to learn than the H200, where N64 reached 89-97% in 2 of 3 seeds at 2000
  steps without it).
  Mixing easier rows into every batch instead (half the batch at T 16 / 32 with 2 / 4 pairs) had slowed attention
  down (below).

CPU proxy (1 thread, d_model 64, batch 64, K = T / 8, seed 0, validation accuracy on 128 rows of the tested
setting at steps 100, 200, ...):

| config | accuracy (%) at steps 100 / 200 / ... | s/step |
|---|---|---|
| attention, T 128, V 8192, lr 2e-3 | (timed over 10 steps only) | 2.27 |
| attention, T 128, V 1024, lr 2e-3 | 2.7 / 5.2 / 6.1 / 6.4 / 6.2 / 6.3 | 0.28 |
| attention, T 128, V 1024, lr 2e-3, 3/4 of the batch easier rows | 2.3 / 5.1 / 5.5 / 5.7 / 6.1 / 5.5 | 0.24 |
| attention, T 128, V 1024, lr 5e-3 | 3.8 / 5.4 / 5.6 / 6.3 / 5.7 / 6.6 / 6.3 / 6.2 | 0.42 |
| attention, T 64, V 1024, lr 2e-3 | 4.5 / 9.9 / 10.9 / 11.3 / 11.2 / 11.6 | 0.085 |
| attention, T 64, V 1024, lr 1e-2 | 8.9 / 9.1 / 10.4 / 10.7 / 10.7 / 11.1 | 0.09 |
| attention, T 64, V 1024, lr 5e-3 | 7.6 / 10.2 / 10.5 / 11.0 / 12.3 / 39.3 | 0.09 |
| attention, T 64, V 256, lr 2e-3 | 12.0 / 14.6 / 14.3 / 16.2 / 22.5 / 35.1 | 0.056 |
| attention, T 64, V 256, lr 2e-3, half the batch easier rows | 11.5 / 14.4 / 15.2 / 15.3 / 14.8 / 14.8 | 0.054 |
| attention, T 64, V 256, lr 5e-3 | 13.9 / 14.7 / 28.9 / 81.5 / 95.2 / 97.8 | 0.054 |
| attention, T 128, V 256, lr 5e-3 | 7.9 / 8.8 / 8.7 / 12.8 / 62.1 / 88.7 / 97.9 / 99.1 | 0.18 |
| Mamba-2 N64, T 64, V 1024, lr 2e-3 | 0.1 / 0.1 / 1.5 / 3.3 / 6.7 / 37.2 | 0.15 |
| Mamba-2 N64, T 64, V 256, lr 5e-3 | 0.9 / 3.0 / 3.6 / 6.9 / 8.7 / 10.5 | 0.20 |
| Mamba-2 N64, T 128, V 256, lr 2e-3 | 1.1 / 1.0 / 2.3 / 3.1 / 3.7 / 5.6 / 5.2 / 5.9 | 0.55 |
("easier rows": T 32 / 64 / 128 with 2 / 4 / 8 pairs at T 128, T 16 / 32 with 2 / 4 pairs at T 64, padded with
filler.) Attention leaves its plateau later as T grows (T 64: step ~300, T 128: ~450). At T 256 it had not left it
after 1200 CPU steps (fp32 and bf16 autocast alike, 6.0-6.5%; lr 2e-3, rotary on 8 of 16 dims, one head of 64 dims
and d_model 128 all 5.8-6.7% at 700-1200 steps) nor after 2000 on the H200: at that length it is this recipe, not
the GPU. Mamba-2 N64 left its plateau at T 64 by step 600 (vocabulary 1024) but was still on it (5.9%, loss falling
slowly) at T 128 after 800 steps. A model short of the target trains on with `--resume --steps N`.
"""

from __future__ import annotations

import torch

from ..models import MambaConfig
from ..data.synthetic import mqar
from .common import (FINISHED, ModelSpec, Run, TrainSettings, correct_and_count, curriculum_length, figure, loss_plot,
                     markdown_table, percent, save_plot, seeded, spread)

NAME = "mqar"
SUMMARY = "Mamba-2 paper Figure 8: MQAR, Mamba-1 vs Mamba-2 vs attention at d_state 16 / 64 / 256, two lengths"
INDEPENDENT_MODELS = True  # no model needs another's result: `--workers N` trains N at once
TEST_SEED = 3_000_000_019
VAL_SEED = 3_000_000_037  # the early-stopping sets (seed + T): never a test set


def settings(quick: bool) -> dict:
    """Full size: T 256 / 512, K = T / 8, vocabulary 256, batch 64, at most 4000 steps per model (lr 5e-3 for
    attention, 2e-3 for the SSMs) of which the first 300 per curriculum stage (`curriculum`), 3 seeds, early stopping
    at 99% validation accuracy at the tested length (256 rows, every 250 steps); quick: a CPU smoke run."""
    if quick:
        return {"seqlens": [32, 64], "kv_divisor": 8, "vocab_size": 64, "d_model": 16, "d_states": [4, 8],
                "heads": 2, "headdim": 8, "batch_size": 4, "steps": 3, "lr": 3e-3, "attention_lr": 3e-3,
                "warmup_steps": 1, "test_rows": 8, "eval_batch": 4, "seeds": [0, 1], "val_rows": 4, "eval_every": 2,
                "target": 0.99, "curriculum_start": 16, "stage_steps": 1}
    return {"seqlens": [256, 512], "kv_divisor": 8, "vocab_size": 256, "d_model": 64, "d_states": [16, 64, 256],
            "heads": 4, "headdim": 16, "batch_size": 64, "steps": 4000, "lr": 2e-3, "attention_lr": 5e-3,
            "warmup_steps": 100, "test_rows": 1024, "eval_batch": 128, "seeds": [0, 1, 2], "val_rows": 256,
            "eval_every": 250, "target": 0.99, "curriculum_start": 32, "stage_steps": 300}


def curriculum(T: int, s: dict) -> list[tuple[int, int]]:
    """The (length, steps) stages before a model trains at its tested length T: `curriculum_start`, doubled while
    below T, `stage_steps` each (full size: T 256 -> [(32, 300), (64, 300), (128, 300)]; T 512 adds (256, 300))."""
    stages, length = [], s["curriculum_start"]
    while length < T:
        stages.append((length, s["stage_steps"]))
        length *= 2
    return stages


def seqlen_at(step: int, T: int, s: dict) -> int:
    """Row length of training batch `step` of a model tested at T (K = length / kv_divisor pairs): the curriculum's
    stages in turn, then T to the end (so `--steps N` extends a model at the tested length)."""
    return curriculum_length(step, curriculum(T, s), T)


def train_settings(s: dict, attention: bool = False) -> TrainSettings:
    """Weight decay 0.1 as Zoology's recipe for MQAR; the learning rate (`attention_lr` for attention, `lr` for the
    SSMs) is constant after warmup."""
    return TrainSettings(steps=s["steps"], batch_size=s["batch_size"], lr=s["attention_lr"] if attention else s["lr"],
                         warmup_steps=s["warmup_steps"], weight_decay=0.1, eval_every=s["eval_every"],
                         target=s["target"])


def model_specs(s: dict, T: int) -> list[ModelSpec]:
    train = train_settings(s)
    base = {"d_model": s["d_model"], "n_layer": 2, "vocab_size": s["vocab_size"], "d_intermediate": 0}
    specs = []
    for n in s["d_states"]:
        specs.append(ModelSpec(f"mamba1-N{n}-T{T}", "Mamba-1", MambaConfig(**base, ssm_cfg={"layer": "Mamba1", "d_state": n}),
                               train, save_checkpoint=False, info={"mixer": "Mamba-1", "d_state": n, "seqlen": T}))
        specs.append(ModelSpec(f"mamba2-N{n}-T{T}", "Mamba-2", MambaConfig(**base, ssm_cfg={
            "layer": "Mamba2", "d_state": n, "headdim": s["headdim"], "chunk_size": 64}), train, save_checkpoint=False,
            info={"mixer": "Mamba-2", "d_state": n, "seqlen": T}))
    head_dim = s["d_model"] // s["heads"]
    specs.append(ModelSpec(f"attention-T{T}", "attention", MambaConfig(
        **base, attn_layer_idx=[0, 1], attn_cfg={"num_heads": s["heads"], "rotary_emb_dim": head_dim}),
        train_settings(s, attention=True),
        save_checkpoint=False, info={"mixer": "attention", "d_state": None, "seqlen": T}))
    return specs


@torch.inference_mode()
def evaluate(model, T: int, s: dict, device: torch.device, seed: int = TEST_SEED, rows: int | None = None) -> dict:
    """Share of the queries of a fixed set (seed + T; the test set by default) answered by argmax."""
    rows = s["test_rows"] if rows is None else rows
    hits = count = 0
    gen = torch.Generator().manual_seed(seed + T)
    for start in range(0, rows, s["eval_batch"]):
        batch = mqar(min(s["eval_batch"], rows - start), T, T // s["kv_divisor"], s["vocab_size"],
                     generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch.inputs)
        h, c = correct_and_count(logits, batch.targets, s["vocab_size"])
        hits, count = hits + h, count + c
    return {"accuracy": hits / count, "test_queries": count}


def run(run: Run) -> int:
    s = settings(run.quick)
    grid = [(T, base) for T in s["seqlens"] for base in model_specs(s, T)]
    per_seed: dict[str, list[tuple[ModelSpec, dict, dict]]] = {base.key: [] for _, base in grid}
    for seed in s["seeds"]:  # seed-major: every cell has a first result early in a run split into pieces
        for T, base in grid:
            spec = seeded(base, seed)
            validate = lambda model: {"accuracy": evaluate(model, T, s, run.device, VAL_SEED, s["val_rows"])["accuracy"]}
            # batch `step` at the curriculum's length (a pure function of the step, as resuming needs), recorded
            # with the recipe so that a state trained under another curriculum is trained again
            model = run.train(spec, lambda step, g: _batch(step, T, s, g), validate=validate,
                              recipe_extra={"curriculum": [list(c) for c in curriculum(T, s)]})
            if model is None:
                continue
            result = run.cached(spec, "test", lambda: evaluate(model, T, s, run.device))
            if result is None:
                continue
            per_seed[base.key].append((spec, result, run.training_record(spec)))
    if not run.results_ready():
        return run.unfinished()
    rows, curves = [], {}
    for T, base in grid:
        runs = per_seed[base.key]
        accs = [result["accuracy"] for _, result, _ in runs]
        curves[base.key] = runs[0][2]["losses"]  # seed 0's: one curve per cell keeps the plot readable
        rows.append({"model": base.key, **base.info, "num_kv_pairs": T // s["kv_divisor"],
                     "accuracy": spread(accs)["median"], "accuracy_spread": spread(accs),
                     "test_queries": runs[0][1]["test_queries"], "steps": max(r["steps"] for _, _, r in runs),
                     "train_s": round(sum(r["train_s"] for _, _, r in runs), 1), "final_loss": runs[0][2]["final_loss"],
                     "params": runs[0][2]["params"],
                     "seeds": [{"seed": sp.train.seed, "accuracy": res["accuracy"], "steps": rec["steps"],
                                "early_stop_step": rec.get("early_stop_step"),
                                "selected_step": rec.get("selected_step"), "train_s": round(rec["train_s"], 1),
                                "final_loss": rec["final_loss"], "val_history": rec.get("val_history", [])}
                               for sp, res, rec in runs]})
    _plot(run.out / "accuracy_vs_state.png", rows, s)
    loss_plot(run.out / "training_loss.png", curves, "MQAR (seed 0)")
    run.write_results(rows, {**s, "test_seed": TEST_SEED, "val_seed": VAL_SEED}, _readme(rows, s))
    return FINISHED


def _batch(step: int, T: int, s: dict, generator: torch.Generator):
    length = seqlen_at(step, T, s)
    return mqar(s["batch_size"], length, length // s["kv_divisor"], s["vocab_size"], generator=generator)


def _plot(path, rows, s) -> None:
    fig, axes = figure(1, len(s["seqlens"]), squeeze=False, sharey=True, figsize=(4 * len(s["seqlens"]), 3.5))
    for ax, T in zip(axes[0], s["seqlens"]):
        for mixer in ("Mamba-1", "Mamba-2"):
            pts = sorted((r["d_state"], 100 * r["accuracy"], 100 * r["accuracy_spread"]["min"],
                          100 * r["accuracy_spread"]["max"]) for r in rows if r["seqlen"] == T and r["mixer"] == mixer)
            if pts:
                n, med, lo, hi = zip(*pts)
                ax.errorbar(n, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                            marker="o", capsize=3, label=mixer)
        for r in rows:
            if r["seqlen"] == T and r["mixer"] == "attention":
                ax.axhline(100 * r["accuracy"], color="gray", linestyle="--", label="attention")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state size N (d_state)")
        ax.set_title(f"T = {T}, {T // s['kv_divisor']} pairs")
        ax.set_ylim(0, 102)
    axes[0][0].set_ylabel("accuracy (%)")
    save_plot(fig, path, axes[0][0])


def _readme(rows, s) -> str:
    header = ["mixer"] + [f"T={T}, N={n}" for T in s["seqlens"] for n in s["d_states"]]
    table_rows = []
    for mixer in ("Mamba-1", "Mamba-2"):
        acc = {(r["seqlen"], r["d_state"]): r["accuracy"] for r in rows if r["mixer"] == mixer}
        table_rows.append([mixer] + [percent(acc.get((T, n))) for T in s["seqlens"] for n in s["d_states"]])
    attn = {r["seqlen"]: r["accuracy"] for r in rows if r["mixer"] == "attention"}
    table_rows.append(["attention (no state)"] + [percent(attn.get(T)) for T in s["seqlens"] for _ in s["d_states"]])
    table = markdown_table(header, table_rows)
    return f"""# Multi-query associative recall (Mamba-2 paper, Figure 8)

Accuracy (%) of recalling every queried key's value: the median of seeds {', '.join(map(str, s['seeds']))} (the plot's
bars: min-max; results.json: every seed).

{table}

![accuracy against state size](accuracy_vs_state.png) ![training loss](training_loss.png)

**Task** (`mambakit.data.synthetic.mqar`, spec in its docstring): K = T / {s['kv_divisor']} key-value pairs
(vocabulary {s['vocab_size']}: keys from the lower half, values from the upper), then each key once more as a query at
a random even offset of the rest of the row; the logits at a query must predict its value. Accuracy over every query of
a fixed test set ({s['test_rows']} rows per length, seed {TEST_SEED} + T).

**Models**: 2 layers, d_model {s['d_model']}, no MLP. Mamba-1 and Mamba-2 (headdim {s['headdim']}) at d_state
{' / '.join(map(str, s['d_states']))}; attention with {s['heads']} heads and rotary positions (its "state" is the
whole KV cache, shown once per length).

**Budget**: every SSM trains {train_settings(s).describe()}; attention the same at lr {s['attention_lr']:g}. The
first steps follow a length curriculum ({s['stage_steps']} steps at each of T = {s['curriculum_start']}, doubling,
below the tested length, K = T / {s['kv_divisor']}; then the tested length);
validation: {s['val_rows']} rows per length (seed {VAL_SEED} + T); no learning-rate sweep (the paper sweeps and
reports the best), so a model that fails here might succeed at another learning rate.

**Departures from the paper** (mqar.py's docstring has the CPU evidence): vocabulary {s['vocab_size']}, not 8192
(the 4095 keys' embeddings of an 8192 vocabulary learn too slowly for this budget: on an H200, 4000 steps at
lr 2e-3 left attention at 1% at T = 256); one learning rate per family instead of a sweep; the length curriculum
(without it attention stayed at its 6% plateau at T = 256).
"""
