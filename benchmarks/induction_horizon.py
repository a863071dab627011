"""What limits the length to which a trained induction-heads Mamba holds? Distance to the trigger, or total length.

Reads the weights that `benchmarks/induction_recipe.py --save-every N --save-dir DIR` saves (the experiment's Mamba:
2 layers, d_model 64, d_state 16) and, for each, measures on rows built for the purpose (the task's spec, with the
trigger placed so that the value sits exactly `d` tokens before the final trigger):

- accuracy against the distance d at a fixed length T (`--length`, `--distances`);
- accuracy against the length T at a fixed distance (`--near`, `--prefix-lengths`): a long prefix of noise alone;
- each layer's memory horizon: Mamba-1 forgets a channel's state n at the rate Δ_t |A[d, n]| per token, so the
  slowest rates on noise tokens (Δ from the layer's dt projection on one long row; A from A_log) bound how far back
  the layer can still read: exp(-rate x distance) is what is left of a write.

    python benchmarks/induction_horizon.py runs/ih/step-3000.pt runs/ih/step-6000.pt --json OUT/horizon.json

CPU, float32, one row batch per setting (`--rows`, seeded by the setting, never the experiment's test seed).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mambakit.data.synthetic import IH_TRIGGER
from mambakit.models import build_model
from mambakit.reproduce import induction_heads as ih

SEED = 7_000_000_001  # rows of this script: never the experiment's test or validation seeds


def rows_at_distance(n: int, T: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) induction rows whose value is d tokens before the last position (trigger at T - 2 - d), and the values."""
    if not 1 <= d <= T - 2:
        raise ValueError(f"distance {d} must be in [1, T - 2 = {T - 2}]")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, IH_TRIGGER, (n, T), generator=g)
    value = torch.randint(0, IH_TRIGGER, (n,), generator=g)
    p = T - 2 - d
    x[:, p], x[:, p + 1], x[:, -1] = IH_TRIGGER, value, IH_TRIGGER
    return x, value


@torch.inference_mode()
def accuracy(model, T: int, d: int, rows: int) -> float:
    x, value = rows_at_distance(rows, T, d, SEED + 1009 * T + d)
    logits = model(x, logits_to_keep=1)[:, -1, :IH_TRIGGER + 1]  # the padded vocabulary's extra ids never count
    return float((logits.argmax(-1) == value).float().mean())


@torch.inference_mode()
def slowest_rates(model, T: int, k: int) -> list[list[float]]:
    """Per layer, the k slowest per-token forgetting rates mean_t(Δ_t[d]) * |A[d, n]| over the noise tokens of one
    row of length T (distance T // 2)."""
    deltas = {}
    hooks = [layer.mixer.dt_proj.register_forward_hook(  # a hooked dt_proj runs as a module: its output has the bias
        lambda m, a, out, i=i: deltas.__setitem__(i, F.softplus(out.float())))
        for i, layer in enumerate(model.backbone.layers)]
    try:
        x, _ = rows_at_distance(1, T, T // 2, SEED)
        model(x)
    finally:
        for h in hooks:
            h.remove()
    p = T - 2 - T // 2
    noise = torch.ones(T, dtype=torch.bool)
    noise[[p, p + 1, T - 1]] = False
    out = []
    for i, layer in enumerate(model.backbone.layers):
        A = torch.exp(layer.mixer.A_log.float())  # |A| (D, N)
        rates = deltas[i][0][noise].mean(0)[:, None] * A
        out.append(rates.flatten().sort().values[:k].tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("weights", nargs="+", help="state dicts saved by induction_recipe.py --save-every")
    p.add_argument("--length", type=int, default=2 ** 14, help="T of the distance sweep")
    p.add_argument("--distances", type=int, nargs="+", default=[200, 1000, 4000, 16000])
    p.add_argument("--near", type=int, default=128, help="the distance of the length sweep")
    p.add_argument("--prefix-lengths", type=int, nargs="+", default=[256, 2 ** 14])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    if a.rows < 1 or a.threads < 1:
        p.error("--rows and --threads must be positive")
    torch.set_num_threads(a.threads)
    spec = next(sp for sp in ih.model_specs(ih.settings(False)) if sp.key == "mamba")
    report = []
    for path in a.weights:
        model = build_model(spec.config, device="cpu")
        model.load_state_dict(torch.load(path, map_location="cpu"))
        model.eval()
        row = {"weights": path,
               "by_distance": {d: accuracy(model, a.length, d, a.rows) for d in a.distances},
               "by_length": {T: accuracy(model, T, a.near, a.rows) for T in a.prefix_lengths},
               "slowest_rates": slowest_rates(model, a.length, 4)}
        report.append(row)
        print(json.dumps(row), flush=True)
    with open(a.json, "w") as f:
        json.dump({"args": vars(a), "length": a.length, "near": a.near, "rows": report}, f, indent=1)


if __name__ == "__main__":
    main()
