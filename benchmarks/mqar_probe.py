"""A CPU proxy of one `mambakit reproduce mqar` model: does it leave the plateau under a given curriculum and rate?

Trains one model of the experiment (`mqar.model_specs`: its config, TrainSettings, optimizer, schedule and data,
with the experiment's batch seeds) on a length curriculum of your choosing, in float32 on one CPU thread, and
prints the validation accuracy at the tested length (the experiment's validation seed, never its test set) every
--eval-every steps. The last line is a JSON summary. The docstring of `reproduce/mqar.py` and BENCHMARKS.md quote
its runs:

    python benchmarks/mqar_probe.py --model attention-T256 --stages 32:300,64:300,128:300 --steps 1200
    python benchmarks/mqar_probe.py --model mamba1-N64-T64 --final-t 64 --stages 32:300 --steps 900 --lr 5e-3

A model key is `mqar.model_specs(settings, T)`'s: mamba1-N{16,64,256}-T{T}, mamba2-N...-T{T}, attention-T{T}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after the thread count)

from mambakit.data.synthetic import mqar as mqar_rows  # noqa: E402
from mambakit.models import build_model  # noqa: E402
from mambakit.reproduce import mqar  # noqa: E402
from mambakit.reproduce.common import batch_seed, curriculum_length, masked_loss  # noqa: E402
from mambakit.training import build_optimizer, lr_at  # noqa: E402


def parse_stages(text: str) -> list[tuple[int, int]]:
    """"32:300,64:300" -> [(32, 300), (64, 300)] (length, steps); "" -> no curriculum."""
    stages = []
    for part in filter(None, text.split(",")):
        length, steps = part.split(":")
        stages.append((int(length), int(steps)))
    if any(length < 8 or steps < 1 for length, steps in stages):
        raise ValueError(f"every stage needs a length >= 8 and steps >= 1, got {text!r}")
    return stages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="attention-T256", help="a model key of the experiment at --final-t")
    p.add_argument("--final-t", type=int, default=256, help="the tested length T (K = T / 8 pairs)")
    p.add_argument("--stages", default="32:300,64:300,128:300", help="LENGTH:STEPS,... before --final-t")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=None, help="replace the spec's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-rows", type=int, default=128)
    a = p.parse_args()
    try:
        stages = parse_stages(a.stages)
    except ValueError as e:
        p.error(f"--stages: {e}")
    if a.steps < 1 or a.eval_every < 1 or a.val_rows < 1 or (a.lr is not None and a.lr <= 0):
        p.error("--steps, --eval-every, --val-rows and --lr must be positive")
    torch.set_num_threads(1)
    s = mqar.settings(False)
    specs = {sp.key: sp for sp in mqar.model_specs(s, a.final_t)}
    if a.model not in specs:
        p.error(f"--model must be one of {sorted(specs)} at --final-t {a.final_t}")
    spec = specs[a.model]
    train = dataclasses.replace(spec.train, seed=a.seed, **({"lr": a.lr} if a.lr is not None else {}))
    cfg = train.train_config()
    torch.manual_seed(train.seed)  # as Run.fit
    model = build_model(spec.config, device="cpu")
    optimizer = build_optimizer(model, cfg)
    vocab, cpu = spec.config.vocab_size, torch.device("cpu")
    evals, losses, t0 = [], [], time.monotonic()
    model.train()
    for step in range(a.steps):
        T = curriculum_length(step, stages, a.final_t)
        batch = mqar_rows(s["batch_size"], T, T // s["kv_divisor"], vocab,
                          generator=torch.Generator().manual_seed(batch_seed(train.seed, step)))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = masked_loss(model(batch.inputs), batch.targets, vocab)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            model.eval()
            acc = mqar.evaluate(model, a.final_t, s, cpu, mqar.VAL_SEED, a.val_rows)["accuracy"]
            model.train()
            recent = losses[-a.eval_every:]
            evals.append({"step": step + 1, "train_T": T, "val_accuracy": round(acc, 4),
                          "train_loss": round(sum(recent) / len(recent), 4)})
            print(f"step {step + 1} (T {T}): validation accuracy at T {a.final_t} {100 * acc:.1f}%, "
                  f"train loss {evals[-1]['train_loss']:.4f}, {time.monotonic() - t0:.0f} s", flush=True)
    print(json.dumps({"model": a.model, "final_t": a.final_t, "stages": stages, "lr": train.lr, "seed": train.seed,
                      "steps": a.steps, "s": round(time.monotonic() - t0, 1), "evals": evals}))


if __name__ == "__main__":
    main()
