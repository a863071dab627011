"""Which training recipe makes Mamba's induction heads extrapolate to 2^20? One model per process, validation curves.

`mambakit reproduce induction-heads` trained Mamba at T = 256 (batch 128, lr 2e-3, constant) and in session 14 it
reached 100% at the training length but only 54.7% at 2^20 (it trains with state passing since session 21, which
this loop does not do). The paper trains batch 8 at lr 1e-3 for ~200K steps; a
mamba_ssm user reported 100% to 2^20 after ~40K steps of 8. This script trains the experiment's Mamba (its model
spec and data, bf16 autocast, AdamW with the experiment's betas, clipping and warmup) with another batch size,
learning rate, schedule or step count, and records the validation accuracy (the experiment's validation seed,
never its test set) at several lengths every --eval-every steps, so recipes can be compared side by side:

    python benchmarks/induction_recipe.py --batch 8 --lr 1e-3 --time-budget 300 --json OUT/b8.json
    python benchmarks/induction_recipe.py --batch 128 --lr 2e-3 --steps 10000 --decay cosine --json OUT/b128.json
    python benchmarks/induction_recipe.py --device cpu --train-len 64 --batch 32 --lr 2e-3 --steps 3000 --loss all \
        --lengths 6 10 12 14 --eval-every 1000 --json OUT/cpu-all.json      # a CPU proxy

Several processes at once fill the GPU: a step of this 2-layer d_model 64 model is host-bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from mambakit.data.synthetic import induction_heads
from mambakit.models import build_model
from mambakit.reproduce import induction_heads as ih
from mambakit.reproduce.common import masked_loss
from mambakit.training import build_optimizer, lr_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mamba", help="a model key of the experiment (mamba, mamba2, s4d, ...)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=200_000, help="the schedule's length (cosine decays over it)")
    p.add_argument("--decay", choices=["constant", "cosine"], default="constant")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-len", type=int, default=256, help="training length T (the experiment's: 256)")
    p.add_argument("--loss", choices=["last", "all"], default="last",
                   help="last: the target token only (the experiment's); all: next-token loss at every position too, "
                        "as H3's / safari's synthetic training (the noise is unpredictable, the target is not)")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of training (evaluations excluded)")
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 12, 16, 20], help="log2 of the validation lengths")
    p.add_argument("--rows", type=int, default=32, help="validation rows per length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", required=True)
    p.add_argument("--save-every", type=int, default=0,
                   help="also save the weights every N steps as SAVE_DIR/step-N.pt (benchmarks/induction_horizon.py "
                        "reads them); 0: never")
    p.add_argument("--save-dir", default=None, help="the folder of --save-every's weights")
    a = p.parse_args()
    if a.batch < 1 or a.lr <= 0 or a.steps < 1 or a.eval_every < 1 or a.train_len < 3:
        p.error("--batch, --lr, --steps and --eval-every must be positive, --train-len at least 3")
    if a.save_every < 0 or (a.save_every and not a.save_dir):
        p.error("--save-every must be >= 0 and needs --save-dir")
    device = torch.device(a.device)
    s = ih.settings(False)
    spec = next((sp for sp in ih.model_specs(s) if sp.key == a.model), None)
    if spec is None:
        p.error(f"--model must be one of {[sp.key for sp in ih.model_specs(s)]}")
    if spec.train.state_passing:  # the experiment's Mamba row: this loop studies recipes without state passing
        print(f"induction_recipe: the experiment trains {a.model} with state passing; this loop does not (every "
              "batch starts from zero states)", file=sys.stderr)
    # the experiment's optimiser and schedule (training.build_optimizer, training.lr_at) under this recipe
    settings = dataclasses.replace(spec.train, batch_size=a.batch, lr=a.lr, steps=a.steps, warmup_steps=a.warmup,
                                   min_lr_ratio=0.0 if a.decay == "cosine" else 1.0, state_passing=False)
    cfg = settings.train_config()
    torch.manual_seed(a.seed)
    model = build_model(spec.config, device=device)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(a.seed)
    attention = spec.info["kind"] == "attention"
    record = {"args": vars(a), "model": a.model, "evals": [], "losses": []}

    def evaluate(step: int) -> None:
        model.eval()
        row = {"step": step}
        for k in a.lengths:
            row[f"T{2 ** k}"] = ih.evaluate_at(model, 2 ** k, s, device, attention, ih.VAL_SEED, a.rows)["accuracy"]
        model.train()
        record["evals"].append(row)
        print(json.dumps(row), flush=True)
        with open(a.json, "w") as f:
            json.dump(record, f)

    train_s, step = 0.0, 0
    model.train()
    while step < a.steps and train_s < a.time_budget:
        t0 = time.perf_counter()
        batch = induction_heads(a.batch, a.train_len, generator=gen).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if a.loss == "last":
                logits = model(batch.inputs, logits_to_keep=1)
                loss = masked_loss(logits, batch.targets[:, -1:], spec.config.vocab_size)
            else:  # every position predicts the next input; the last one the target
                targets = torch.cat([batch.inputs[:, 1:], batch.targets[:, -1:]], dim=1)
                loss = masked_loss(model(batch.inputs), targets, spec.config.vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        step += 1
        if step % 100 == 0:
            record["losses"].append([step, float(loss.detach())])  # one sync per 100 steps
        train_s += time.perf_counter() - t0
        if a.save_every and step % a.save_every == 0:
            os.makedirs(a.save_dir, exist_ok=True)
            torch.save(model.state_dict(), os.path.join(a.save_dir, f"step-{step}.pt"))
        if step % a.eval_every == 0:
            record["train_s"] = round(train_s, 1)
            evaluate(step)
    record["train_s"], record["steps"] = round(train_s, 1), step
    record["ms_per_step"] = round(1000 * train_s / max(step, 1), 2)
    evaluate(step)


if __name__ == "__main__":
    main()
