"""`mambakit eval`: bits per byte, perplexity and token count of a saved model on a file or a `datasets` directory
(--data), or lm-evaluation-harness tasks (--tasks, cli/eval_tasks.py)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .errors import Parser, UsageError, positive_int
from .eval_tasks import add_task_arguments, run_tasks
from .loading import checkpoint_dir, load_model

SUMMARY = "score a model on a text file or dataset (bits per byte, perplexity) or on lm-eval tasks"

EXAMPLES = """\
examples:
  mambakit eval --model runs/shakespeare --data macbeth.md
  mambakit eval --model runs/my_texts --data held_out.jsonl --json
      one JSON object on stdout: bits_per_byte, perplexity, loss, tokens, bytes, documents, ...
  mambakit eval --model runs/my_texts --data my_dataset/ --text-column content
      a directory written by datasets' save_to_disk (every split)
  mambakit eval --model runs/my_texts --data shards/ --streaming --max-tokens 1000000
      json/parquet/text files read through datasets' streaming (never held in memory whole)
  mambakit eval --model runs/chat --data held_out_chats.jsonl --chat
      conversations ({"messages": [...]} per line) rendered with the model's chat template, each read from an
      empty state, only the assistant's tokens scored (the default for a model trained with --task chat)
  mambakit eval --model runs/my_texts --tasks my_task --include-path my_tasks/
      lm-evaluation-harness tasks (pip install 'mambakit[lm_eval]'); prints lm-eval's table

Every document of --data is scored (no held-out split), joined as in training: each preceded by the
tokenizer's end-of-document token, the state restarting at each one (--no-reset-at-eos: carried across;
the default follows the model's train_config.json when it has one). Each of --batch-size rows reads one
contiguous segment of the data, --seqlen tokens a call, its state carried from call to call, so a document
longer than a window is read whole (--no-carry-state: every window starts from an empty state, as training's
held-out figure does; the default for models with attention layers, whose KV cache would grow over a segment).
bits per byte = total nats / (ln 2 x UTF-8 bytes of the scored text), the end-of-document token counting as
one byte; perplexity = exp(nats per token). The tokens are cached on disk as in training (--token-cache).
Progress bars go to stderr."""


def build_parser(prog: str = "mambakit eval") -> Parser:
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint directory (or a Hugging Face Hub id)")
    p.add_argument("--data", metavar="PATH",
                   help="a file, a directory of files, or a datasets directory (save_to_disk)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines of text")
    p.add_argument("--seqlen", type=positive_int, metavar="N",
                   help="tokens per window (default: the model's training seqlen, else 2048)")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="windows per forward (default: the model's training eval batch size, else 8)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="score only the first N tokens")
    p.add_argument("--reset-at-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="restart the state at each end-of-document token (default: as the model was trained; "
                        "on for models without a train_config.json)")
    p.add_argument("--carry-state", action=argparse.BooleanOptionalAction, default=None,
                   help="carry each row's state from window to window (default: on for models without attention "
                        "layers)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="--data is conversations: score the assistant's tokens only, each conversation from an empty "
                        "state (default: on for a model trained with --task chat)")
    p.add_argument("--chat-template", metavar="FILE", help="with --chat: a Jinja chat template, or 'default' "
                                                           "(mambakit's); default: the model's own")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--autocast", choices=("bf16", "bf16+cpu", "none"), default="bf16",
                   help="bf16 autocast on CUDA (default; a CPU stays in float32), bf16+cpu (on a CPU too) or none")
    p.add_argument("--streaming", action="store_true", help="stream json/parquet/text files and datasets directories")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="the text column of datasets directories and streamed json/parquet files (default text)")
    p.add_argument("--token-cache", default="auto", metavar="DIR",
                   help="where tokenized data is cached: auto ($MAMBAKIT_TOKEN_CACHE or ~/.cache/mambakit/tokens), "
                        "a directory, or off")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_task_arguments(p)  # --tasks and its flags; --device and --batch-size are shared
    return p


def _trained_settings(directory: Path) -> dict:
    """What the model's train_config.json says about seqlen and document resets ({} when it has none)."""
    path = directory / "train_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    # a run from before document resets existed trained across document boundaries
    return {"seqlen": cfg.get("seqlen"), "reset_at_eos": bool(cfg.get("reset_at_eos", False)),
            "eval_batch_size": cfg.get("eval_batch_size"), "chat": bool(cfg.get("chat", False))}


def _holds_conversations(path: str) -> bool:
    """Whether `path` reads as conversations ({"messages": [...]} items), for a hint when it is read as text."""
    from ..data import load_conversations

    try:
        load_conversations(path)
    except (ValueError, OSError):
        return False
    return True


def main(model: str, data: str | None = None, json: bool = False, seqlen: int | None = None, batch_size: int | None = None,
         max_tokens: int | None = None, reset_at_eos: bool | None = None, carry_state: bool | None = None,
         chat: bool | None = None, chat_template: str | None = None, device: str = "auto",
         autocast: str = "bf16", streaming: bool = False, text_column: str = "text", token_cache: str = "auto",
         progress: bool = True, tasks: str | None = None, **task_flags) -> int:
    """Score `model` on every document of `data`; print bits per byte, perplexity and counts. Returns 0.
    With `tasks` instead, run those lm-evaluation-harness tasks (`task_flags`: cli/eval_tasks.py's flags).

    Examples:
        mambakit eval --model runs/shakespeare --data macbeth.md
        mambakit eval --model runs/my_texts --data held_out.jsonl --json
    """
    import json as json_module

    from ..data import load_token_streams
    from ..evaluation import evaluate_stream
    from ..training.loop import autocast_dtype_for

    if (data is None) == (tasks is None):
        raise UsageError("give --data PATH (bits per byte on a file or dataset) or --tasks NAMES (lm-eval), one of them")
    if tasks is not None:
        return run_tasks(model=model, tasks=tasks, device=device, batch_size=batch_size, **task_flags)
    if not Path(data).exists():
        raise UsageError(f"--data {data}: not found")
    directory = checkpoint_dir(model)
    trained = _trained_settings(directory)
    seqlen = seqlen or trained.get("seqlen") or 2048
    batch_size = batch_size or trained.get("eval_batch_size") or 8
    if reset_at_eos is None:
        reset_at_eos = trained.get("reset_at_eos", True)

    if chat is None:
        chat = trained.get("chat", False)
    if chat and (streaming or carry_state):
        raise UsageError("--chat reads each conversation from an empty state, from a file or folder of them: "
                         "not with --streaming or --carry-state")
    if chat_template is not None and not chat:
        raise UsageError("--chat-template renders conversations: give --chat too")

    loaded = load_model(directory, device, dtype=None)  # the dtype the checkpoint loads in (float32 on CPU)
    lm, tokenizer, dev = loaded.lm, loaded.tokenizer, loaded.device
    if chat:  # the assistant's tokens (stream.scored), each conversation from an empty state (stream.starts)
        from ..data import conversation_stream
        from ..data.errors import DataError

        try:
            stream, n_docs, _ = conversation_stream(data, tokenizer, template=chat_template, progress=progress)
        except DataError as e:
            hint = " (a model trained with --task chat reads conversations: --no-chat scores plain text)" \
                if trained.get("chat") else ""
            raise UsageError(f"--chat: {e}{hint}") from e
        carry_state = False
    else:
        try:
            streams = load_token_streams(data, tokenizer, val_fraction=None, token_cache=token_cache,
                                         streaming=streaming, text_column=text_column, progress=progress)
        except ValueError as e:
            if not _holds_conversations(data):
                raise
            raise UsageError(f"{e}; {data} holds conversations: give --chat to score the assistant's turns") from e
        stream, n_docs = streams.train, streams.documents["train"]  # val_fraction=None: every document, in order
    if carry_state is None:  # an SSM's state is fixed-size; a KV cache would grow over the whole segment
        carry_state = not getattr(lm.config, "attn_layer_idx", None)
    if len(stream) < 2:
        raise UsageError(f"--data {data}: nothing to score ({len(stream)} token{'s' if len(stream) != 1 else ''})")
    t0 = time.perf_counter()
    result = evaluate_stream(lm, stream, seqlen, batch_size, max_tokens,
                             autocast_dtype=autocast_dtype_for(autocast, dev),
                             reset_at_eos=reset_at_eos, progress=progress, carry_state=carry_state)
    seconds = time.perf_counter() - t0
    report = {"model": str(model), "data": str(data), "bits_per_byte": result.bits_per_byte,
              "perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens, "bytes": result.bytes,
              "documents": n_docs, "chat": chat, "seqlen": seqlen,
              "reset_at_eos": reset_at_eos and tokenizer.eos_id is not None and not chat, "carry_state": carry_state,
              "device": str(dev), "seconds": seconds}
    if json:
        # strict JSON: a diverged model's infinite perplexity is written as null
        print(json_module.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in report.items()}))
    else:
        what = ("conversations", "assistant tokens scored") if chat else ("documents", "tokens scored")
        print(f"model: {model}\n"
              f"data: {data}: {report['documents']} {what[0]}, {result.tokens:,} {what[1]}, "
              f"{result.bytes:,} bytes\n"
              f"bits per byte: {result.bits_per_byte:.4f}\n"
              f"perplexity: {result.perplexity:.4f} per token ({result.loss:.4f} nats/token)\n"
              + (f"each conversation read from an empty state (in windows of {seqlen} tokens), " if chat else
                 f"windows of {seqlen} tokens, state "
                 f"{'carried across windows' if carry_state else 'empty at each window'} and "
                 f"{'reset' if report['reset_at_eos'] else 'carried'} at document boundaries, ")
              + f"{seconds:.1f} s on {dev}")
    return 0
