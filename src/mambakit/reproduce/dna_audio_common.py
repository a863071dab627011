"""What the DNA and audio experiments share beyond `common`: training any nn.Module (a classifier, an audio U-Net)
with `common.Run`'s resume state and time budget, stand-in genomes for --quick runs, and the Frechet distance.

`train_module` is `Run.train` for models that are not a `MambaLM`: the same loop (`Run.fit`), AdamW, warmup
and schedule (`TrainSettings`), the finished weights in _state/<key>/model.pt. Their evaluations are memoised
by `run.cached(key, name, compute)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import Run, TrainSettings

__all__ = ["train_module", "markov_genome_fasta", "frechet_distance", "bits_per_sample"]


def train_module(run: Run, key: str, build: Callable[[], torch.nn.Module], settings: TrainSettings,
                 make_batch: Callable[[int, torch.Generator], tuple], loss_fn: Callable[..., torch.Tensor],
                 autocast: bool = True,
                 validate: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> torch.nn.Module | None:
    """Train build() on make_batch(step, generator) with loss_fn(model, *batch) (or load it when already trained).

    `Run.fit`'s loop (resume, time budget, --steps, validation and early stopping as there); the finished
    weights go to _state/<key>/model.pt. Returns the model in eval mode, or None when the time budget ran out
    first (state saved for --resume). Batch tensors are moved to the run's device; bf16 autocast on CUDA when
    `autocast`.
    """
    def load(folder: Path) -> torch.nn.Module:
        model = build().to(run.device)
        model.load_state_dict(torch.load(folder / "model.pt", map_location=run.device, weights_only=True))
        return model

    return run.fit(key, build, settings, make_batch, lambda model, batch, states: loss_fn(model, *batch), load=load,
                   save=lambda model, folder: torch.save(model.state_dict(), folder / "model.pt"),
                   autocast=autocast, validate=validate)


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
