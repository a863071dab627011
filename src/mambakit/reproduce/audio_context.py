"""`mambakit reproduce audio-context`: bits per sample against training context length at fixed compute (Mamba paper,
Section 4.4.1, Figure 7).

Claim: on long recordings, a Mamba U-Net keeps improving as its training context grows (to a minute of audio there),
at a fixed number of samples per step; the S4+MLP U-Net (SaShiMi) improves less.

Data: no long real recording installs offline (the paper uses YouTubeMix piano), so every speaker's clips of the
spoken-digits set (`mambakit data spoken-digits`) are concatenated into one long recording per speaker
(`speaker_recordings`): 20 clips per speaker, 20 s, 320,000 samples at 16 kHz. Train speakers train; the
validation speakers' recordings are held out. --quick: the tone stand-in set, 256-sample clips.

Models: `AudioUNet` Mamba-UNet (Mamba-1 blocks) and S4D+MLP-UNet (S4D-Lin, complex A), one per context length L,
each trained for the same steps of the same `samples_per_step` (batch = samples_per_step / L): equal compute per
point. Windows of L + 1 mu-law levels are drawn uniformly within one speaker's recording. Metric: bits per sample
on the same held-out samples for every L: the first `eval_samples` (a whole number of the longest context) of the
held-out recordings, cut into non-overlapping windows of length L, each read from an empty state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.audio import mu_law_encode
from ..data.spoken_digits import speaker_recordings
from ..models.unet import AudioUNet, UNetConfig
from .common import (FINISHED, Run, TrainSettings, _read_json, context_verdict, figure, loss_plot,
                     markdown_table, save_plot)
from .dna_audio_common import bits_per_sample, train_module
from .spoken_digits import _data_root, settings as _digit_settings

NAME = "audio-context"
SUMMARY = "Mamba paper Figure 7: audio bits per sample against training context length at fixed compute"
INDEPENDENT_MODELS = True  # one model per (mixer, context), none needs another's result: `--workers N` trains N at once
MODELS = {"mamba-unet": ("mamba", False, "Mamba-UNet"), "s4d-lin-mlp-unet": ("s4d-lin", True, "S4D+MLP-UNet")}


def settings(quick: bool) -> dict:
    """Full size (GPU; the committed run took 423 s with 8 workers on an H200): contexts 2^11, 2^13, 2^15, 2^17
    samples (0.13 s .. 8 s), 2^17 samples per step, 1000 steps (~1.8 passes over the 72M training samples); quick: a
    CPU smoke run on tones.

    Session 23 cut 7 contexts x 4000 steps (~39 min of an H200 for the 14 U-Nets, `benchmarks/gpu_repro_step.py`) to
    this, which one device call holds: a U-Net trains its 1,000 steps in ~100 s with four at once (session 24). A
    U-Net's resume state is 22-33 MB, so a run cut by the time budget with many models in flight would not all come
    back: run it whole in one call."""
    data = _digit_settings(quick)
    if quick:
        return {**{k: data[k] for k in ("data", "clip_samples", "tones_per_digit")}, "contexts_log2": [5, 7],
                "samples_per_step": 512, "steps": 3, "lr": 2e-3, "warmup_steps": 1, "d_model": 8, "n_layers": 1,
                "pool": [2, 2], "d_state": 4, "eval_samples": 1024, "eval_batch": 4}
    return {**{k: data[k] for k in ("data", "clip_samples", "tones_per_digit")}, "contexts_log2": [11, 13, 15, 17],
            "samples_per_step": 2 ** 17, "steps": 1000, "lr": 2e-3, "warmup_steps": 100, "d_model": 64, "n_layers": 2,
            "pool": [4, 4], "d_state": 16, "eval_samples": 2 ** 21, "eval_batch": 8}


def _windows(recordings: list[torch.Tensor], length: int, count: int, g: torch.Generator) -> torch.Tensor:
    """count (count, length + 1) windows, each inside one recording chosen with probability ~ its usable starts."""
    usable = [r for r in recordings if r.numel() > length]
    weights = torch.tensor([float(r.numel() - length) for r in usable])
    picks = torch.multinomial(weights, count, replacement=True, generator=g)
    rows = []
    for p in picks.tolist():
        start = int(torch.randint(0, usable[p].numel() - length, (1,), generator=g))
        rows.append(usable[p][start:start + length + 1])
    return torch.stack(rows)


def _held_out_spans(recordings: list[torch.Tensor], span: int, max_samples: int) -> list[torch.Tensor]:
    """The held-out samples every context scores: (span + 1,) pieces of the held-out recordings, in order,
    non-overlapping (each piece's last sample is the next one's first), at most max_samples // span of them."""
    count = max_samples // span
    if count < 1:
        raise ValueError(f"audio-context: eval_samples {max_samples} is smaller than the longest context {span}")
    spans = []
    for r in recordings:
        for start in range(0, r.numel() - span, span):
            if len(spans) == count:
                return spans
            spans.append(r[start:start + span + 1])
    if not spans:
        raise ValueError(f"audio-context: no held-out recording is longer than the longest context {span}")
    return spans


def _held_out_windows(spans: list[torch.Tensor], length: int) -> torch.Tensor:
    """(n, length + 1) windows cutting every held-out span into span / length pieces, so that every context predicts
    exactly the same samples (each span's 2nd .. last); `length` must divide the span length."""
    span = spans[0].numel() - 1
    if span % length:
        raise ValueError(f"audio-context: context {length} does not divide the held-out span {span}")
    return torch.stack([s[i:i + length + 1] for s in spans for i in range(0, span, length)])


def prepare(run: Run) -> None:
    """The --quick tone clips, written before `--workers` start (each would otherwise write them at once)."""
    _data_root(run, settings(run.quick))


def run(run: Run) -> int:
    s = run.with_steps(settings(run.quick))  # --steps: every model, the README and the schedules
    root = _data_root(run, s)
    train_recs = [mu_law_encode(r) for r in speaker_recordings(root, "train").values()]
    val_recs = [mu_law_encode(r) for r in speaker_recordings(root, "validation").values()]

    def lm_loss(model, rows):
        return F.cross_entropy(model(rows[:, :-1]).float().flatten(0, 1), rows[:, 1:].flatten())

    # the same held-out samples for every context: spans of the longest one, cut into each context's windows
    spans = _held_out_spans(val_recs, 2 ** max(s["contexts_log2"]), s["eval_samples"])
    rows, curves = [], {}
    for k in s["contexts_log2"]:
        L = 2 ** k
        batch = max(1, s["samples_per_step"] // L)
        train = TrainSettings(steps=s["steps"], batch_size=batch, lr=s["lr"], warmup_steps=s["warmup_steps"])
        for key, (mixer, mlp, label) in MODELS.items():
            cfg = UNetConfig(d_model=s["d_model"], n_layers=s["n_layers"], pool=s["pool"], mixer=mixer, mlp=mlp,
                             d_state=s["d_state"])
            name = f"{key}-L{L}"
            model = train_module(run, name, lambda: AudioUNet(cfg), train,
                                 lambda step, g: (_windows(train_recs, L, batch, g),), lm_loss)
            held = _held_out_windows(spans, L)
            result = None if model is None else run.cached(name, "val", lambda: {
                "bits_per_sample": bits_per_sample(model, held, s["eval_batch"], run.device),
                "samples": int(held[:, 1:].numel())})
            if result is None:  # the time budget, or another worker's model: go on to the next one
                continue
            record = _read_json(run.state / name / "done.json")
            curves[name] = record["losses"]
            rows.append({"model": name, "label": label, "context": L, "seconds": L / 16000, "batch_size": batch,
                         "bits_per_sample": result["bits_per_sample"], "val_samples": result["samples"],
                         "steps": record["steps"], "train_s": round(record["train_s"], 1),
                         "final_loss": record["final_loss"], "params": record["params"]})
    if not run.results_ready():
        return run.unfinished()
    _plot(run.out / "bits_vs_context.png", rows)
    loss_plot(run.out / "training_loss.png", curves, "long recordings (nats per sample)")
    run.write_results(rows, {**s, "data_root": str(root), "train_speakers": len(train_recs),
                             "val_speakers": len(val_recs)}, _readme(rows, s, root, len(train_recs), len(val_recs)))
    return FINISHED


def _plot(path, rows) -> None:
    fig, ax = figure(figsize=(5, 3.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["context"], r["bits_per_sample"]) for r in rows if r["label"] == label)
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training context (samples at 16 kHz)")
    ax.set_ylabel("held-out bits per sample")
    save_plot(fig, path, ax, "audio: context length at fixed compute")


def _readme(rows, s, root, n_train, n_val) -> str:
    contexts = [2 ** k for k in s["contexts_log2"]]
    table_rows = []
    for label in dict.fromkeys(r["label"] for r in rows):
        bps = {r["context"]: r["bits_per_sample"] for r in rows if r["label"] == label}
        table_rows.append([label] + [f"{bps[L]:.3f}" if L in bps else "-" for L in contexts])
    table = markdown_table(["model"] + [f"2^{int(math.log2(L))} ({L / 16000:.2g} s)" for L in contexts], table_rows)
    return f"""# Audio: bits per sample against training context length (Mamba paper, Figure 7)

Held-out bits per sample (8-bit mu-law; lower is better) of U-Nets trained at each context length with equal compute.

{table}

![bits per sample against context](bits_vs_context.png) ![training loss](training_loss.png)

**Data**: {root} ({'espeak-ng spoken digits' if s['data'] else 'synthetic digit tones (--quick)'}), every speaker's clips
concatenated into one recording; {n_train} training speakers, {n_val} held-out (validation) speakers.

**Models**: U-Nets of width {s['d_model']}, {s['n_layers']} blocks per stage, pooling {s['pool']}, d_state {s['d_state']};
each trained {s['steps']} steps of {s['samples_per_step']:,} samples (batch = samples / context), lr {s['lr']:g}.
Evaluation: the same {max((r['val_samples'] for r in rows), default=0):,} held-out predictions for every context (spans of the
longest context from the held-out recordings, in order), cut into non-overlapping windows of each model's context, each
read from an empty state.

## What it shows

{_verdict(rows, contexts)}

How this differs from the paper's setting: a recording here is one speaker's 1 s digit clips put end to end, so context
past a second carries the voice but no longer structure (the paper's YouTubeMix piano has minutes of music); at equal
samples per step a model at the longest context sees {max(1, s['samples_per_step'] // contexts[-1])} window(s) a step
against {max(1, s['samples_per_step'] // contexts[0])} at the shortest; and the paper trains far longer.
"""


def _verdict(rows, contexts) -> str:
    """Each U-Net's bits per sample over the contexts and whether the paper's claim holds (`context_verdict`)."""
    series = {label: {r["context"]: r["bits_per_sample"] for r in rows if r["label"] == label and r["context"] in
                      contexts} for label in dict.fromkeys(r["label"] for r in rows)}
    return context_verdict(series, "Mamba-UNet", "S4D+MLP-UNet", "bits per sample")
