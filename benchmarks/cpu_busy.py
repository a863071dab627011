"""Generation and training speed on the CPU, quiet and with one competing busy process.

The default recipe's model (byte-level Mamba-2, d_model 128, 2 layers): generation tokens/s (greedy,
200 new tokens after a 1-token prompt, batch 1) and the time of one training step (AdamW, batch
16 x 256 bytes), medians. Each (thread policy, load) pair runs in a fresh process, so that OpenMP's
settings are the ones that process starts with:

    default   PyTorch's default (one thread per core)                         what mambakit did before
    one       OMP_NUM_THREADS=1
    auto      mambakit.training.cpu_threads.CPUThreadGovernor                 what `mambakit` does now

"busy" starts `python -c 'while 1: pass'` (one core's worth of load) a second before measuring.

    python benchmarks/cpu_busy.py                       # every policy, quiet and busy; a table on stdout
    python benchmarks/cpu_busy.py --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("default", "one", "auto")


def measure(policy: str, repeats: int) -> dict:
    """Runs inside the child process: the two figures for this process's thread policy."""
    import torch

    from mambakit.generation import generate
    from mambakit.models import MambaLM
    from mambakit.training import build_optimizer, default_recipe, forward_backward, model_config
    from mambakit.training.cpu_threads import CPUThreadGovernor

    governor = CPUThreadGovernor(every_s=2.0, enabled=policy == "auto")
    cfg = default_recipe()
    torch.manual_seed(0)
    model = MambaLM(model_config(cfg, 256)).eval()
    generate(model, [[0]], 20)  # warm-up
    gen = []
    for _ in range(repeats):
        governor.update()
        t0 = time.perf_counter()
        generate(model, [[0]], 200)
        gen.append(200 / (time.perf_counter() - t0))
    model.train()
    opt = build_optimizer(model, cfg)
    window = torch.randint(0, 256, (cfg.batch_size, cfg.seqlen + 1))
    steps = []
    for i in range(2 + 3 * repeats):
        governor.update()
        t0 = time.perf_counter()
        forward_backward(model, window, 256)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            steps.append(time.perf_counter() - t0)
    return {"gen_tok_s": statistics.median(gen), "train_step_ms": 1e3 * statistics.median(steps),
            "threads_end": torch.get_num_threads()}


def run_child(policy: str, busy: bool, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if policy == "one":
        env["OMP_NUM_THREADS"] = "1"
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(1.0)
        out = subprocess.run([sys.executable, __file__, "--child", policy, "--repeats", str(repeats)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--child", choices=POLICIES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.repeats)))
        return
    import torch

    rows = []
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load before: {os.getloadavg()[0]:.2f}")
    print(f"{'policy':8} {'load':5} {'gen tok/s':>10} {'step ms':>9} {'threads':>7}")
    for policy in args.policies:
        for busy in (False, True):
            r = run_child(policy, busy, args.repeats)
            rows.append({"policy": policy, "busy": busy, **r})
            print(f"{policy:8} {'busy' if busy else 'quiet':5} {r['gen_tok_s']:10.1f} {r['train_step_ms']:9.1f} "
                  f"{r['threads_end']:7d}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
