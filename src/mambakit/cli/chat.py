"""`mambakit chat`: a conversation with a chat model on the terminal (or a pipe), one user message per line, each
reply streamed; the model's state is carried from turn to turn (`generation.ChatSession`), so a turn reads only its
new text, however long the conversation has grown."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import Parser, UsageError, check_writable_file, non_negative_int, positive_int, seed_type
from .generate import _DTYPES, _float_in
from .loading import checkpoint_dir, load_model

SUMMARY = "chat with a chat model, one message per line; the state carries over, so a turn reads only its new text"

EXAMPLES = """\
examples:
  mambakit chat --model runs/chat
      type a message and Enter; the reply streams; /reset starts a new conversation, /exit (or Ctrl-D) ends
  mambakit chat --model runs/chat --system "Answer in one word." --temperature 0
  printf 'Hello\\nAnd then?\\n' | mambakit chat --model runs/chat --temperature 0 --seed 0
      from a pipe: one reply per line of input, nothing else on stdout
  mambakit chat --model runs/chat --save talk.state
  mambakit chat --model runs/chat --resume talk.state --save talk.state
      keep the conversation (its messages and the model's state, a few MB), then go on from it another day without
      reading it again

The model needs a chat template (a chat model's own, or the one `mambakit train --task chat` saved) and no
attention layers (a Transformer's cache grows with the conversation: use `mambakit generate --chat`).
After each reply a line on stderr says how many tokens the turn read and generated and how many the state holds."""


def build_parser(prog: str = "mambakit chat") -> Parser:
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint directory (or a Hugging Face Hub id)")
    p.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit of a Hub id (default main)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                   help="at most N tokens a reply (default 256)")
    p.add_argument("--temperature", type=_float_in(0, float("inf"), False, True), default=0.7, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="keep the K likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=_float_in(0, 1, True, False), default=1.0, metavar="P",
                   help="nucleus sampling mass (default 1)")
    p.add_argument("--min-p", type=_float_in(0, 1, False, True), default=0.0, metavar="P",
                   help="drop tokens below P x the top probability (default 0)")
    p.add_argument("--repetition-penalty", type=_float_in(0, float("inf"), True, True), default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R (default 1: off)")
    p.add_argument("--seed", type=seed_type, default=None, metavar="S",
                   help="seed for sampling (turn i samples with S + i; default: random)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--save", default=None, metavar="FILE",
                   help="write the conversation (messages and the model's state) to FILE after every reply")
    p.add_argument("--resume", default=None, metavar="FILE",
                   help="go on from a conversation --save wrote (its messages are not read again)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decode step from a CUDA graph captured once for the conversation (default: on "
                        "CUDA)")
    return p


def main(model: str, revision: str | None = None, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
         repetition_penalty: float = 1.0, seed: int | None = None, device: str = "auto", dtype: str = "auto",
         cuda_graph: bool | None = None, save: str | None = None, resume: str | None = None) -> int:
    """Read user messages from stdin (one a line) and stream each reply to stdout until EOF or /exit.

    Examples:
        mambakit chat --model runs/chat
        printf 'Hello\\n' | mambakit chat --model runs/chat --temperature 0
    """
    from ..generation.chat import ChatSession

    if resume is not None and not Path(resume).is_file():
        raise UsageError(f"--resume: no such file: {resume}")
    if resume is not None and system is not None:
        raise UsageError("--system opens a new conversation: not with --resume (the saved one keeps its own)")
    if save is not None:
        check_writable_file(save, "--save")
    loaded = load_model(checkpoint_dir(model, revision), device, dtype)
    try:
        if resume is not None:
            session = ChatSession.load(resume, loaded.lm.eval(), loaded.tokenizer, cuda_graph=cuda_graph)
        else:
            session = ChatSession(loaded.lm.eval(), loaded.tokenizer, system=system, cuda_graph=cuda_graph)
    except ValueError as err:  # attention layers, a foreign state file (a DataError prints as a user error itself)
        if type(err) is not ValueError:
            raise
        raise UsageError(f"--resume {err}" if resume is not None else str(err)) from None
    if resume is not None:
        turns = sum(m["role"] == "user" for m in session.messages)
        print(f"resumed {resume}: {turns} turn{'s' if turns != 1 else ''}, {session.tokens_in_state:,} tokens in the "
              "state (not read again)", file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model} (/reset: a new conversation, /exit or Ctrl-D: leave)", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            session.reset()
            print("(a new conversation)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        t0 = time.perf_counter()
        n_before, restarts = session.tokens_in_state, session.restarts
        for piece in session.reply(message, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repetition_penalty=repetition_penalty,
                                   seed=None if seed is None else seed + turn):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        turn += 1
        again = session.restarts > restarts
        generated = session.tokens_in_state - session.last_read - (0 if again else n_before)
        note = " (the conversation did not render as read: read it whole again)" if again else ""
        print(f"[read {session.last_read:,} tokens, generated {generated:,} in {time.perf_counter() - t0:.2f} s; "
              f"{session.tokens_in_state:,} in the state]{note}", file=sys.stderr)
        if save is not None:
            session.save(save)
    return 0
