"""Time per chat turn as a conversation grows: `ChatSession` (the state carried across turns, `mambakit chat`) against
reading the whole rendered conversation again at every turn (what a stateless request does: `generate --chat`, or a
chat completion without a cached prefix).

A chat model (default: a `mambakit train --task chat` run) gets `--turns` user messages of `--message-bytes` bytes
each (speeches from the built-in corpus); each reply is greedy, at most `--reply-tokens` tokens. Both ways are given
the same messages and must produce the same replies (checked). Prints one JSON line per measured turn.

    .venv/bin/mambakit train && .venv/bin/python benchmarks/cpu_chat_finetune.py --base runs/shakespeare --runs masked
    .venv/bin/python benchmarks/cpu_chat_turns.py --model runs/chat-bench/masked --turns 40
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a chat model's directory (a tokenizer with a chat template)")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--message-bytes", type=int, default=200)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--report", type=int, nargs="+", default=[1, 10, 20, 40])
    args = parser.parse_args()
    from mambakit.checkpoints import load_checkpoint_tokenizer
    from mambakit.data import shakespeare_documents
    from mambakit.data.chat import apply_chat_template
    from mambakit.generation import ChatSession, stream
    from mambakit.models import MambaLM

    torch.set_grad_enabled(False)
    model = MambaLM.from_pretrained(args.model).eval()
    tok = load_checkpoint_tokenizer(args.model)
    text = next(iter(shakespeare_documents())).text
    messages = [text[i * args.message_bytes:(i + 1) * args.message_bytes] for i in range(args.turns)]
    session = ChatSession(model, tok)
    history: list[dict] = []
    stops = list(tok.stop_strings)
    stop_ids = list(getattr(tok, "stop_ids", ()) or ([] if tok.eos_id is None else [tok.eos_id]))
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "turns": args.turns,
                      "message_bytes": args.message_bytes, "reply_tokens": args.reply_tokens}))
    for turn, message in enumerate(messages, start=1):
        t0 = time.perf_counter()
        carried = "".join(session.reply(message, args.reply_tokens))
        t_carried = time.perf_counter() - t0
        # the same turn, reading the whole conversation again
        history.append({"role": "user", "content": message})
        t0 = time.perf_counter()
        ids = tok.encode(apply_chat_template(tok, history, add_generation_prompt=True))
        out = list(stream(model, ids, args.reply_tokens, eos_token_id=stop_ids or None, stop_strings=stops or None,
                          decode=tok.decode if stops else None))
        t_reread = time.perf_counter() - t0
        reread = tok.decode([t for t in out if t not in stop_ids])
        for s in stops:
            reread = reread.split(s)[0]
        history.append({"role": "assistant", "content": reread})
        if reread != carried:
            raise SystemExit(f"turn {turn}: the replies differ: {carried!r} vs {reread!r}")
        if turn in args.report:
            print(json.dumps({"turn": turn, "conversation_tokens": session.tokens_in_state,
                              "carried_read_tokens": session.last_read, "reread_tokens": len(ids),
                              "carried_ms": round(1e3 * t_carried, 1), "reread_ms": round(1e3 * t_reread, 1)}))


if __name__ == "__main__":
    main()
