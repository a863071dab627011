"""Fine-tuning on conversations (`mambakit train --task chat`): does the README main job's Shakespeare model learn to
answer "which play is this speech from?", and what does scoring only the assistant's tokens change?

The conversations come from the built-in corpus (38 plays): a user message "Which play is this from?" with one speech
of 150-400 characters, and the assistant's answer, the play's name (e.g. "hamlet"). `--per-play` speeches of each play;
5% of the conversations are held out (mambakit's own split). Four runs of the base's shape, same data and steps:
    base        the base model as it is, asked in the chat template it never saw (zero-shot)
    masked      fine-tuned from the base, loss on the assistant's tokens (the default)
    all         fine-tuned from the base, loss on every token (`chat_loss: all`, the baseline without a mask)
    scratch     a fresh model, loss on the assistant's tokens, the default recipe's learning rate
Each reports the exact-match accuracy of its greedy reply on the held-out conversations, the held-out bits per
byte of the answers, and its time. Chance is 1 / 38.

    .venv/bin/mambakit train                                  # the base: runs/shakespeare (about 4 minutes)
    .venv/bin/python benchmarks/cpu_chat_finetune.py --base runs/shakespeare --steps 300
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from mambakit.data import shakespeare_documents
from mambakit.training import TrainConfig, get_recipe, train

QUESTION = "Which play is this from?"


def play_conversations(per_play: int, seed: int = 0) -> list[dict]:
    """{"messages": [user: question + speech, assistant: play name]} for `per_play` speeches of each play."""
    rng = random.Random(seed)
    out = []
    for doc in shakespeare_documents():
        name = doc.name.split("/")[-1]
        speeches = [s.strip() for s in re.split(r"\n\*\*[^*\n]+\*\*  \n", doc.text)]
        speeches = [re.sub(r"  \n", "\n", s) for s in speeches if 150 <= len(s) <= 400 and "**" not in s]
        for speech in rng.sample(speeches, min(per_play, len(speeches))):
            out.append({"messages": [{"role": "user", "content": f"{QUESTION}\n{speech}"},
                                     {"role": "assistant", "content": name}]})
    rng.shuffle(out)
    return out


def accuracy(run_dir: str | None, base: str, held_out: list[list[dict]], max_new_tokens: int = 48) -> float:
    """Exact-match share of greedy replies (the model in run_dir, or the base with the default chat template)."""
    from mambakit.checkpoints import load_checkpoint_tokenizer
    from mambakit.data.conversations import DEFAULT_CHAT_TEMPLATE, DEFAULT_STOP
    from mambakit.models import MambaLM
    from mambakit.training.loop import chat_reply

    path = run_dir or base
    model = MambaLM.from_pretrained(path).eval()
    tok = load_checkpoint_tokenizer(path)
    if run_dir is None:  # the base never saw a template: ask it in the one the others are trained with
        tok.chat_template, tok.stop_strings = DEFAULT_CHAT_TEMPLATE, (DEFAULT_STOP,)
    right = sum(chat_reply(model, tok, conv[:1], max_new_tokens).strip() == conv[1]["content"] for conv in held_out)
    return right / len(held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/shakespeare", help="a trained byte-level run (mambakit train)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--per-play", type=int, default=150)
    parser.add_argument("--runs", nargs="+", default=["base", "masked", "all", "scratch"])
    parser.add_argument("--out", default="runs/chat-bench", help="where the data and the runs go")
    args = parser.parse_args()
    from mambakit.data import conversation_streams, load_tokenizer

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "plays.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in play_conversations(args.per_play)))
    held_out = conversation_streams(data, load_tokenizer(args.base)).val_conversations
    base = TrainConfig.from_dict(json.loads((Path(args.base) / "train_config.json").read_text()))
    common = dict(data=str(data), chat=True, max_steps=args.steps, seqlen=512, batch_size=8, eval_every=100,
                  eval_tokens=None, final_eval_tokens=None, save_every=0, progress=False, sample_tokens=0, plot=False,
                  time_budget_s=None, warmup_steps=30)
    recipes = {
        "masked": get_recipe("finetune").replace(recipe="masked", init_from=args.base, lr=1e-3),
        "all": get_recipe("finetune").replace(recipe="all", init_from=args.base, lr=1e-3, chat_loss="all"),
        "scratch": get_recipe("finetune").replace(
            recipe="scratch", init_from=None, tokenizer="bytes", layer=base.layer, d_model=base.d_model,
            n_layer=base.n_layer, d_state=base.d_state, expand=base.expand, headdim=base.headdim,
            chunk_size=base.chunk_size, lr=3e-3, weight_decay=0.1),
    }
    rows = []
    for name in args.runs:
        t0 = time.perf_counter()
        if name == "base":
            row = {"run": name, "steps": 0, "val_bpb": None}
        else:
            result = train(recipes[name].replace(out_dir=str(root / name), **common))
            row = {"run": name, "steps": result.step, "val_bpb": result.val_bpb,
                   "step0_bpb": result.evals[0]["bpb"] if name != "scratch" else None}
        train_s = time.perf_counter() - t0
        row |= {"accuracy": accuracy(None if name == "base" else str(root / name), args.base, held_out),
                "held_out": len(held_out), "train_s": round(train_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
