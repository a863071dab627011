"""Held-out bits per byte of the default recipe trained with and without the state reset at document boundaries.

Trains `default_recipe()` (byte-level Mamba-2 on the built-in Shakespeare plays) twice from the same seed, once
with `reset_at_eos=True` (seq_idx from the EOS positions: the state restarts at each document) and once
without, for `--steps` steps with the schedule spanning them (no time budget: both runs do the same number of
steps). Each model then scores every held-out byte (Macbeth, Twelfth Night), with and without the reset in
evaluation, twice: as the recipe holds them out (2 documents, whole plays) and cut into their scenes (one
document per "### SCENE" heading), where document boundaries are 20 times as frequent.
Prints and writes one JSON object.

    python benchmarks/seq_idx_bpb.py --steps 600 --out /tmp/seq_idx_bpb.json
    python benchmarks/seq_idx_bpb.py --steps 600 --reuse          # score the runs already in --runs-dir
    python benchmarks/seq_idx_bpb.py --only on --threads 1 &  python benchmarks/seq_idx_bpb.py --only off --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

from mambakit.data import ByteTokenizer, Document, TokenStream, load_corpus
from mambakit.evaluation import evaluate_bits_per_byte
from mambakit.models import MambaLM
from mambakit.training import default_recipe, load_train_state, train


def _scenes(docs: list[Document]) -> list[Document]:
    """Each play cut before every scene heading (its title and first act heading are a short document of their own;
    a later act heading ends the scene before it)."""
    out = []
    for d in docs:
        parts = re.split(r"(?m)^(?=### SCENE)", d.text)
        out += [Document(f"{d.name}#{i}", p) for i, p in enumerate(parts) if p]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each run")
    p.add_argument("--runs-dir", default="/tmp/seq_idx_bpb_runs")
    p.add_argument("--reuse", action="store_true", help="score the checkpoints in --runs-dir instead of training")
    p.add_argument("--only", choices=("on", "off"), help="only the run with the reset on / off (two processes at once)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, val_docs = load_corpus()
    tok = ByteTokenizer()
    streams = {"plays": TokenStream.from_documents(val_docs, tok),
               "scenes": TokenStream.from_documents(_scenes(val_docs), tok)}
    rows = []
    for reset in (True, False):
        if args.only is not None and reset != (args.only == "on"):
            continue
        cfg = default_recipe().replace(max_steps=args.steps, time_budget_s=None, reset_at_eos=reset, eval_every=0,
                                       save_every=0, sample_tokens=0, progress=False,
                                       out_dir=f"{args.runs_dir}/reset-{reset}")
        row = {"train_reset_at_eos": reset}
        if not args.reuse:
            t0 = time.perf_counter()
            result = train(cfg)
            row.update(steps=result.step, train_s=time.perf_counter() - t0, final_train_loss=result.losses[-1])
        else:
            state = load_train_state(cfg.out_dir)
            row.update(steps=state["step"], final_train_loss=state["history"]["losses"][-1])
        model = MambaLM.from_pretrained(cfg.out_dir)
        for name, stream in streams.items():
            for eval_reset in (True, False):
                _, bpb = evaluate_bits_per_byte(model, stream, cfg.seqlen, cfg.eval_batch_size, reset_at_eos=eval_reset)
                row[f"{name}_eval_reset_{eval_reset}"] = bpb
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"command": f"python benchmarks/seq_idx_bpb.py --steps {args.steps}", "recipe": "shakespeare (default)",
              "held_out": {k: {"tokens": len(s) - 1, "documents": int((s.tokens == 0).sum())} for k, s in streams.items()},
              "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
