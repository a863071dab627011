"""SIGKILL a training run at random moments, again and again, and check what is left after each kill.

Run by tests/test_nothing_lost.py::test_sigkill_at_random_points_of_saves_never_loses_the_run as a
subprocess (a fork server: torch is imported once, each attempt is a forked child):

    python tests/save_killer.py WORKDIR ROUNDS SEED          -> WORKDIR/result.json

Round 0 trains from scratch until a first checkpoint exists; every later round (up to ROUNDS) forks a child that
resumes the run (`train(..., resume=True)`, a checkpoint every step) and SIGKILLs it at a random moment
of the 0.25 s after its first save began (a save takes about that long). After each kill the
parent checks that the newest checkpoint verifies (no fallback warning), that the model at the top of
the run directory reads, and records whether the kill left a partial save behind. The rounds end early
once a child finishes the run before its kill (or finds it finished). Then the parent finishes the run if
the rounds ran out first, and, for comparison, trains the same run uninterrupted. Single thread, float32, CPU.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)  # libgomp is fork-safe only while the parent never started a thread pool

from mambakit.checkpoints.io import WeightFiles, read_json  # noqa: E402
from mambakit.training import CheckpointFallbackWarning, TrainConfig, resolve_checkpoint, train  # noqa: E402

# what the children would import lazily, once here (AdamW's constructor alone imports torch._dynamo: seconds)
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
import safetensors.torch  # noqa: E402, F401


def config(work: Path, out: str, save_every: int) -> TrainConfig:
    # ~0.9M parameters: a checkpoint (weights + AdamW moments) of ~11 MB, written, hashed and fsynced per save
    return TrainConfig(recipe="kill", data=str(work / "data"), layer="mamba2", d_model=256, n_layer=2, d_state=16,
                       expand=2, headdim=64, chunk_size=16, seqlen=32, batch_size=2, lr=3e-3, warmup_steps=5,
                       max_steps=70, eval_every=0, final_eval_tokens=256, eval_batch_size=2, progress=False,
                       sample_tokens=0, val_fraction=0.1, save_every=save_every, out_dir=str(work / out))


def child(cfg: TrainConfig, resume: bool) -> None:
    try:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        checkpoint = resolve_checkpoint(cfg.out_dir) if resume else None
        if resume:
            cfg = TrainConfig.from_dict(checkpoint.state["config"])
        train(cfg, resume=resume, checkpoint=checkpoint)
    finally:
        os._exit(0)


def partial_save_left(out: Path) -> bool:
    names = [p.name for p in (out / "checkpoints").iterdir()] + [p.name for p in out.iterdir()]
    return any(n.endswith((".tmp", ".staging")) for n in names)


def check(out: Path) -> int:
    """The newest checkpoint verifies without a fallback, and the model at the top reads; returns its step."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointFallbackWarning)
        step = resolve_checkpoint(out).step
    read_json(out / "config.json")
    weights = WeightFiles(out)
    for name in weights.infos:
        weights.load(name)
    return step


def main() -> None:
    work, rounds, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    (work / "data").mkdir(parents=True, exist_ok=True)
    for i in range(16):
        (work / "data" / f"d{i}.txt").write_text(f"line {i} of the corpus, the rest is silence\n" * 40)
    cfg = config(work, "run", save_every=1)
    out = Path(cfg.out_dir)

    pid = os.fork()
    if pid == 0:
        child(cfg, resume=False)
    while not (out / "checkpoints" / "latest").exists():
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

    kills, partial, steps, ended = 0, 0, [], False
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            child(cfg, resume=True)
        # a save has begun when its step-N.tmp directory appears; kill at a random moment of the next 0.25 s
        # (writing, hashing, fsync, rename, pointer, publishing, pruning, or the step after)
        # (a child reaped here, by either wait, must not be waited for again: the run can end in the poll loop)
        deadline = time.monotonic() + 30
        finished_first = False
        while not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir()) and time.monotonic() < deadline:
            finished_first = os.waitpid(pid, os.WNOHANG)[0] != 0
            if finished_first:
                break
            time.sleep(0.001)
        if not finished_first:
            time.sleep(rng.uniform(0.0, 0.25))
            finished_first = os.waitpid(pid, os.WNOHANG)[0] != 0
        if not finished_first:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            kills += 1
            partial += partial_save_left(out)
        steps.append(check(out))
        if finished_first:
            ended = True
            break

    # finish the run (in this process: no fork follows), then the same run without interruptions
    train(TrainConfig.from_dict(resolve_checkpoint(out).state["config"]), resume=True)
    resumed = resolve_checkpoint(out).state["history"]["losses"]
    stray = partial_save_left(out)
    full = train(config(work, "full", save_every=0)).losses
    (work / "result.json").write_text(json.dumps({"kills": kills, "partial_saves_killed": partial, "steps": steps,
                                                  "resumed": resumed, "full": full, "stray_after": stray,
                                                  "ended_between_kills": ended}))


if __name__ == "__main__":
    main()
