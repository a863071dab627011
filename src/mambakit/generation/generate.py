"""The generate and stream loops: prefill once, then sample and decode one token at a time.

Shapes (legend): B batch, V padded vocab, T max_new_tokens.

    new = generate(model, prompts, T, temperature=0.8, top_p=0.9, seed=0)   # list of B token lists
    for token in stream(model, prompt, T): ...                               # one prompt, token by token

Both run the same loop (`_token_loop`), so `stream` yields exactly what `generate` returns. The loop
keeps everything on the device: the sampled tokens of every step go into a (B, T) buffer and the
host reads them once at the end; it synchronises only every few steps to see whether every row has
finished (EOS), or every step when stop strings need the text.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..deprecation import DEPRECATED
from .cache import allocate_cache
from .compiled import CompiledDecoder
from .cuda_graph import CUDAGraphDecoder
from .sampling import apply_repetition_penalty, greedy, logits_to_probs, sample, seen_tokens
from .steps import (DEFAULT_TOKENS_PER_CALL, decode_one_token, model_device, pack_prompts, prefill_packed,
                    resolve_tokens_per_call)
from .state_file import SavedState
from .stopping import StopStrings

_SYNC_EVERY = 16  # steps between host checks of "every row has hit EOS" (each check is a device sync)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p < 1.0, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("eos_token_id", self.eos_token_id is None or (not isinstance(self.eos_token_id, (bool, str, bytes))
                                                           and all(_is_int(t) and t >= 0 for t in self.eos_ids)),
             "None, an int >= 0 or a list of them"),
            # torch generators take seeds in [0, 2**64); beyond that torch raises an overflow error
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "None or an int in [0, 2**64)"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"generate: {name} must be {need}, got {getattr(self, name)!r}")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, numbers.Integral):
            return [int(self.eos_token_id)]
        try:
            return [int(t) if _is_int(t) else t for t in self.eos_token_id]
        except TypeError:  # not iterable: reported by __post_init__
            return [self.eos_token_id]


def _is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool (True would silently mean token 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_id_row(row, where: str) -> None:
    """Every element of one prompt is an integer token id (1.5 is not truncated to 1; a nested list is refused)."""
    if isinstance(row, torch.Tensor):
        if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
            raise ValueError(f"{where}: token ids must be integers, got a {row.dtype} tensor")
        return
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
        raise ValueError(f"{where}: expected a list of token ids, got {type(row).__name__}")
    if all(type(t) is int for t in row):  # the common case, fast
        return
    for t in row:
        if not _is_int(t):
            what = "a nested list" if isinstance(t, (Sequence, torch.Tensor)) and not isinstance(t, str) else repr(t)
            raise ValueError(f"{where}: token ids must be ints, got {what} ({type(t).__name__})")


def _check_prompts(prompts) -> None:
    """generate's `prompts`: a (B, L) tensor (checked by pack_prompts) or a list of token-id lists."""
    if isinstance(prompts, torch.Tensor) or isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        return  # pack_prompts reports these
    if prompts and all(_is_int(t) for t in prompts):
        raise ValueError("generate: prompts must be a list of token-id lists (one per prompt), got a flat list of "
                         "ints: pass [prompt_ids] for one prompt (or use stream)")
    for i, row in enumerate(prompts):
        _check_id_row(row, f"generate: prompts[{i}]")


def _check_max_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def _check_compile(compile) -> None:
    if not isinstance(compile, bool):
        raise ValueError(f"generate: compile must be a bool, got {type(compile).__name__}")


def _decoder_for(model: nn.Module, batch: int, cuda_graph: bool | CUDAGraphDecoder,
                 state_dtype: torch.dtype | None = None, compile: bool = False,
                 max_length: int = 1) -> CUDAGraphDecoder | CompiledDecoder | None:
    """The decoder to use: the graph one given, a new one (CUDA models only), a compiled one (CPU models, with
    `compile`), or None for the eager step. max_length: the tokens a row will hold (prompt, padding included,
    and generated), the KV caches' capacity in a graph of a model with attention layers."""
    if compile:
        if isinstance(cuda_graph, CUDAGraphDecoder):
            raise ValueError("generate: compile=True and a CUDAGraphDecoder: choose one")
        return CompiledDecoder(model, batch, state_dtype=state_dtype)
    if isinstance(cuda_graph, CUDAGraphDecoder):
        if cuda_graph.model is not model or cuda_graph.batch_size != batch:
            raise ValueError(f"generate: cuda_graph was captured for batch {cuda_graph.batch_size} of another "
                             f"model or size; this call has {batch} prompts")
        if cuda_graph.max_length is not None and cuda_graph.max_length < max_length:
            raise ValueError(f"generate: cuda_graph's KV caches hold {cuda_graph.max_length} tokens a row; this "
                             f"call needs {max_length} (prompt and new tokens): make a decoder with a larger max_length")
        return cuda_graph
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"generate: cuda_graph must be a bool or a CUDAGraphDecoder, got {type(cuda_graph).__name__}")
    if cuda_graph and model_device(model).type == "cuda":
        return CUDAGraphDecoder(model, batch, state_dtype=state_dtype, max_length=max_length)
    return None  # on CPU a graph buys nothing: the eager step is the fallback


def _token_loop(model: nn.Module, ids_BL: torch.Tensor, lengths: list[int], max_new_tokens: int,
                params: SamplingParams, cuda_graph: bool | CUDAGraphDecoder,
                prefill_tokens_per_call: int | None, state_dtype: torch.dtype | None = None,
                logprobs_out: list[torch.Tensor] | None = None, compile: bool = False,
                state: SavedState | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) int64 on the model's device, max_new_tokens times.

    ids_BL, lengths: the prompts as `pack_prompts` returns them. logprobs_out: when a list, each step appends
    the (B,) float32 log-probability of the tokens it yields under the model's own distribution (the softmax of
    the logits over the real vocabulary, before repetition penalty, temperature and filters), on the device.
    Prefill runs at the first iteration; a decode step runs only when the caller asks for one more token, so a
    caller that stops early (EOS, stop string) never pays for a step it does not use. With `state` (a saved state,
    `state_file.load_state`) every row starts from it (a state of one row is every row's); ids_BL of seqlen 0 then
    means no prompt: the first token comes from the state's own logits.
    """
    if max_new_tokens == 0:
        return
    device = ids_BL.device
    vocab, real_vocab = model.config.padded_vocab_size, model.config.vocab_size
    batch = ids_BL.shape[0]
    decoder = _decoder_for(model, batch, cuda_graph, state_dtype, compile, max_length=ids_BL.shape[1] + max_new_tokens)
    if decoder is not None:
        cache = decoder.cache.reset()
    else:
        cache = allocate_cache(model, batch, state_dtype=state_dtype)
    if state is not None:
        _start_from(cache, state)
    if state is not None and ids_BL.shape[1] == 0:
        logits_BV = state.logits.to(device).expand(batch, -1).clone()
    else:
        cache, logits_BV = prefill_packed(model, ids_BL, lengths, cache, prefill_tokens_per_call)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    with torch.inference_mode():
        seen_BV = None
        if params.repetition_penalty != 1.0:
            # tokens of the prompt (padding excluded) count as seen
            pads_B = torch.tensor([ids_BL.shape[1] - n for n in lengths], device=device)
            valid_BL = torch.arange(ids_BL.shape[1], device=device)[None, :] >= pads_B[:, None]
            seen_BV = seen_tokens(ids_BL, valid_BL, vocab)
    for step in range(max_new_tokens):
        with torch.inference_mode():
            if real_vocab < vocab:
                logits_BV[:, real_vocab:] = float("-inf")  # padded vocab ids are never produced
            logp_BV = logits_BV.float().log_softmax(dim=-1) if logprobs_out is not None else None
            if seen_BV is not None:
                logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
            if params.temperature == 0.0:
                tokens_B = greedy(logits_BV)
            else:
                probs_BV = logits_to_probs(logits_BV, params.temperature, params.top_k, params.top_p, params.min_p)
                tokens_B = sample(probs_BV, generator)
            if seen_BV is not None:
                seen_BV.scatter_(1, tokens_B[:, None], True)
            if logp_BV is not None:
                logprobs_out.append(logp_BV.gather(1, tokens_B[:, None])[:, 0])
        yield tokens_B
        if step + 1 < max_new_tokens:
            logits_BV = decoder(tokens_B) if decoder is not None else decode_one_token(model, tokens_B, cache)


def _start_from(cache, state: SavedState) -> None:
    """Copy a saved state into the loop's cache (in place: a CUDA graph's cache); a state of one row fills every row."""
    if state.batch_size not in (1, cache.batch_size):
        raise ValueError(f"generate: the state holds {state.batch_size} rows; this call has {cache.batch_size} "
                         "prompts (a state of one row continues any number of them)")
    cache.copy_from_(state.cache)


def _pack_continuations(prompts, model: nn.Module, device: torch.device,
                        state: SavedState | None) -> tuple[torch.Tensor, list[int]]:
    """pack_prompts, except that with a state the prompts may all be empty (ids (B, 0): continue the state as it
    is); a mix of empty and non-empty rows is refused (their first tokens would come from different places)."""
    if state is not None:
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2 and prompts.shape[1] == 0:
            return torch.empty(prompts.shape[0], 0, dtype=torch.long, device=device), [0] * prompts.shape[0]
        if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)) and prompts:
            sizes = [len(r) if not isinstance(r, torch.Tensor) else r.numel() for r in prompts]
            if all(n == 0 for n in sizes):
                return torch.empty(len(prompts), 0, dtype=torch.long, device=device), [0] * len(prompts)
            if any(n == 0 for n in sizes):
                raise ValueError("generate: with a state, give every row a prompt to read after it, or none at all")
    return pack_prompts(prompts, model.config.padded_vocab_size, device)


def _end_of_row(row: list[int], eos: set[int], stop_step: int | None) -> int:
    """Length of a row's output: through its first EOS or the token that completed a stop string."""
    end = len(row) if stop_step is None else stop_step + 1
    for i, t in enumerate(row[:end]):
        if t in eos:
            return i + 1
    return end


def generate(model: nn.Module, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
             decode: Callable[[list[int]], str] | None = None, seed: int | None = None,
             cuda_graph: bool | CUDAGraphDecoder = False,
             prefill_tokens_per_call: int | None = DEFAULT_TOKENS_PER_CALL, state_dtype: torch.dtype | None = None,
             return_logprobs: bool = False, compile: bool = False, state: SavedState | None = None,
             prefill_chunk_size=DEPRECATED) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Generate up to max_new_tokens new tokens per prompt; returns each row's new tokens (and their log-probs).

    Args:
        prompts: B token-id lists (lengths may differ) or a (B, L) integer tensor.
        temperature: 0 for greedy, else the softmax temperature.
        top_k, top_p, min_p: filters of the distribution (see `logits_to_probs`).
        repetition_penalty: > 1 discourages tokens already in the prompt or the output.
        eos_token_id: an id or ids that end a row; the row's output includes it.
        stop_strings: strings that end a row once its new text contains one (needs `decode`); the row's
            output ends with the token that completed the string.
        decode: token ids -> text, e.g. `tokenizer.decode` (only for stop_strings).
        seed: seeds the sampler's generator, for reproducible sampling.
        cuda_graph: True to replay the decode step from a CUDA graph (CUDA models; eager elsewhere), or a
            `CUDAGraphDecoder` of this model and batch size to reuse one captured earlier. A model with
            attention layers then decodes from KV caches of a fixed capacity, the longest prompt plus
            max_new_tokens (`KVState.fix_capacity`).
        compile: True to decode with the step compiled by torch.compile (`CompiledDecoder`: CPU models without
            attention layers; about 1.4x faster at the 130M shape after a compile of seconds to a minute).
        prefill_tokens_per_call: tokens per row per prefill call (None: whole prompts); bounds
            prefill memory. Its former name `prefill_chunk_size` still works, with a DeprecationWarning.
        state_dtype: the SSM states' dtype in the cache (None: float32); torch.bfloat16 halves the state
            traffic of large-batch decoding (see `allocate_cache`).
        return_logprobs: also return, for every new token, its log-probability under the model's distribution
            (log-softmax of the logits over the real vocabulary, before repetition penalty, temperature and
            filters: what `mambakit.evaluation.score` gives for the same tokens).
        state: a saved state (`mambakit.generation.load_state`) the prompts continue: every row reads its prompt
            after the state's text (a state of one row is every row's); empty prompts continue it as it is. Mamba
            models only; the state is copied, so it can be used again. The repetition penalty sees the prompts,
            not the state's text.
    Returns:
        B lists of new token ids, each ending at its EOS or stop string, or max_new_tokens long; with
        return_logprobs, (those lists, B lists of float log-probabilities of the same lengths).

    Example:
        >>> new = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=0)
        >>> text = generate(model, [tok.encode("Q:")], 200, stop_strings=["\\n\\n"], decode=tok.decode)
        >>> new, logprobs = generate(model, [[1, 2, 3]], 20, return_logprobs=True)
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, seed)
    stopper = StopStrings(stop_strings, decode) if stop_strings is not None else None
    tokens_per_call = resolve_tokens_per_call("generate", prefill_tokens_per_call, prefill_chunk_size,
                                              name="prefill_tokens_per_call", old_name="prefill_chunk_size")
    _check_max_new_tokens(max_new_tokens)
    _check_prompts(prompts)
    _check_compile(compile)
    device = model_device(model)
    ids_BL, lengths = _pack_continuations(prompts, model, device, state)
    batch = ids_BL.shape[0]
    eos = set(params.eos_ids)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    eos_B = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens_BT = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    rows: list[list[int]] = [[] for _ in range(batch)]  # host copies of the new tokens, kept for stop strings
    stop_step: list[int | None] = [None] * batch
    n_steps = 0
    logprobs_T: list[torch.Tensor] | None = [] if return_logprobs else None
    loop = _token_loop(model, ids_BL, lengths, max_new_tokens, params, cuda_graph, tokens_per_call, state_dtype,
                       logprobs_T, compile, state)
    for step, tokens_B in enumerate(loop):
        tokens_BT[:, step] = tokens_B
        n_steps = step + 1
        if eos:
            eos_B |= torch.isin(tokens_B, eos_ids)
        if stopper is not None:
            for i, t in enumerate(tokens_B.tolist()):
                if stop_step[i] is None:
                    rows[i].append(t)
                    if stopper.hit(rows[i]):
                        stop_step[i] = step
            finished = eos_B.tolist() if eos else [False] * len(rows)
            if all(f or s is not None for f, s in zip(finished, stop_step)):
                break
        elif eos and n_steps % _SYNC_EVERY == 0 and bool(eos_B.all()):
            break
    out = tokens_BT[:, :n_steps].tolist()
    rows_out = [row[:_end_of_row(row, eos, s)] for row, s in zip(out, stop_step)]
    if not return_logprobs:
        return rows_out
    if not logprobs_T:
        return rows_out, [[] for _ in rows_out]
    logprobs = torch.stack(logprobs_T[:n_steps], dim=1).tolist()  # (B, steps): one host read at the end
    return rows_out, [lp[:len(row)] for lp, row in zip(logprobs, rows_out)]


def stream(model: nn.Module, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
           eos_token_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
           decode: Callable[[list[int]], str] | None = None, seed: int | None = None,
           cuda_graph: bool | CUDAGraphDecoder = False,
           prefill_tokens_per_call: int | None = DEFAULT_TOKENS_PER_CALL, state_dtype: torch.dtype | None = None,
           compile: bool = False, state: SavedState | None = None, prefill_chunk_size=DEPRECATED) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are made; the same arguments and tokens as `generate`.

    prompt: a list of token ids, or a (L,) / (1, L) integer tensor. The iterator ends after max_new_tokens
    tokens, after an EOS token or after the token that completes a stop string (each yielded).

    Example:
        >>> for token in stream(model, tokenizer.encode("To be"), 100, temperature=0.7, seed=1):
        ...     print(tokenizer.decode([token]), end="", flush=True)
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, seed)
    stopper = StopStrings(stop_strings, decode) if stop_strings is not None else None
    tokens_per_call = resolve_tokens_per_call("stream", prefill_tokens_per_call, prefill_chunk_size,
                                              name="prefill_tokens_per_call", old_name="prefill_chunk_size")
    _check_max_new_tokens(max_new_tokens)
    _check_compile(compile)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() not in (1, 2) or (prompt.dim() == 2 and prompt.shape[0] != 1):
            raise ValueError(f"stream: a prompt tensor must be (seqlen,) or (1, seqlen), got {tuple(prompt.shape)}")
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"stream: prompt token ids must be integers, got a {prompt.dtype} tensor")
        prompt = prompt.reshape(1, -1)
    else:
        _check_id_row(prompt, "stream: prompt (one prompt: a flat list of token ids; for a batch use generate)")
        prompt = [list(prompt)]
    if state is not None and state.batch_size != 1:
        raise ValueError(f"stream: the state holds {state.batch_size} rows; stream continues one (use generate)")
    ids_BL, lengths = _pack_continuations(prompt, model, model_device(model), state)
    # validated above, before the first token is asked for; the loop itself is a generator
    return _stream_tokens(_token_loop(model, ids_BL, lengths, max_new_tokens, params, cuda_graph, tokens_per_call,
                                      state_dtype, compile=compile, state=state),
                          set(params.eos_ids), stopper)


def _stream_tokens(loop: Iterator[torch.Tensor], eos: set[int], stopper: StopStrings | None) -> Iterator[int]:
    row: list[int] = []
    for tokens_B in loop:
        token = int(tokens_B[0])
        yield token
        row.append(token)
        if token in eos or (stopper is not None and stopper.hit(row)):
            return
