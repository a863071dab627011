"""What the DNA and audio experiments share beyond `common`: training any nn.Module (a classifier, an audio U-Net)
with `common.Run`'s resume state and time budget, stand-in genomes for --quick runs, and the Frechet distance.

`train_module` is `Run.train` for models that are not a `MambaLM`: the same AdamW, warmup and schedule
(`TrainSettings`), batches as a pure function of the step (a resumed run sees the batches an uninterrupted one
would), the training state in _state/<key>/train.pt, the finished weights in _state/<key>/model.pt.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import Run, TrainSettings, _progress, _read_json, _write_json, batch_seed

__all__ = ["train_module", "cached_eval", "markov_genome_fasta", "frechet_distance", "bits_per_sample"]


def train_module(run: Run, key: str, build: Callable[[], torch.nn.Module], settings: TrainSettings,
                 make_batch: Callable[[int, torch.Generator], tuple], loss_fn: Callable[..., torch.Tensor],
                 autocast: bool = True) -> torch.nn.Module | None:
    """Train build() on make_batch(step, generator) with loss_fn(model, *batch) (or load it when already trained).

    Returns the model in eval mode, or None when the time budget ran out first (state saved for --resume).
    Batch tensors are moved to the run's device; bf16 autocast on CUDA when `autocast`.
    """
    from ..training import build_optimizer, lr_at

    folder = run.state / key
    if run.steps_override is not None:
        settings = dataclasses.replace(settings, steps=run.steps_override)
    torch.manual_seed(settings.seed)
    model = build().to(run.device)
    done = _read_json(folder / "done.json")
    if done is not None and done["steps"] >= settings.steps:
        model.load_state_dict(torch.load(folder / "model.pt", map_location=run.device, weights_only=True))
        return model.eval()
    if run.out_of_time():
        return None
    if done is not None:
        (folder / "done.json").unlink()
        import shutil

        shutil.rmtree(run.state / "evals" / key, ignore_errors=True)
    cfg = settings.train_config()
    optimizer = build_optimizer(model, cfg)
    step, losses, train_s = 0, [], 0.0
    resume_file = folder / "train.pt"
    if resume_file.exists():
        saved = torch.load(resume_file, map_location=run.device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, losses, train_s = saved["step"], saved["losses"], saved["train_s"]
    use_autocast = autocast and run.device.type == "cuda"
    model.train()
    bar = _progress(run.progress, total=settings.steps, initial=step, desc=f"{run.name} {key}")
    t0 = time.monotonic()
    pending = []

    def save():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = resume_file.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                    "train_s": train_s + time.monotonic() - t0}, tmp)
        tmp.replace(resume_file)

    while step < settings.steps and not run.out_of_time():
        batch = make_batch(step, torch.Generator().manual_seed(batch_seed(settings.seed, step)))
        batch = tuple(b.to(run.device) for b in batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = loss_fn(model, *batch)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pending.append(loss.detach().float())
        if step % settings.log_every == 0 or step == settings.steps:
            value = float(torch.stack(pending).mean())
            pending.clear()
            if not math.isfinite(value):
                raise RuntimeError(f"{key}: the training loss became {value} at step {step}")
            losses.append([step, value])
            bar.set_postfix(loss=f"{value:.4f}")
        bar.update(1)
        if step % settings.save_every == 0 and step < settings.steps:
            save()
    bar.close()
    save()
    train_s += time.monotonic() - t0
    if step < settings.steps:
        return None
    model.eval()
    torch.save(model.state_dict(), folder / "model.pt")
    _write_json(folder / "done.json", {"steps": step, "train_s": train_s, "losses": losses,
                                       "final_loss": losses[-1][1] if losses else None,
                                       "params": sum(p.numel() for p in model.parameters())})
    return model


def cached_eval(run: Run, key: str, name: str, compute: Callable[[], dict]) -> dict | None:
    """`Run.cached` for a model trained by `train_module`: compute() once, memoised in _state/evals/<key>/<name>.json;
    None when the time budget is spent before it."""
    path = run.state / "evals" / key / f"{name}.json"
    value = _read_json(path)
    if value is None:
        if run.out_of_time():
            return None
        value = compute()
        _write_json(path, value)
    return value


def markov_genome_fasta(path: Path, n_records: int, length: int, seed: int, base_seed: int = 0,
                        divergence: float = 0.3) -> Path:
    """A stand-in genome for --quick runs (no genome package needed): records drawn from an order-3 Markov chain
    over A, C, G, T whose transition table is a `base_seed` table moved by `divergence` towards a `seed` one (so
    "species" built with the same base_seed are related and hard to tell apart), written as a gzip FASTA."""
    import gzip

    def table(s):
        return np.random.default_rng(s).dirichlet(np.full(4, 0.5), size=64)  # (64 contexts, 4 bases)

    probs = (1 - divergence) * table(base_seed) + divergence * table(10_000 + seed)
    cum = probs.cumsum(1)
    rng = np.random.default_rng(20_000 + seed)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    lines = []
    for r in range(n_records):
        u = rng.random(length)
        seq = np.empty(length, dtype=np.int64)
        ctx = 0
        for i in range(length):  # a few 10^4 bases: a Python loop is fast enough
            b = int(np.searchsorted(cum[ctx], u[i]))
            seq[i] = min(b, 3)
            ctx = (ctx * 4 + seq[i]) % 64
        text = letters[seq].tobytes().decode()
        lines.append(f">rec{r} stand-in species {seed}\n" + "\n".join(text[i:i + 80] for i in range(0, length, 80)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (n, F) and b (m, F) (FID's formula):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with Tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


@torch.no_grad()
def bits_per_sample(model: torch.nn.Module, levels: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean -log2 p(sample t + 1 | samples <= t) of the model over rows of levels (n, L + 1) (n * L predictions)."""
    total, count = 0.0, 0
    for i in range(0, levels.shape[0], batch_size):
        rows = levels[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(rows[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += rows[:, 1:].numel()
    return total / count / math.log(2)
