"""A CPU proxy of one `mambakit reproduce mqar` model: does it leave the plateau under a given curriculum and rate?

Trains one model of the experiment (`mqar.model_specs`: its config, TrainSettings, optimizer, schedule and data,
with the experiment's batch seeds) on a length curriculum of your choosing, in float32 on one CPU thread, and
prints the validation accuracy at the tested length (the experiment's validation seed, never its test set) every
--eval-every steps. The last line is a JSON summary. The docstring of `reproduce/mqar.py` and BENCHMARKS.md quote
its runs:

    python benchmarks/mqar_probe.py --model attention-T256 --stages 32:300,64:300,128:300 --steps 1200
    python benchmarks/mqar_probe.py --model mamba1-N64-T64 --final-t 64 --stages 32:300 --steps 900 --lr 5e-3
    python benchmarks/mqar_probe.py --model mamba1-N16-T32 --final-t 32 --stages "" --steps 2000 --lr 1e-2 --eval-every 200
    python benchmarks/mqar_probe.py --model mamba1-N16-T32 --final-t 32 --stages "" --steps 2000 --a-init one

The study flags (--a-init, --dt-min/--dt-max, --x-proj-scale, --D-init, --ssm-cfg, --cfg, --wd) change the built
model or its recipe after the experiment's spec has made it, to test why a model stays on the plateau.

A model key is `mqar.model_specs(settings, T)`'s: mamba1-N{16,64,256}-T{T}, mamba2-N...-T{T}, attention-T{T}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
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


def modify(model, a) -> None:
    """Apply the study's re-initialisations to every SSM mixer of a built model."""
    from mambakit.modules.mamba1 import inverse_softplus_dt
    with torch.no_grad():
        for block in model.backbone.layers:
            m = block.mixer
            name = type(m).__name__
            if a.a_init and name == "Mamba1":
                D, N = m.A_log.shape
                n1 = torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)
                if a.a_init == "s4d":
                    A = n1
                elif a.a_init == "one":
                    A = torch.ones(D, N)
                elif a.a_init == "s4d/N":
                    A = n1 / N
                elif a.a_init.startswith("const:"):
                    A = torch.full((D, N), float(a.a_init.split(":")[1]))
                elif a.a_init.startswith("uniform:"):
                    lo, hi = map(float, a.a_init.split(":")[1:])
                    A = torch.empty(D, N).uniform_(lo, hi)
                else:
                    raise SystemExit(f"unknown --a-init {a.a_init}")
                m.A_log.copy_(torch.log(A))
            if a.dt_min is not None:
                if name == "Mamba1":
                    m.dt_proj.bias.copy_(inverse_softplus_dt(m.d_inner, a.dt_min, a.dt_max, 1e-4))
                elif name == "Mamba2":
                    m.dt_bias.copy_(inverse_softplus_dt(m.nheads, a.dt_min, a.dt_max, 1e-4))
            if a.x_proj_scale is not None and name == "Mamba1":
                m.x_proj.weight[m.dt_rank:] *= a.x_proj_scale
            if a.D_init is not None and hasattr(m, "D"):
                m.D.fill_(a.D_init)


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
    # ---- study flags (all applied after the experiment's spec has built the model) ----
    p.add_argument("--a-init", default=None,
                   help="Mamba-1 A re-init: 's4d' (as built), 'one' (A=-1 everywhere, A_log=0), "
                        "'s4d/N' (A=-(n+1)/N), 'const:C' (A=-C), 'uniform:LO:HI' (A_log=log U(LO,HI) per (d,n))")
    p.add_argument("--dt-min", type=float, default=None, help="re-draw dt_proj.bias (Mamba-1) / dt_bias (Mamba-2) "
                   "log-uniform in [dt-min, dt-max] through softplus^-1")
    p.add_argument("--dt-max", type=float, default=None)
    p.add_argument("--ssm-cfg", default=None, help="JSON merged into the spec's ssm_cfg (e.g. '{\"d_conv\": 2}')")
    p.add_argument("--cfg", default=None, help="JSON of MambaConfig fields replaced (e.g. '{\"n_layer\": 4}')")
    p.add_argument("--wd", type=float, default=None, help="replace the weight decay")
    p.add_argument("--x-proj-scale", type=float, default=None, help="multiply Mamba-1 x_proj rows of B and C")
    p.add_argument("--D-init", type=float, default=None, help="set the skip D to this value")
    p.add_argument("--stop-at", type=float, default=None, help="stop once validation accuracy >= this")
    p.add_argument("--out", default=None, help="write the JSON summary here")
    a = p.parse_args()
    if (a.dt_min is None) != (a.dt_max is None):
        p.error("--dt-min and --dt-max go together")
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
    config = spec.config
    if a.ssm_cfg or a.cfg:
        config = dataclasses.replace(config, ssm_cfg={**config.ssm_cfg, **json.loads(a.ssm_cfg or "{}")},
                                     **json.loads(a.cfg or "{}"))
    extra = {"lr": a.lr} if a.lr is not None else {}
    if a.wd is not None:
        extra["weight_decay"] = a.wd
    train = dataclasses.replace(spec.train, seed=a.seed, **extra)
    cfg = train.train_config()
    torch.manual_seed(train.seed)  # as Run.fit
    model = build_model(config, device="cpu")
    modify(model, a)
    print("config:", json.dumps(config.to_dict()), "| params:", sum(p.numel() for p in model.parameters()), flush=True)
    optimizer = build_optimizer(model, cfg)
    vocab, cpu = config.vocab_size, torch.device("cpu")
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
            if a.stop_at is not None and acc >= a.stop_at:
                break
    summary = {"argv": sys.argv[1:], "model": a.model, "final_t": a.final_t, "stages": stages, "lr": train.lr,
               "seed": train.seed, "steps": a.steps, "steps_run": step + 1, "s": round(time.monotonic() - t0, 1),
               "evals": evals, "best": max(e["val_accuracy"] for e in evals), "final": evals[-1]["val_accuracy"]}
    print(json.dumps(summary))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
