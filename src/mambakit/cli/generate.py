"""`mambakit generate`: load a checkpoint and its tokenizer, stream a continuation of a prompt to stdout,
or continue every line of a file in batches (one JSON line per prompt)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .errors import Parser, UsageError, check_writable_file, non_negative_int, positive_int, seed_type
from .loading import checkpoint_dir, load_model

SUMMARY = "generate text from a trained or converted checkpoint, streamed as it is produced"

EXAMPLES = """\
examples:
  mambakit generate --model runs/shakespeare --prompt "**HAMLET**"
  mambakit generate --model runs/shakespeare --prompt "To be" --max-new-tokens 500 --temperature 0.7 --top-p 0.9
  mambakit generate --model runs/shakespeare --prompt "ROMEO" --temperature 0
      greedy decoding
  mambakit generate --model runs/shakespeare --seed 1
      no prompt: the start of a new document
  mambakit generate --model runs/shakespeare --prompt "ROMEO" --stop "\n\n"
      stop at the first blank line
  mambakit generate --model runs/shakespeare --prompts-file prompts.txt --output out.jsonl --batch-size 32
      one prompt per line, generated in batches; one JSON line per prompt
      ({"index", "prompt", "completion", "new_tokens"}) to out.jsonl (default: stdout)
  mambakit generate --model state-spaces/mamba-130m-hf --prompt "Mamba is" --revision main
      a Hugging Face Hub id, fetched once into huggingface_hub's cache (pip install 'mambakit[hub]';
      HF_HUB_OFFLINE=1 reads the cache only)
  mambakit generate --model ORG/CHAT-MODEL --chat --prompt "What is a state space model?"
      the prompt as a user message in the tokenizer's chat template; prints the reply
  mambakit generate --model runs/shakespeare --context macbeth.md --save-state macbeth.state --max-new-tokens 0
      read a long text once and save the model's state after it (a few MB, whatever the text's length)
  mambakit generate --model runs/shakespeare --state macbeth.state --prompt "**MACBETH**" --temperature 0
  mambakit generate --model runs/shakespeare --state macbeth.state --prompts-file questions.txt
      continue the saved state: the prompt (every line, in batches) is read after the text, not the text again
  mambakit generate --model runs/shakespeare --prompt "ROMEO" --dtype bfloat16
  mambakit generate --model runs/shakespeare --prompt "ROMEO" --quantize int8
      faster CPU decoding (it reads the weights once a token): bf16 weights, or int8 weight-only
      linear layers (activations in bf16 for their products); figures in BENCHMARKS.md

The directory must hold config.json, model.safetensors and the tokenizer (tokenizer_config.json,
plus tokenizer.json for non-byte tokenizers), as `mambakit train` writes them, or be a Hugging Face
model folder (tokenizer.json, or sentencepiece's tokenizer.model). The text goes to stdout; the
speed to stderr: the first token's time (prefill and, on CUDA, kernel compiles) apart from the rate
of the tokens after it (with --prompts-file, the first batch apart from the others)."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_READ_PIECE = 16384  # tokens of --context read per progress-bar update


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
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory (e.g. runs/shakespeare) or Hugging Face Hub id (e.g. org/name)")
    p.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit of a Hub id (default main)")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: empty, a new document)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt (each line of --prompts-file) as a user message through the tokenizer's "
                        "chat template; print only the reply")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="continue every line of FILE instead of --prompt (one prompt per line, UTF-8)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="with --prompts-file: write the JSON lines to FILE instead of stdout")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="with --prompts-file: prompts generated together (default 16)")
    p.add_argument("--context", default=None, metavar="FILE",
                   help="read the text of FILE (UTF-8, whole) before the prompt (or before every line of "
                        "--prompts-file, read once for all of them)")
    p.add_argument("--state", default=None, metavar="FILE",
                   help="start from a state saved by --save-state: what it read is not read again (Mamba models)")
    p.add_argument("--save-state", default=None, metavar="FILE",
                   help="save the model's state after the context and the prompt (with --prompts-file: after the "
                        "context), before generating, for --state later")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=200, metavar="N", help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=_float_in(0, float("inf"), False, True), default=0.8, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="keep the K likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=_float_in(0, 1, True, False), default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    p.add_argument("--min-p", type=_float_in(0, 1, False, True), default=0.0, metavar="P",
                   help="drop tokens below P x the top probability (default 0)")
    p.add_argument("--repetition-penalty", type=_float_in(0, float("inf"), True, True), default=1.0, metavar="R",
                   help="divide the logits of tokens already seen by R (default 1: off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a continuation once its text contains TEXT (repeatable; the text is kept)")
    p.add_argument("--seed", type=seed_type, default=None, metavar="S", help="seed for sampling (default: random)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: every linear layer's weight in int8 with a scale per output channel (inference only; "
                        "mambakit.modules.quantize_weights); default none")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the decode step from a CUDA graph on CUDA devices (default: on for models without "
                        "attention layers; a Transformer's or hybrid's KV cache grows, so they decode eagerly)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: decode with the step compiled by torch.compile (about 1.4x faster per token at the "
                        "130M shape, after a compile of seconds to a minute; Mamba models without attention layers)")
    return p


def _unescape(text: str) -> str:
    """'\\n' and '\\t' typed in a shell argument stand for newline and tab ('\\\\' for a backslash)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"prompts file not found: {path}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not lines:
        raise UsageError(f"{path}: no prompts (the file is empty)")
    return lines


def main(model: str, prompt: str = "", prompts_file: str | None = None, output: str | None = None,
         batch_size: int = 16, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
         top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, stop: list[str] | None = None,
         seed: int | None = None, device: str = "auto", dtype: str = "auto", cuda_graph: bool | None = None,
         revision: str | None = None, chat: bool = False, quantize: str = "none", compile: bool = False,
         context: str | None = None, state: str | None = None, save_state: str | None = None) -> int:
    """Stream a continuation of `prompt` (or continue each line of `prompts_file`) from the checkpoint in `model`.

    Every prompt is prefixed with the tokenizer's end-of-document token, as every document is in
    training, so the model continues it as the start of a document (the begin-of-sequence token when the
    checkpoint's configs name one). With `chat`, the prompt becomes a user message rendered by the tokenizer's
    chat template (which places any special tokens itself). Returns the exit status.

    Examples:
        mambakit generate --model runs/shakespeare --prompt "**HAMLET**"
        mambakit generate --model runs/shakespeare --prompt "To be" --temperature 0.7 --top-p 0.9 --seed 0
        mambakit generate --model runs/shakespeare --prompts-file prompts.txt --output out.jsonl
        mambakit generate --model runs/shakespeare --prompt "ROMEO" --quantize int8
        mambakit generate --model runs/shakespeare --prompt "ROMEO" --quantize int8 --compile --max-new-tokens 2000
    """
    from ..data.chat import apply_chat_template
    from ..generation.compiled import check_compilable
    from ..modules.quantized import quantize_weights
    from ..training.cpu_threads import CPUThreadGovernor

    if prompts_file is None and output is not None:
        raise UsageError("--output needs --prompts-file (a single prompt streams to stdout)")
    if prompts_file is not None and prompt:
        raise UsageError("give either --prompt or --prompts-file, not both")
    stops = [_unescape(s) for s in stop] if stop else None
    if stops is not None and not all(stops):
        raise UsageError("--stop needs a non-empty text")
    if chat and (context or state or save_state):
        raise UsageError("--chat renders the prompt as a whole conversation: it does not combine with --context, "
                         "--state or --save-state")
    directory = checkpoint_dir(model, revision)
    prompts = _read_prompts(prompts_file) if prompts_file is not None else None
    context_text = _read_context(context) if context is not None else ""
    if state is not None and not Path(state).is_file():
        raise UsageError(f"--state: state file not found: {state}")
    if (state or context) and prompts is not None and any(not line for line in prompts):
        line = next(i for i, text in enumerate(prompts, start=1) if not text)
        raise UsageError(f"{prompts_file}:{line}: an empty line; with --context or --state every line is read after "
                         "the text, so each needs some")
    if output is not None:
        check_writable_file(output, "--output")  # before the model is loaded and anything is generated
    if save_state is not None:
        check_writable_file(save_state, "--save-state")
    loaded = load_model(directory, device, dtype)
    lm, tokenizer, dev = loaded.lm, loaded.tokenizer, loaded.device
    if quantize != "none":
        quantize_weights(lm.eval(), quantize)
    attention = getattr(lm.config, "attn_layer_idx", None)
    if cuda_graph is None:  # the default: graphs where one can follow the model's cache
        cuda_graph = not attention
    elif cuda_graph and attention:
        raise UsageError(f"--cuda-graph: this model has attention layers (attn_layer_idx={list(attention)}), whose KV "
                         "cache grows as it decodes, so a captured CUDA graph cannot follow it; leave --cuda-graph out "
                         "(it then decodes eagerly)")
    if compile:
        try:
            check_compilable(lm, "--compile")
        except ValueError as err:
            raise UsageError(str(err)) from None
    # every id that ends a reply (generation_config.json may list several), and the id a document starts with
    stop_ids = list(getattr(tokenizer, "stop_ids", ()) or ([] if tokenizer.eos_id is None else [tokenizer.eos_id]))
    # and every text that does (generation_config.json's stop_strings: e.g. a model fine-tuned on conversations
    # with mambakit's default template ends each turn with "<|end|>"), besides --stop
    model_stops = [s for s in getattr(tokenizer, "stop_strings", ()) or () if s not in (stops or [])]
    if model_stops:
        stops = (stops or []) + model_stops
    first = getattr(tokenizer, "bos_id", None)
    first = tokenizer.eos_id if first is None else first
    start = [] if chat or first is None else [first]

    continuing = bool(state or context or save_state)
    if continuing and getattr(lm.config, "attn_layer_idx", None):
        raise UsageError("--context, --state and --save-state keep the model's state between texts: Mamba models only "
                         "(this one has attention layers, whose cache grows with the text)")

    def encode_prompt(text: str) -> list[int]:
        if chat:  # a DataError (printed as one line) when the tokenizer has no chat template
            text = apply_chat_template(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
        if continuing:  # read after the start token, the saved state or the context (see _read_before)
            return tokenizer.encode(text)
        return start + tokenizer.encode(text)

    # on a CPU shared with other processes, run on the cores they leave idle (BENCHMARKS.md: a busy machine);
    # not with --compile: the compiled step is specialised to the thread count, and a change compiles it again
    governor = CPUThreadGovernor(every_s=2.0, enabled=dev.type == "cpu" and not compile)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, eos_token_id=stop_ids or None, seed=seed,
                    stop_strings=stops, decode=tokenizer.decode if stops else None, cuda_graph=cuda_graph,
                    compile=compile)
    if continuing:
        # the start token (without --state), the context and (one prompt) the prompt, read once into a state that
        # generation continues; --save-state writes it before anything is generated
        shared = _read_before(lm, dev, [] if state else start, tokenizer.encode(context_text) if context_text else [],
                              state, save_state, encode_prompt(prompt) if prompts is None else [])
        sampling["state"] = shared
        encode = encode_prompt if prompts is not None else (lambda text: [])
    else:
        encode = encode_prompt
    try:
        return _generate(lm, tokenizer, prompt, prompts, output, batch_size, max_new_tokens, chat, encode,
                         stop_ids, governor, sampling, model_stops)
    finally:
        governor.restore()  # main may run in a process that goes on (tests, a notebook)


def _generate(lm, tokenizer, prompt, prompts, output, batch_size, max_new_tokens, chat, encode_prompt, stop_ids,
              governor, sampling, model_stops: list[str]) -> int:
    """`main` after the checks and the loading: stream one prompt to stdout, or a prompts file to --output."""
    from ..data import IncrementalDecoder
    from ..generation import StopTextFilter, stream

    t0 = time.perf_counter()
    if prompts is not None:
        batches = _generate_file(lm, tokenizer, prompts, encode_prompt, stop_ids, output, batch_size, max_new_tokens,
                                 sampling, model_stops)
        (n_first, t_first), n_rest = batches[0], sum(n for n, _ in batches[1:])
        print(speed_report("first batch", n_first, t_first - t0, n_rest, batches[-1][1] - t_first), file=sys.stderr)
        return 0
    prompt_ids = encode_prompt(prompt)
    if not prompt_ids and sampling.get("state") is None:
        raise UsageError("the prompt is empty and the tokenizer has no end-of-document token to start from")
    out = sys.stdout
    out.write("" if chat else prompt)
    out.flush()
    decoder = IncrementalDecoder(tokenizer)
    # the model's own stop strings are not printed (a tail that may begin one is held back); --stop's are
    shown = StopTextFilter(model_stops)
    n_new, t_first = 0, None
    for token in stream(lm, prompt_ids, max_new_tokens, **sampling):
        if t_first is None:
            t_first = time.perf_counter()
        governor.update()
        n_new += 1
        if token in stop_ids:
            break
        out.write(shown.push(decoder.push(token)))
        out.flush()
    t_end = time.perf_counter()
    out.write(shown.push(decoder.flush()) + shown.flush() + "\n")
    out.flush()
    if t_first is None:  # --max-new-tokens 0
        print(f"0 tokens in {t_end - t0:.2f} s", file=sys.stderr)
    else:
        print(speed_report("first token", 1, t_first - t0, n_new - 1, t_end - t_first), file=sys.stderr)
    return 0


def _read_context(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--context: file not found: {path}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_before(lm, device, start: list[int], context_ids: list[int], state_path: str | None,
                 save_path: str | None, prompt_ids: list[int]):
    """The state generation continues: the saved one (--state), then `start`, the context and the prompt read
    into it; written to --save-state. Reports what it read and how long it took on stderr."""
    import torch

    from ..generation import SavedState, StateFileWarning, load_state, prefill, save_state

    t0 = time.perf_counter()
    saved = None
    if state_path is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StateFileWarning)
            try:
                saved = load_state(state_path, lm, device=device)
            except ValueError as err:
                raise UsageError(f"--state {err}") from None
        for w in caught:
            print(f"mambakit generate: warning: {w.message}", file=sys.stderr)
        if saved.batch_size != 1:
            raise UsageError(f"--state {state_path}: holds {saved.batch_size} rows; the command continues one")
    ids = start + context_ids + prompt_ids
    if ids:
        from tqdm.auto import tqdm

        cache = None if saved is None else saved.cache.index_select(torch.zeros(1, dtype=torch.long, device=device))
        # in pieces under a progress bar (a book takes minutes on a CPU); the state does not depend on the pieces
        with tqdm(total=len(ids), unit="tok", unit_scale=True, desc="read", file=sys.stderr, leave=False,
                  dynamic_ncols=True, disable=len(ids) <= _READ_PIECE) as bar:
            for first in range(0, len(ids), _READ_PIECE):
                cache, logits = prefill(lm, [ids[first:first + _READ_PIECE]], cache)
                bar.update(min(_READ_PIECE, len(ids) - first))
        saved = SavedState(cache, logits)
    elif saved is None:
        raise UsageError("nothing to read: the context and prompt are empty and the tokenizer has no end-of-document "
                         "token to start from")
    read = f"read {len(ids):,} tokens in {time.perf_counter() - t0:.2f} s" if ids else "nothing more read"
    if save_path is not None:
        try:
            save_state(save_path, lm, saved.cache, saved.logits)
        except OSError as err:
            raise UsageError(f"--save-state {save_path}: cannot write it ({err})") from None
        size = Path(save_path).stat().st_size
        size_text = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
        print(f"state after {saved.tokens:,} tokens saved to {save_path} ({size_text}); {read}", file=sys.stderr)
    elif ids:
        print(f"{read}, {saved.tokens:,} in the state", file=sys.stderr)
    return saved


def speed_report(first: str, n_first: int, first_s: float, n_rest: int, rest_s: float) -> str:
    """The speed line of `generate`: the first token (or batch) apart, since it carries the prompt's prefill
    and, on CUDA, the Triton compiles and CUDA graph capture of first use; the rate is the rest's.

    Example:
        >>> speed_report("first token", 1, 9.5, 199, 1.99)   # a 9.5 s first token does not touch the rate
        'first token in 9.50 s (prompt and first use: ...); then 199 tokens in 1.99 s: 100.0 tokens/s, 10.0 ms/token'
    """
    first_use = "prompt and first use: kernel compiles on CUDA, the step's compile with --compile"
    head = (f"{first} in {first_s:.2f} s ({first_use})" if first == "first token"
            else f"{first}: {n_first} tokens in {first_s:.2f} s ({first_use})")
    if n_rest == 0:
        return f"{head}; no further tokens ({n_first / max(first_s, 1e-9):.1f} tokens/s with the first use)"
    return (f"{head}; then {n_rest} tokens in {rest_s:.2f} s: {n_rest / max(rest_s, 1e-9):.1f} tokens/s, "
            f"{rest_s / n_rest * 1e3:.1f} ms/token")


def _generate_file(lm, tokenizer, prompts: list[str], encode_prompt, stop_ids: list[int], output: str | None,
                   batch_size: int, max_new_tokens: int, sampling: dict,
                   model_stops: list[str]) -> list[tuple[int, float]]:
    """Continue each prompt in batches of batch_size; write one JSON line per prompt; return, per batch, its
    new-token count and the time.perf_counter() at its end.

    Batch k is seeded with seed + k * batch_size, so a seeded run is reproducible and its batches differ.
    """
    from ..generation import StopTextFilter, generate

    encoded = [encode_prompt(text) for text in prompts]
    if any(not ids for ids in encoded):
        raise UsageError("an empty prompt needs a tokenizer with an end-of-document token to start from")
    batches: list[tuple[int, float]] = []
    sink = open(output, "w", encoding="utf-8") if output is not None else sys.stdout  # noqa: SIM115
    try:
        for first in range(0, len(encoded), batch_size):
            batch = encoded[first:first + batch_size]
            seed = None if sampling["seed"] is None else (sampling["seed"] + first) % 2**64  # seeds live in [0, 2**64)
            n_new = 0
            for i, new in enumerate(generate(lm, batch, max_new_tokens, **{**sampling, "seed": seed})):
                n_new += len(new)
                text_ids = new[:-1] if new and new[-1] in stop_ids else new
                shown = StopTextFilter(model_stops)  # the text before the model's first stop string
                text = shown.push(tokenizer.decode(text_ids)) + shown.flush()
                record = {"index": first + i, "prompt": prompts[first + i], "completion": text, "new_tokens": len(new)}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            batches.append((n_new, time.perf_counter()))
    finally:
        if sink is not sys.stdout:
            sink.close()
    return batches
