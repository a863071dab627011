"""Prefill and the decode step: the two model calls of generation, around an `InferenceCache`.

Shapes (legend): B batch, L the longest prompt's length, V padded vocab, K tokens per row per model call.

    cache, logits = prefill(model, prompts)               # prompts of any lengths -> last logits (B, V)
    cache, logits = prefill(model, more_ids, cache)       # continue the cached rows with more tokens
    logits = decode_one_token(model, tokens, cache)       # tokens (B,) -> (B, V), constant cost per token

A ragged batch is one model call per K tokens, never padding leaking into the state: the rows are
right-aligned (left padding) and `seq_idx` marks padding 0 and prompt 1, so every mixer restarts its
conv window and SSM state from zero at a row's first real token; its final state is then its own.
A call after which a row is still all padding leaves that row's state zeroed, so a row whose prompt
starts exactly at a call boundary also starts from zero. Long prompts go through K tokens per row per
call (`tokens_per_call`): the memory of a prefill is that of K tokens whatever the prompt's length.
("Chunk" is kept for the SSD's block; `chunk_size`, this argument's former name, still works with a
DeprecationWarning.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..deprecation import DEPRECATED, renamed_argument
from .cache import InferenceCache, allocate_cache

_PAD_ID = 0  # any valid id: padded positions are cut off from the state by seq_idx
DEFAULT_TOKENS_PER_CALL = 2048


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pack_prompts(prompts, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Prompts -> (ids (B, L) int64 on `device`, each row right-aligned after left padding; lengths per row).

    prompts: a (B, L) integer tensor, or a non-empty list of non-empty token-id lists (lengths may differ).
    Raises ValueError for an empty prompt, a non-integer tensor or an id outside [0, vocab_size).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise ValueError(f"generate: a prompt tensor must be integer (batch, seqlen), got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        if prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"generate: prompts must be non-empty, got shape {tuple(prompts.shape)}")
        ids = prompts.to(device=device, dtype=torch.long)
        if bool((ids.min() < 0) | (ids.max() >= vocab_size)):
            raise ValueError(f"generate: prompt token ids must lie in [0, {vocab_size})")
        return ids, [ids.shape[1]] * ids.shape[0]
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"generate: prompts must be a list of token-id lists or a (batch, seqlen) tensor, "
                         f"got {type(prompts).__name__}")
    rows = [r.reshape(-1).tolist() if isinstance(r, torch.Tensor) else list(r) for r in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token-id lists")
    lengths = [len(r) for r in rows]
    longest = max(lengths)
    try:
        ids = torch.tensor([[_PAD_ID] * (longest - len(r)) + r for r in rows], dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"generate: prompt token ids must be integers ({err})") from None
    if bool((ids.min() < 0) | (ids.max() >= vocab_size)):
        raise ValueError(f"generate: prompt token ids must lie in [0, {vocab_size})")
    return ids.to(device), lengths


def resolve_tokens_per_call(where: str, value: int | None, old_value=DEPRECATED, *, name: str = "tokens_per_call",
                            old_name: str = "chunk_size") -> int | None:
    """Tokens per row per prefill call: `value`, or `old_value` given under the former name (with a
    DeprecationWarning, pointed at the caller of `where`) while `value` is the default DEFAULT_TOKENS_PER_CALL.
    ValueError unless a positive int or None."""
    value = renamed_argument(where, old_name, name, old_value, value, unset=DEPRECATED,
                             new_default=DEFAULT_TOKENS_PER_CALL, stacklevel=4)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{where}: {name} must be a positive int or None, got {value!r}")
    return value


def _zero_rows(cache: InferenceCache, rows_B: torch.Tensor) -> None:
    """Zero the states of the rows where rows_B (B,) bool is True (in place: the tensors keep their addresses)."""
    for state in cache.layers:
        state.zero_rows_(rows_B)


def _run_calls(model: nn.Module, ids_BL: torch.Tensor, cache: InferenceCache, tokens_per_call: int | None,
               pads: list[int] | None = None) -> torch.Tensor:
    """Feed ids (B, L) through the model K tokens per call; return the last position's logits (B, V) float32.

    pads: left-padding length per row (None: no padding). Calls that reach into some row's padding carry
    seq_idx (0 on padding, 1 on the prompt); after such a call, rows still all padding are zeroed.
    """
    seqlen = ids_BL.shape[1]
    step = seqlen if tokens_per_call is None else tokens_per_call
    pads_B = seq_idx_BL = None
    max_pad = 0
    if pads is not None and max(pads) > 0:
        max_pad = max(pads)
        pads_B = torch.tensor(pads, device=ids_BL.device)
        seq_idx_BL = (torch.arange(seqlen, device=ids_BL.device)[None, :] >= pads_B[:, None]).to(torch.int32)
    logits = None
    for start in range(0, seqlen, step):
        end = min(start + step, seqlen)
        padded = start < max_pad  # some row has not started before this call
        logits = model(ids_BL[:, start:end], cache=cache, seq_idx=seq_idx_BL[:, start:end] if padded else None,
                       logits_to_keep=1)
        if padded and end < seqlen:
            _zero_rows(cache, pads_B >= end)
    return logits[:, -1].float()


@torch.inference_mode()
def prefill_packed(model: nn.Module, ids_BL: torch.Tensor, lengths: list[int], cache: InferenceCache | None = None,
                   tokens_per_call: int | None = DEFAULT_TOKENS_PER_CALL, *,
                   chunk_size=DEPRECATED) -> tuple[InferenceCache, torch.Tensor]:
    """`prefill` on prompts already packed by `pack_prompts` (right-aligned ids (B, L) and their lengths)."""
    tokens_per_call = resolve_tokens_per_call("prefill", tokens_per_call, chunk_size)
    batch, seqlen = ids_BL.shape
    if cache is None:
        cache = allocate_cache(model, batch)
    elif cache.batch_size != batch:
        raise ValueError(f"prefill: cache holds {cache.batch_size} sequences, prompts has {batch} rows")
    if cache.seqlen_offset == 0:
        cache.reset()  # an offset-0 cache holds no tokens; zeroing makes a reused cache (a CUDA graph's) fresh
    offset = cache.seqlen_offset
    if min(lengths) == seqlen:  # no padding
        logits = _run_calls(model, ids_BL, cache, tokens_per_call)
    elif offset == 0:
        logits = _run_calls(model, ids_BL, cache, tokens_per_call, pads=[seqlen - n for n in lengths])
    else:
        # continuing a ragged batch: padding must not touch the cached states at all, so rows of equal
        # length run together on a copy of their states, copied back afterwards
        logits = torch.empty(batch, model.config.padded_vocab_size, device=ids_BL.device, dtype=torch.float32)
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        for n, idx in by_length.items():
            rows = torch.tensor(idx, device=ids_BL.device)
            sub = cache.index_select(rows)
            logits[rows] = _run_calls(model, ids_BL[rows, seqlen - n:], sub, tokens_per_call)
            cache.index_copy_(rows, sub)
        cache.advance(seqlen)  # the model calls above advanced the copies, not this cache
    return cache, logits


def prefill(model: nn.Module, prompts, cache: InferenceCache | None = None, *,
            tokens_per_call: int | None = DEFAULT_TOKENS_PER_CALL,
            chunk_size=DEPRECATED) -> tuple[InferenceCache, torch.Tensor]:
    """Run prompts through the model into a cache; return the cache and each row's last logits (B, V) float32.

    Args:
        prompts: a (B, L) integer tensor, or B token-id lists of any lengths.
        cache: None (a new one), a cache with seqlen_offset 0 (zeroed, then filled: a CUDA graph's static
            cache), or a cache already holding tokens, which the prompts continue row by row.
        tokens_per_call: tokens per row per model call (None: the whole prompt at once).
            Memory is that of one call, so a 1M-token input streams through at constant memory; the result
            does not depend on it. Its former name `chunk_size` still works, with a DeprecationWarning.
    Returns:
        (cache, logits): the cache, advanced in place by the prompts, and the logits after each row's last
        prompt token, (B, V) float32.

    Example:
        >>> cache, logits = prefill(model, [[1, 2, 3], [4, 5]])
        >>> for piece in torch.split(long_ids, 65536, dim=1):     # (1, 1_000_000) in pieces, constant memory
        ...     cache, logits = prefill(model, piece, cache)
    """
    ids_BL, lengths = pack_prompts(prompts, model.config.padded_vocab_size, model_device(model))
    tokens_per_call = resolve_tokens_per_call("prefill", tokens_per_call, chunk_size)
    return prefill_packed(model, ids_BL, lengths, cache, tokens_per_call)


def one_token_logits(model: nn.Module, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """The decode step itself, outside any grad mode: what `decode_one_token` runs under inference_mode and what
    `CompiledDecoder` compiles (a compiled graph cannot take inference tensors)."""
    return model(tokens[:, None], cache=cache, logits_to_keep=1)[:, 0].float()


@torch.inference_mode()
def decode_one_token(model: nn.Module, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """tokens (B,) int64 -> next-token logits (B, V) float32, advancing the cache in place by one token.

    The hot path of generation: no validation beyond the model's own, no host synchronisation, and the
    cache tensors are updated in place (so a CUDA graph can capture this call; see `CUDAGraphDecoder`).

    Example:
        >>> logits = decode_one_token(model, logits.argmax(-1), cache)
    """
    return one_token_logits(model, tokens, cache)
