"""Held-out bits per byte of the default recipe trained with and without the state reset at document boundaries.

Trains `default_recipe()` (byte-level Mamba-2 on the built-in Shakespeare plays) twice from the same seed, once
with `reset_at_eos=True` (seq_idx from the EOS positions: the state restarts at each document) and once
without, for `--steps` steps with the schedule spanning them (no time budget: both runs do the same number of
steps), then scores every held-out byte (Macbeth, Twelfth Night) with each model, both with and without the
reset in evaluation. Prints and writes one JSON object.

    python benchmarks/seq_idx_bpb.py --steps 600 --out /tmp/seq_idx_bpb.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mambakit.data import ByteTokenizer, load_token_streams
from mambakit.evaluation import evaluate_bits_per_byte
from mambakit.models import MambaLM
from mambakit.training import default_recipe, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--runs-dir", default="/tmp/seq_idx_bpb_runs")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    val = load_token_streams(None, ByteTokenizer()).val
    rows = []
    for reset in (True, False):
        cfg = default_recipe().replace(max_steps=args.steps, time_budget_s=None, reset_at_eos=reset, eval_every=0,
                                       save_every=0, sample_tokens=0, progress=False,
                                       out_dir=f"{args.runs_dir}/reset-{reset}")
        t0 = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - t0
        model = MambaLM.from_pretrained(cfg.out_dir)
        scores = {}
        for eval_reset in (True, False):
            _, bpb = evaluate_bits_per_byte(model, val, cfg.seqlen, cfg.eval_batch_size, reset_at_eos=eval_reset)
            scores[f"eval_reset_{eval_reset}"] = bpb
        rows.append({"train_reset_at_eos": reset, "steps": result.step, "train_s": seconds,
                     "final_train_loss": result.losses[-1], **scores})
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": f"python benchmarks/seq_idx_bpb.py --steps {args.steps}", "recipe": "shakespeare (default)",
              "held_out_tokens": len(val) - 1, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
