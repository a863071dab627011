"""`mambakit generate`: load a checkpoint and its tokenizer, stream a continuation of a prompt to stdout."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import Parser, UsageError

SUMMARY = "generate text from a trained or converted checkpoint, streamed as it is produced"

EXAMPLES = """\
examples:
  mambakit generate --model runs/shakespeare --prompt "**HAMLET**"
  mambakit generate --model runs/shakespeare --prompt "To be" --max-new-tokens 500 --temperature 0.7 --top-p 0.9
  mambakit generate --model runs/shakespeare --prompt "ROMEO" --temperature 0
      greedy decoding
  mambakit generate --model runs/shakespeare --seed 1
      no prompt: the start of a new document

The directory must hold config.json, model.safetensors and the tokenizer (tokenizer_config.json,
plus tokenizer.json for non-byte tokenizers), as `mambakit train` writes them. The text goes to
stdout; the speed (tokens/s) to stderr."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _float_in(lo: float, hi: float, lo_open: bool, hi_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


def build_parser(prog: str = "mambakit generate") -> Parser:
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (e.g. runs/shakespeare)")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-new-tokens", type=_nonnegative_int, default=200, metavar="N", help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=_float_in(0, float("inf"), False, True), default=0.8, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_nonnegative_int, default=0, metavar="K", help="keep the K likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=_float_in(0, 1, True, False), default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    p.add_argument("--min-p", type=_float_in(0, 1, False, True), default=0.0, metavar="P",
                   help="drop tokens below P x the top probability (default 0)")
    p.add_argument("--repetition-penalty", type=_float_in(0, float("inf"), True, True), default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R (default 1: off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling (default: random)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    return p


def main(model: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
         top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
         device: str = "auto", dtype: str = "auto") -> int:
    """Stream a continuation of `prompt` from the checkpoint in `model`; returns the exit status.

    The prompt is prefixed with the tokenizer's end-of-document token, as every document is in
    training, so the model continues it as the start of a document.

    Examples:
        mambakit generate --model runs/shakespeare --prompt "**HAMLET**"
        mambakit generate --model runs/shakespeare --prompt "To be" --temperature 0.7 --top-p 0.9 --seed 0
    """
    import torch

    from ..checkpoints import load_checkpoint_tokenizer
    from ..data import IncrementalDecoder
    from ..generation import stream
    from ..models import MambaLM
    from ..training import resolve_device

    directory = Path(model)
    if not directory.is_dir():
        raise UsageError(f"model directory not found: {model}")
    if not (directory / "config.json").is_file():
        raise UsageError(f"no config.json in {model}: not a model directory (train one with `mambakit train`)")
    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    # also reads a Hugging Face folder's tokenizer (a CheckpointError, printed as a user error, if none)
    tokenizer = load_checkpoint_tokenizer(directory)
    lm = MambaLM.from_pretrained(directory, dtype=getattr(torch, dtype), device=dev)
    if tokenizer.vocab_size > lm.config.padded_vocab_size:
        raise UsageError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                         f"({lm.config.padded_vocab_size}): they do not belong together")
    prompt_ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(prompt)
    if not prompt_ids:
        raise UsageError("the prompt is empty and the tokenizer has no end-of-document token to start from")

    out = sys.stdout
    out.write(prompt)
    out.flush()
    decoder = IncrementalDecoder(tokenizer)
    n_new = 0
    t0 = time.perf_counter()
    for token in stream(lm, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=tokenizer.eos_id, seed=seed):
        n_new += 1
        if token == tokenizer.eos_id:
            break
        out.write(decoder.push(token))
        out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    elapsed = time.perf_counter() - t0
    print(f"{n_new} tokens in {elapsed:.2f} s (prompt included): {n_new / max(elapsed, 1e-9):.1f} tokens/s", file=sys.stderr)
    return 0
