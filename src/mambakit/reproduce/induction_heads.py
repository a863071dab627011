"""`mambakit reproduce induction-heads`: the Mamba paper's Table 2 / Figure 4 (Gu & Dao 2023, Section 4.1.2).

Induction heads (data/synthetic.py has the exact spec): after a trigger token, recall the token that followed
the trigger's earlier occurrence. Models train at T = 256 and are tested at T = 2^6 ... 2^20. The claim: Mamba
extrapolates perfectly to a million tokens, attention fails beyond about twice its training length.

Models (2 layers each): Mamba (Mamba-1, d_model 64), Mamba-2 (d_model 64, d_state 64), S4D (S4D-Lin, d_model
64), and two Transformers of d_model 128 with 8 heads and a gated MLP: rotary positions (MHA-RoPE) and sinusoidal
absolute positions (MHA-Abs). The Mamba row trains with state passing (`TrainSettings.state_passing`: every batch
starts from the previous batch's final states, detached; Buitrago Ruiz & Gu 2025's state-coverage intervention for
length generalisation), on the same rows of 256 tokens. Without it no recipe tried here extrapolated to 2^20 on most
seeds, the paper's own included (batch 8, constant lr 1e-3, 204,800 steps: one seed froze at 69% at 2^20 with its
loss at ~0, another stayed at 3-53% for 160,000 steps; BENCHMARKS.md, session 20). Training sees distances of at
most 253 tokens between the value and the query either way; what state passing adds is the states that follow long
histories, which is what a test row of 2^20 tokens begins its query from.

Evaluation memory: the SSM models run every test length through `generation.prefill` in chunks (constant memory
whatever T: a million tokens cost what one chunk costs); attention runs one causal SDPA forward per batch (bf16 on
CUDA: flash attention, memory linear in T, compute quadratic), up to `attention_max_len` or until the GPU runs out
of memory, whichever comes first; the README says where it stopped.

Seeds and early stopping: every model trains from several seeds and the table reports the median per length (with
the min and max). The same command run twice gave a Mamba that held 100% to 2^15 and one that fell to 91% at 2^12
(both 100% at the training length): which solution a run finds varies, so one run says little. Validation (a seed
of its own, never the test set) at the training length and, for the SSMs, at `val_long` (2^20) stops a model once
every validation accuracy is >= `target` twice in a row; a model that never gets there trains the full budget
and keeps the weights of its best validation (`selected_step`): its accuracy at 2^20 drifted widely at a
constant lr once the loss was ~0 (one Mamba: 94% at step 4,500, 34% at 6,750, 59% at 10,000).
The long validation runs only once the training length passes (before that it is recorded as None, unmet): it
costs about as much as a few hundred training steps. What sessions 12-20 tried before state passing is in
BENCHMARKS.md: validation at 2^14 (passing it said little about 2^20); batch 8 to 128, lr 1e-3 / 2e-3, constant or
cosine, up to 204,800 steps (all 100% at 256, none held 2^20 on most seeds); the evaluation's numerics (the same
predictions in float32, float64, bf16 and without chunked prefill); and what fails, the distance to the value, not the
length (`benchmarks/induction_horizon.py`): the memory of the value fades at Δ·|A| per token, and 2^20 needs a rate
below about 1e-6.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..data.synthetic import INDUCTION_VOCAB, induction_heads
from ..models import MambaConfig
from .common import (FINISHED, ModelSpec, Run, TrainSettings, figure, loss_plot, markdown_table, median_index, percent,
                     save_plot, seeded, spread)

NAME = "induction-heads"
SUMMARY = "Mamba paper Table 2: induction heads trained at T = 256, tested at T = 2^6 .. 2^20"
INDEPENDENT_MODELS = True  # no model needs another's result: `--workers N` trains N at once
TEST_SEED = 2_000_000_011
VAL_SEED = 2_000_000_033  # validation sets (seed + T): never a test set


def settings(quick: bool) -> dict:
    """Full size: train T 256, batch 128, at most 10000 steps at lr 2e-3 (one model: 107-148 s of an H200 for 10000
    steps, measured), 3 seeds, early stopping at 99.5% validation accuracy (every 250 steps); test 2^6 .. 2^20
    (attention up to 2^18); Mamba (state passing) at most 40,000 steps, validated every 500 (its three seeds took
    612 / 610 / 123 s with six models sharing an H200 through CUDA graphs). Quick: a CPU smoke run. The paper
    trains about 200K steps of 8 at a constant lr."""
    if quick:
        return {"train_len": 32, "test_log2": [4, 5, 6], "batch_size": 4, "steps": 3, "lr": 1e-3, "warmup_steps": 1,
                "ssm_d_model": 16, "attn_d_model": 16, "attn_heads": 2, "attn_mlp": 32, "mamba2_headdim": 8,
                "min_samples": 4, "max_samples": 4, "attention_max_len": 2 ** 5, "attention_samples": 4,
                "prefill_chunk": 16, "tokens_per_call": 2 ** 8, "seeds": [0, 1], "eval_every": 2, "target": 0.995,
                "val_rows": 4, "val_long": 2 ** 6, "val_long_rows": 2, "attn_lr": 1e-3,
                "mamba_steps": 4, "mamba_eval_every": 2}
    return {"train_len": 256, "test_log2": list(range(6, 21)), "batch_size": 128, "steps": 10000, "lr": 2e-3,
            "warmup_steps": 200, "ssm_d_model": 64, "attn_d_model": 128, "attn_heads": 8, "attn_mlp": 256,
            "mamba2_headdim": 16, "min_samples": 64, "max_samples": 512, "attention_max_len": 2 ** 18,
            "attention_samples": 64, "prefill_chunk": 2 ** 14, "tokens_per_call": 2 ** 22, "seeds": [0, 1, 2],
            "eval_every": 250, "target": 0.995, "val_rows": 256, "val_long": 2 ** 20, "val_long_rows": 32,
            "attn_lr": 2e-4, "mamba_steps": 40_000, "mamba_eval_every": 500}


def train_settings(s: dict) -> TrainSettings:
    return TrainSettings(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], warmup_steps=s["warmup_steps"],
                         eval_every=s["eval_every"], target=s["target"])


def model_specs(s: dict) -> list[ModelSpec]:
    train = train_settings(s)
    attn_train = dataclasses.replace(train, lr=s["attn_lr"])  # the paper's rate for the other models
    ssm = {"d_model": s["ssm_d_model"], "n_layer": 2, "vocab_size": INDUCTION_VOCAB}
    heads, d_attn = s["attn_heads"], s["attn_d_model"]
    attn = {"d_model": d_attn, "n_layer": 2, "vocab_size": INDUCTION_VOCAB, "attn_layer_idx": [0, 1],
            "d_intermediate": s["attn_mlp"]}
    head_dim = d_attn // heads
    # the Mamba row trains with state passing (module docstring: the paper's recipe did not extrapolate here); with
    # it one seed held 100% to 2^18 after 10,000 steps, still rising at 2^20, so it may train longer
    mamba_train = dataclasses.replace(train, state_passing=True, steps=s["mamba_steps"],
                                      eval_every=s["mamba_eval_every"])
    return [
        ModelSpec("mamba", "Mamba (state passing)", MambaConfig(**ssm, ssm_cfg={"layer": "Mamba1", "d_state": 16}),
                  mamba_train, info={"kind": "ssm"}),
        ModelSpec("mamba2", "Mamba-2", MambaConfig(**ssm, ssm_cfg={"layer": "Mamba2", "d_state": 64,
                                                                   "headdim": s["mamba2_headdim"], "chunk_size": 64}),
                  train, info={"kind": "ssm"}),
        ModelSpec("s4d", "S4D", MambaConfig(**ssm, ssm_cfg={"layer": "S4D", "d_state": 16, "A_init": "S4D-Lin"}), train,
                  info={"kind": "ssm"}),
        ModelSpec("mha-rope", "MHA-RoPE", MambaConfig(**attn, attn_cfg={"num_heads": heads, "rotary_emb_dim": head_dim}),
                  attn_train, info={"kind": "attention"}),
        ModelSpec("mha-abs", "MHA-Abs", MambaConfig(**attn, attn_cfg={"num_heads": heads, "absolute_pos_emb": True}),
                  attn_train, info={"kind": "attention"}),
    ]


def samples_at(T: int, s: dict, attention: bool) -> int:
    """Test rows at length T: 2^26 tokens' worth, clamped to [min_samples, max_samples] (fewer for attention
    beyond 2^14, whose cost is quadratic)."""
    n = min(s["max_samples"], max(s["min_samples"], 2 ** 26 // T))
    return min(n, s["attention_samples"]) if attention and T > 2 ** 14 else n


@torch.inference_mode()
def evaluate_at(model, T: int, s: dict, device: torch.device, attention: bool, seed: int = TEST_SEED,
                rows: int | None = None) -> dict:
    """Accuracy at length T on a fixed set (seed + T; the test set by default): argmax at the last position == v."""
    from ..generation import prefill

    n = samples_at(T, s, attention) if rows is None else rows
    rows_per_call = max(1, min(n, s["tokens_per_call"] // T))
    gen = torch.Generator().manual_seed(seed + T)
    hits = 0
    for start in range(0, n, rows_per_call):
        batch = induction_heads(min(rows_per_call, n - start), T, generator=gen).to(device)
        if attention:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(batch.inputs, logits_to_keep=1)[:, -1].float()
        else:  # chunked: the memory of one chunk whatever T (a million tokens included)
            _, logits = prefill(model, batch.inputs, tokens_per_call=min(T, s["prefill_chunk"]))
        hits += int((logits[:, :INDUCTION_VOCAB].argmax(-1) == batch.targets[:, -1]).sum())
    return {"accuracy": hits / n, "samples": n}


def validation(s: dict, device: torch.device, attention: bool):
    """validate(model) for early stopping: accuracy at the training length and, for the SSMs, at s["val_long"]
    (attention is not expected to extrapolate: it stops on the training length alone). The long length is measured
    only once the training length reaches the target; until then it is None (unmet)."""
    def validate(model) -> dict:
        short = evaluate_at(model, s["train_len"], s, device, attention, VAL_SEED, s["val_rows"])["accuracy"]
        metrics = {f"T{s['train_len']}": short}
        if not attention:
            metrics[f"T{s['val_long']}"] = (
                evaluate_at(model, s["val_long"], s, device, attention, VAL_SEED, s["val_long_rows"])["accuracy"]
                if short >= s["target"] else None)
        return metrics
    return validate


def run(run: Run) -> int:
    s = settings(run.quick)
    specs = model_specs(s)
    per_seed: dict[str, list[tuple[ModelSpec, dict, str | None, dict]]] = {spec.key: [] for spec in specs}
    for seed in s["seeds"]:  # seed-major: every model has a first result early in a run split into pieces
        for base in specs:
            spec = seeded(base, seed)
            attention = spec.info["kind"] == "attention"
            model = run.train(spec, lambda step, g, n=spec.train.batch_size: induction_heads(n, s["train_len"],
                                                                                              generator=g),
                              logits_to_keep=1, validate=validation(s, run.device, attention))
            if model is None:
                continue
            results, stopped = {}, None
            for k in s["test_log2"]:
                T = 2 ** k
                if attention and T > s["attention_max_len"]:
                    stopped = f"not run beyond 2^{int(math.log2(s['attention_max_len']))} (quadratic compute)"
                    break
                result = run.cached(spec, f"T{T}", lambda m=model, T=T: _evaluate_or_oom(m, T, s, run.device, attention))
                if result is None:  # the time budget, or another worker's model
                    break
                if result.get("oom"):
                    stopped = f"out of GPU memory at 2^{k}"
                    break
                results[T] = result
            per_seed[base.key].append((spec, results, stopped, run.training_record(spec)))
            del model
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    if not run.results_ready():
        return run.unfinished()
    rows, curves = [], {}
    for base in specs:
        runs = per_seed[base.key]
        lengths = sorted(set.intersection(*(set(results) for _, results, _, _ in runs)))  # run by every seed
        by_T = {T: spread([results[T]["accuracy"] for _, results, _, _ in runs]) for T in lengths}
        pick = median_index([sum(results[T]["accuracy"] for T in lengths) for _, results, _, _ in runs])
        spec, results, _, record = runs[pick]
        checkpoint = run.export_checkpoint(base, run.trained_model(spec))
        curves[base.label] = record["losses"]
        stopped = next((st for _, _, st, _ in runs if st), None)
        rows.append({"model": base.key, "label": base.label, "kind": base.info["kind"],
                     "accuracy": {str(T): by_T[T]["median"] for T in lengths},
                     "accuracy_min": {str(T): by_T[T]["min"] for T in lengths},
                     "accuracy_max": {str(T): by_T[T]["max"] for T in lengths},
                     "samples": {str(T): results[T]["samples"] for T in lengths}, "stopped": stopped,
                     "steps": max(r["steps"] for _, _, _, r in runs),
                     "train_s": round(sum(r["train_s"] for _, _, _, r in runs), 1),  # all seeds
                     "final_loss": record["final_loss"], "params": record["params"],  # the median seed's
                     "checkpoint": checkpoint, "checkpoint_seed": spec.train.seed,
                     "seeds": [{"seed": sp.train.seed, "accuracy": {str(T): r["accuracy"] for T, r in res.items()},
                                "steps": rec["steps"], "early_stop_step": rec.get("early_stop_step"),
                                "selected_step": rec.get("selected_step"),
                                "train_s": round(rec["train_s"], 1), "final_loss": rec["final_loss"],
                                "val_history": rec.get("val_history", [])} for sp, res, _, rec in runs],
                     "config": {"d_model": base.config.d_model, "ssm_cfg": base.config.ssm_cfg,
                                "attn_layer_idx": base.config.attn_layer_idx, "attn_cfg": base.config.attn_cfg,
                                "d_intermediate": base.config.d_intermediate}})
    _plot(run.out / "accuracy_vs_length.png", rows, s)
    loss_plot(run.out / "training_loss.png", curves, f"induction heads, T = {s['train_len']} (median seed)")
    run.write_results(rows, {**s, "test_seed": TEST_SEED, "val_seed": VAL_SEED}, _readme(rows, s))
    return FINISHED


def _evaluate_or_oom(model, T, s, device, attention) -> dict:
    try:
        return evaluate_at(model, T, s, device, attention)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"oom": True}


def _plot(path, rows, s) -> None:
    fig, ax = figure(figsize=(7, 4))
    for r in rows:
        Ts = sorted(int(T) for T in r["accuracy"])
        x = [math.log2(T) for T in Ts]
        line, = ax.plot(x, [100 * r["accuracy"][str(T)] for T in Ts], marker="o", ms=3, label=r["label"],
                        linestyle="--" if r["kind"] == "attention" else "-")
        ax.fill_between(x, [100 * r["accuracy_min"][str(T)] for T in Ts], [100 * r["accuracy_max"][str(T)] for T in Ts],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axvline(math.log2(s["train_len"]), color="gray", linestyle=":", label="training length")
    ax.set_xticks(s["test_log2"])
    ax.set_xlabel("test sequence length (log2 T)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    save_plot(fig, path, ax, f"induction heads: median and min-max of {len(s['seeds'])} seeds")


def _readme(rows, s) -> str:
    lengths = [2 ** k for k in s["test_log2"]]
    table = markdown_table(
        ["model", "params"] + [f"2^{k}" for k in s["test_log2"]],
        [[r["label"], r["params"]] + [percent(r["accuracy"].get(str(T))) for T in lengths] for r in rows])
    seed_table = markdown_table(
        ["model", "seed", "steps"] + [f"2^{k}" for k in s["test_log2"]],
        [[r["label"], x["seed"], x["steps"]] + [percent(x["accuracy"].get(str(T))) for T in lengths]
         for r in rows for x in r["seeds"]])
    stops = "\n".join(f"- {r['label']}: {r['stopped']}" for r in rows if r["stopped"]) or "- (every model ran every length)"
    return f"""# Induction heads (Mamba paper, Table 2)

Accuracy (%) at each test length T, the median of seeds {', '.join(map(str, s['seeds']))}; trained at
T = {s['train_len']}; "-" = not evaluated. The plot shades the min-max range; every seed's numbers are below.

{table}

![accuracy against length](accuracy_vs_length.png) ![training loss](training_loss.png)

**Task** (`mambakit.data.synthetic.induction_heads`): vocabulary 16 + a trigger token; the trigger appears once at a
random position followed by a random token v, and again at the end, where the model must predict v. Chance is 1/16.
Test rows per length: min({s['max_samples']}, max({s['min_samples']}, 2^26 / T)) from a fixed seed ({TEST_SEED} + T);
attention beyond 2^14 uses {s['attention_samples']} rows. The "samples" field of results.json has the exact count.

**Models** (2 layers): Mamba (Mamba-1) d_model {s['ssm_d_model']}, Mamba-2 d_model {s['ssm_d_model']} d_state 64,
S4D (S4D-Lin) d_model {s['ssm_d_model']}; MHA-RoPE / MHA-Abs: d_model {s['attn_d_model']}, {s['attn_heads']} heads,
gated MLP {s['attn_mlp']}, rotary or sinusoidal absolute positions.

**Not the paper's recipe: the Mamba row trains with state passing.** Every training batch starts from the previous
batch's final recurrent states (detached), the state-coverage intervention of Buitrago Ruiz & Gu 2025; the rows are
still {s['train_len']} tokens and the value is never more than {s['train_len'] - 3} tokens before the query. The
paper's recipe (batch 8, Adam at a constant 1e-3, 204,800 steps) did not extrapolate in mambakit's runs on an H200:
one seed's validation accuracy at 2^20 froze at 69% once its loss reached ~0, another stayed at 3-53% for 160,000
steps (BENCHMARKS.md, session 20). Without state passing no recipe tried (batch 8 to 128, lr 1e-3 / 2e-3, constant
or cosine) held 2^20 on most seeds.

**Where evaluation stopped**:
{stops}

The SSMs are evaluated through chunked prefill (`mambakit.generation.prefill(..., tokens_per_call={s['prefill_chunk']})`):
constant memory, so 2^20 costs what one chunk costs. Attention runs one SDPA forward (flash attention in bf16 on CUDA:
memory linear in T, compute quadratic), up to {s['attention_max_len']} tokens.

**Budget**: the Mamba row trains {model_specs(s)[0].train.describe()}. The other models
train {train_settings(s).describe()}, rows of length {s['train_len']}, loss on the last position only; the
attention models the same at lr {s['attn_lr']:g} (at 2e-3 both stayed at chance, loss ln 16, for
10,000 steps on the H200, and a CPU check at T = 64 learned at 2e-4 and not at 1e-3 or 2e-3). Validation (seed
{VAL_SEED} + T): {s['val_rows']} rows at T = {s['train_len']} and, for the SSMs, {s['val_long_rows']} rows at
T = {s['val_long']} (measured once the training length passes); every one must reach the target. The paper trains
about 200K steps of 8 rows (Adam, constant lr 1e-3 for Mamba, 2e-4 for the others); the attention rows here
train on batches of {s['batch_size']}.

**Checkpoints**: `mamba/` (and the others) load with `MambaLM.from_pretrained("results/{NAME}/mamba")`: the median
seed's model (results.json: `checkpoint_seed`).

## Every seed

{seed_table}
"""
