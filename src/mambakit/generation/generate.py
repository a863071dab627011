"""Prefill, decode step, and the generate / stream loops on top of the inference cache.

Shapes (legend): B batch, L prompt length, V padded vocab.

    cache, logits = prefill(model, prompts)        # per-row prompts of any lengths -> last logits (B, V)
    logits = decode_one_token(model, tokens, cache)  # tokens (B,) -> (B, V), constant cost per token
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .cache import InferenceCache, allocate_cache
from .sampling import apply_repetition_penalty, greedy, logits_to_probs, sample


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
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"generate: {name} must be {need}, got {getattr(self, name)!r}")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point():
            raise ValueError(f"generate: a prompt tensor must be integer (batch, seqlen), got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        return prompts.tolist()
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token-id lists")
    return rows


@torch.inference_mode()
def prefill(model: nn.Module, prompts, cache: InferenceCache | None = None) -> tuple[InferenceCache, torch.Tensor]:
    """Run the prompts through the model into a fresh (or given, zeroed) cache; return it and the last logits (B, V).

    Rows of different lengths never see padding: rows of equal length are prefilled together into a
    sub-cache whose final states are copied into their rows of the batch cache.
    """
    rows = _as_rows(prompts)
    vocab = model.config.padded_vocab_size
    if any(t < 0 or t >= vocab for r in rows for t in r):
        raise ValueError(f"generate: prompt token ids must lie in [0, {vocab})")
    device = _model_device(model)
    cache = cache or allocate_cache(model, len(rows))
    last = torch.empty(len(rows), vocab, device=device, dtype=torch.float32)
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    for length, idx in by_length.items():
        ids = torch.tensor([rows[i] for i in idx], device=device)
        if len(by_length) == 1:
            last[:] = model(ids, cache=cache, logits_to_keep=1)[:, -1].float()
            return cache, last
        sub = allocate_cache(model, len(idx))
        last[idx] = model(ids, cache=sub, logits_to_keep=1)[:, -1].float()
        index = torch.tensor(idx, device=device)
        for dst, src in zip(cache.layers, sub.layers):
            dst.conv_state.index_copy_(0, index, src.conv_state)
            dst.ssm_state.index_copy_(0, index, src.ssm_state)
    cache.seqlen_offset = max(len(r) for r in rows)
    return cache, last


@torch.inference_mode()
def decode_one_token(model: nn.Module, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """tokens (B,) -> next-token logits (B, V) float32, advancing the cache by one token."""
    return model(tokens[:, None], cache=cache)[:, -1].float()


def _token_loop(model: nn.Module, rows: list[list[int]], max_new_tokens: int,
                params: SamplingParams) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), for up to max_new_tokens steps (stops when all rows hit EOS)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return
    device = _model_device(model)
    vocab, real_vocab = model.config.padded_vocab_size, model.config.vocab_size
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    cache, logits = prefill(model, rows)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, r] = True
    eos = torch.tensor(params.eos_ids, device=device, dtype=torch.long)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        with torch.inference_mode():
            logits[:, real_vocab:] = float("-inf")  # padded vocab rows are never sampled
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
            if params.temperature == 0.0:
                tokens = greedy(logits)
            else:
                probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
                tokens = sample(probs, generator)
        yield tokens
        if eos.numel():
            done |= torch.isin(tokens, eos)
            if bool(done.all()):
                return
        if seen is not None:
            seen[torch.arange(len(rows), device=device), tokens] = True
        if step + 1 < max_new_tokens:
            logits = decode_one_token(model, tokens, cache)


def generate(model: nn.Module, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None) -> list[list[int]]:
    """Generate up to max_new_tokens new tokens per prompt; returns each row's new tokens (through its EOS).

    Args:
        prompts: list of token-id lists (lengths may differ) or a (batch, seqlen) integer tensor.
        temperature: 0 for greedy, else softmax temperature.   top_k / top_p / min_p: filters.
        repetition_penalty: > 1 discourages tokens already in the prompt or output.
        eos_token_id: id or ids that end a row (included in its output).   seed: for reproducible sampling.

    Example:
        >>> new = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20, temperature=0.8, top_p=0.9, seed=0)
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, seed)
    rows = _as_rows(prompts)
    out: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    eos = set(params.eos_ids)
    for tokens in _token_loop(model, rows, max_new_tokens, params):
        for i, t in enumerate(tokens.tolist()):
            if not finished[i]:
                out[i].append(t)
                finished[i] = t in eos
    return out


def stream(model: nn.Module, prompt, max_new_tokens: int, **kwargs) -> Iterator[int]:
    """Yield the new tokens of one prompt (a list of ids or a (seqlen,) / (1, seqlen) tensor) as they are made.

    Takes the same keyword arguments as `generate` and yields exactly the tokens it would return.

    Example:
        >>> for token in stream(model, tokenizer.encode("To be"), 100, temperature=0.7, seed=1):
        ...     print(tokenizer.decode([token]), end="", flush=True)
    """
    params = SamplingParams(**kwargs)
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    rows = _as_rows([prompt])
    eos = set(params.eos_ids)
    for tokens in _token_loop(model, rows, max_new_tokens, params):
        t = int(tokens[0])
        yield t
        if t in eos:
            return
