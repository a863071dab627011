"""`mambakit reproduce spoken-digits`: autoregressive spoken-digit models on raw 8-bit mu-law audio, Mamba-UNet vs
S4D+MLP-UNet, real vs complex A (Mamba paper, Section 4.4.2, Tables 4 and 5; SaShiMi's SC09 benchmark).

Data: the SC09-like set of `mambakit data spoken-digits` (espeak-ng voices saying "zero".."nine", 16 kHz, 1 s
clips, split by speaker), read from `mambakit.data.spoken_digits.default_root()`. --quick: synthetic digit tones
(`tone_digit_clips`) of 256 samples, written under _state/ (no espeak-ng needed). A clip of L samples becomes L + 1
mu-law levels (a leading level of silence, so every sample of the clip is predicted).

Models (`mambakit.models.unet.AudioUNet`, SaShiMi's layout: pooling 4 then 4, width x2 per level):
    mamba-unet        Mamba (Mamba-1) blocks, no MLP, real A (the Mamba paper's model)
    s4d-lin-mlp-unet  S4D-Lin blocks + gated MLPs, complex A (SaShiMi's S4 + MLP)
    s4d-real-mlp-unet S4D-Real blocks + gated MLPs, real A (the same with A restricted to the reals)

Metrics:
    bits per sample on the test clips: mean -log2 p(level) (8 is a uniform guess over 256 levels);
    generated clips (`sample_audio`, temperature 1) scored by a digit classifier trained here on the train clips
    (`SequenceClassifier` over a Mamba backbone on mu-law levels, mean pooling): the classifier's mean confidence
    (its top probability: does the clip read as some digit), an Inception-Score-like figure exp E KL(p(y|x) || p(y))
    (1 .. 10: confident and diverse), and FID: the Frechet distance between the classifier's pooled features of the
    generated clips and of the real test clips. The classifier's accuracy on real test clips says how far to trust it.
    A few generated clips per model are written to samples/ (16-bit WAV), and each trained U-Net of under 16 MB to
    <model>/ (`AudioUNet.from_pretrained` loads it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.audio import mu_law_decode, mu_law_encode, write_wav
from ..data.spoken_digits import SAMPLE_RATE, default_root, load_spoken_digits, tone_digit_clips, write_clip_set
from ..models import MambaConfig
from ..models.classifier import SequenceClassifier, pool_sequence
from ..models.unet import AudioUNet, UNetConfig, sample_audio
from .common import FINISHED, Run, TrainSettings, _read_json, figure, save_plot, loss_plot, markdown_table
from .dna_audio_common import bits_per_sample, frechet_distance, train_module

NAME = "spoken-digits"
SUMMARY = "Mamba paper Tables 4-5: spoken digits (espeak-ng SC09-like) with U-Nets of Mamba vs S4D(+MLP), real vs complex A"
SILENCE = 128
# the classifier and the three U-Nets train apart (a U-Net's generated clips wait for the classifier): `--workers N`
INDEPENDENT_MODELS = True
MODELS = {
    "mamba-unet": {"mixer": "mamba", "mlp": False, "label": "Mamba-UNet", "A": "real"},
    "s4d-lin-mlp-unet": {"mixer": "s4d-lin", "mlp": True, "label": "S4D+MLP-UNet", "A": "complex"},
    "s4d-real-mlp-unet": {"mixer": "s4d-real", "mlp": True, "label": "S4D+MLP-UNet", "A": "real"},
}


def settings(quick: bool) -> dict:
    """Full size (GPU): width 64, 2 blocks per stage, pooling (4, 4), batch 16 clips of 1 s, 2000 steps (7 epochs of
    the train clips); 64 generated clips per model; quick: a CPU smoke run on 256-sample tones.

    The step budget is what one device call holds: on an H200 a graphed step takes 35 ms (Mamba-UNet), 57 ms
    (S4D-Lin+MLP) and 52 ms (S4D-Real+MLP) (`benchmarks/gpu_repro_step.py`, session 23), so 2000 steps of the three
    are ~5 min of GPU and 64 sampled clips ~100 s a model; 20000 steps, the first setting, would be ~48 min."""
    if quick:
        return {"data": None, "clip_samples": 256, "tones_per_digit": 2, "d_model": 8, "n_layers": 1, "pool": [2, 2],
                "d_state": 4, "batch_size": 4, "steps": 3, "lr": 2e-3, "warmup_steps": 1, "eval_batch": 4,
                "clf_d_model": 16, "clf_layers": 1, "clf_steps": 3, "clf_batch": 8, "generate": 4, "temperature": 1.0,
                "wavs": 1, "checkpoint_max_bytes": 2 ** 22}
    return {"data": str(default_root()), "clip_samples": SAMPLE_RATE, "tones_per_digit": 0, "d_model": 64, "n_layers": 2,
            "pool": [4, 4], "d_state": 16, "batch_size": 16, "steps": 2000, "lr": 2e-3, "warmup_steps": 500,
            "eval_batch": 16, "clf_d_model": 64, "clf_layers": 2, "clf_steps": 3000, "clf_batch": 32, "generate": 64,
            "temperature": 1.0, "wavs": 4, "checkpoint_max_bytes": 2 ** 23}


def _data_root(run: Run, s: dict) -> Path:
    if s["data"] is not None:
        return Path(s["data"])
    root = run.state / "tones"
    if not (root / "manifest.json").exists():
        write_clip_set(root, tone_digit_clips(s["tones_per_digit"], clip_samples=s["clip_samples"]), source="tones")
    return root


def levels_of(waves: torch.Tensor) -> torch.Tensor:
    """(n, L) waveforms -> (n, L + 1) mu-law levels with a leading level of silence."""
    levels = mu_law_encode(waves)
    return torch.cat([torch.full((levels.shape[0], 1), SILENCE, dtype=torch.long), levels], dim=1)


def _lm_loss(model, rows):
    logits = model(rows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


def _unet(key: str, s: dict):
    m = MODELS[key]
    cfg = UNetConfig(d_model=s["d_model"], n_layers=s["n_layers"], pool=s["pool"], mixer=m["mixer"], mlp=m["mlp"],
                     d_state=s["d_state"])
    return lambda: AudioUNet(cfg)


def _digit_classifier(s: dict):
    cfg = MambaConfig(d_model=s["clf_d_model"], n_layer=s["clf_layers"], vocab_size=256,
                      ssm_cfg={"layer": "Mamba1", "d_state": 16})
    return lambda: SequenceClassifier.from_config(cfg, num_classes=10, pooling="mean")


@torch.no_grad()
def _classify(clf, levels: torch.Tensor, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (n, 10), pooled features (n, d)) of the classifier on (n, L) levels."""
    probs, feats = [], []
    for i in range(0, levels.shape[0], batch):
        hidden = clf.backbone(levels[i:i + batch].to(device)).float()
        pooled = pool_sequence(hidden, clf.pooling)
        probs.append(torch.softmax(clf.head(pooled), -1).cpu())
        feats.append(pooled.cpu())
    return torch.cat(probs), torch.cat(feats)


def inception_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of (n, classes) probabilities."""
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1)
    return float(kl.mean().exp())


def prepare(run: Run) -> None:
    """The --quick tone clips, written before `--workers` start (each would otherwise write them at once)."""
    _data_root(run, settings(run.quick))


def run(run: Run) -> int:
    s = run.with_steps(settings(run.quick))  # --steps: every model's (the classifier's too), and the README's
    if run.steps_override is not None:
        s["clf_steps"] = run.steps_override
    root = _data_root(run, s)
    train_waves, train_digits = load_spoken_digits(root, "train")
    test_waves, test_digits = load_spoken_digits(root, "test")
    train_rows, test_rows = levels_of(train_waves), levels_of(test_waves)
    unet_train = TrainSettings(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], warmup_steps=s["warmup_steps"],
                               weight_decay=0.0)

    def clip_batch(step: int, g: torch.Generator):
        return (train_rows[torch.randint(0, train_rows.shape[0], (s["batch_size"],), generator=g)],)

    # the judge first: a digit classifier on the real clips
    clf_train = TrainSettings(steps=s["clf_steps"], batch_size=s["clf_batch"], lr=1e-3, warmup_steps=s["warmup_steps"],
                              weight_decay=0.1)

    def labelled_batch(step: int, g: torch.Generator):
        idx = torch.randint(0, train_rows.shape[0], (s["clf_batch"],), generator=g)
        return train_rows[idx, 1:], train_digits[idx]

    def classifier():
        return train_module(run, "digit-classifier", _digit_classifier(s), clf_train, labelled_batch,
                            lambda m, x, y: F.cross_entropy(m(x).float(), y))

    features_path = run.state / "evals" / "digit-classifier" / "real_features.pt"

    def judge():
        """(classifier, its figures on the real test clips), or None while another worker (or the time budget)
        still holds it. The worker that trains the classifier also judges the real clips (its claim)."""
        clf = classifier()
        real = None if clf is None else run.cached(
            "digit-classifier", "real", lambda: _judge_real(clf, test_rows[:, 1:], test_digits, s, run.device,
                                                            features_path))
        return None if real is None else (clf, real)

    judged = judge()
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    finished = {}  # key -> (model, test figures, generated figures)
    for key in MODELS:  # a model left for later (the time budget, another worker's): go on to the next one
        model = train_module(run, key, _unet(key, s), unet_train, clip_batch, _lm_loss)
        bps = None if model is None else run.cached(key, "test", lambda: {"bits_per_sample": bits_per_sample(
            model, test_rows, s["eval_batch"], run.device)})
        if bps is None:
            continue
        judged = judged or judge()  # trained by another worker meanwhile?
        if judged is None:  # still another worker's (judge's calls marked the run incomplete)
            continue
        clf, real = judged
        real_feats = torch.load(features_path, weights_only=True)
        gen = run.cached(key, "generated", lambda: _judge_generated(model, clf, real_feats, key, run, s))
        if gen is not None:
            finished[key] = (model, bps, gen)
    if not run.results_ready():
        return run.unfinished()
    real = judged[1]
    rows, curves = [], {}
    for key, m in MODELS.items():
        (model, bps, gen), record = finished[key], _read_json(run.state / key / "done.json")
        # small enough to commit (AudioUNet.from_pretrained); 2^23 at full size keeps the Mamba-UNet (7.3 MB) and
        # leaves out the S4D ones (10-11 MB): all three made a 29 MB results tar, past the device's 16 MiB per file
        if record["params"] * 4 < s["checkpoint_max_bytes"]:
            model.save_pretrained(run.out / key)
        curves[key] = record["losses"]
        rows.append({"model": key, "label": m["label"], "mixer": m["mixer"], "mlp": m["mlp"], "A": m["A"],
                     "bits_per_sample": bps["bits_per_sample"], **gen, "steps": record["steps"],
                     "train_s": round(record["train_s"], 1), "final_loss": record["final_loss"],
                     "params": record["params"]})
    _plot(run.out / "bits_per_sample.png", rows)
    loss_plot(run.out / "training_loss.png", curves, "spoken digits (nats per sample)")
    run.write_results(rows, {**s, "data_root": str(root), "train_clips": int(train_rows.shape[0]),
                             "test_clips": int(test_rows.shape[0]), "classifier": real}, _readme(rows, s, real, root))
    return FINISHED


def _judge_real(clf, levels, digits, s, device, features_path: Path) -> dict:
    """The classifier on the real test clips; their pooled features are saved for the FIDs."""
    probs, feats = _classify(clf, levels, s["eval_batch"], device)
    features_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, features_path)
    return {"test_accuracy": float((probs.argmax(-1) == digits).float().mean()),
            "real_confidence": float(probs.max(-1).values.mean()), "real_inception_score": inception_score(probs)}


def _judge_generated(model, clf, real_feats, key: str, run: Run, s: dict) -> dict:
    levels = sample_audio(model, s["generate"], s["clip_samples"] + 1, temperature=s["temperature"], seed=0)[:, 1:]
    for i in range(min(s["wavs"], levels.shape[0])):
        write_wav(run.out / "samples" / f"{key}_{i}.wav", mu_law_decode(levels[i]), SAMPLE_RATE)
    probs, feats = _classify(clf, levels, s["eval_batch"], run.device)
    return {"confidence": float(probs.max(-1).values.mean()), "inception_score": inception_score(probs),
            "fid": frechet_distance(feats, real_feats),
            "digit_histogram": torch.bincount(probs.argmax(-1), minlength=10).tolist(), "generated": int(levels.shape[0])}


def _plot(path, rows) -> None:
    fig, ax = figure(figsize=(5, 3.2))
    labels = [f"{r['label']}\n{r['A']} A" for r in rows]
    ax.bar(range(len(rows)), [r["bits_per_sample"] for r in rows], color=["C0", "C1", "C2"][:len(rows)])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("test bits per sample")
    save_plot(fig, path, ax, "spoken digits, 8-bit mu-law", legend=False)


def _readme(rows, s, real, root) -> str:
    table = markdown_table(
        ["model", "A", "bits / sample", "confidence", "IS-like", "FID", "digits read (0..9)", "params"],
        [[r["label"], r["A"], f"{r['bits_per_sample']:.3f}", f"{r['confidence']:.3f}", f"{r['inception_score']:.2f}",
          f"{r['fid']:.3g}", " ".join(map(str, r["digit_histogram"])), f"{r['params']:,}"] for r in rows])
    wavs = " ".join(f"[{r['model']}_0](samples/{r['model']}_0.wav)" for r in rows)
    return f"""# Spoken digits on raw audio (Mamba paper, Tables 4 and 5)

{table}

![bits per sample](bits_per_sample.png) ![training loss](training_loss.png)

**Read**: bits per sample on the test clips (lower is better; 8 = uniform over the 256 mu-law levels). The other
columns judge {s['generate']} clips generated per model (temperature {s['temperature']:g}) by a digit classifier trained
on the train clips, whose accuracy on the real test clips is {100 * real['test_accuracy']:.1f}% (confidence
{real['real_confidence']:.3f}, IS-like {real['real_inception_score']:.2f} on real clips: the ceiling). Confidence: its
mean top probability; IS-like: exp E KL(p(y|x) || p(y)) (1 .. 10); FID: Frechet distance of its pooled features to
the real test clips' (lower is better). Listen: {wavs} (more in samples/).

**Data**: {root} ({'espeak-ng voices' if s['data'] else 'synthetic digit tones (--quick)'}), clips of {s['clip_samples']}
samples at 16 kHz as 8-bit mu-law levels.

**Models**: U-Nets of width {s['d_model']}, {s['n_layers']} blocks per stage, pooling {s['pool']}, d_state {s['d_state']};
{s['steps']} steps of {s['batch_size']} clips, lr {s['lr']:g}.
"""
