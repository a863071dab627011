"""Held-out loss in nats per token and bits per byte, the tokenizer-independent measure of a language model.

Shapes:
    batch, seqlen   windows of the held-out stream (see `mambakit.data.eval_windows`)
    vocab           the tokenizer's vocabulary; the model's logits may be padded past it

bits per byte = (sum over scored targets of -ln p(target)) / (ln 2 * bytes of text those targets stand for)

- Byte tokenizer: one token is one byte, so bits/byte = (nats per token) / ln 2.
- Other tokenizers: the bytes are `tokenizer.count_bytes(targets)`: the UTF-8 length of the
  decoded text of the scored targets (a contiguous run of the stream, decoded whole), each
  end-of-document token counted as one byte, as the byte tokenizer's separator is.
Logits past the tokenizer's vocabulary (padding to a multiple of 8) are dropped before the
softmax: they are not tokens, and probability on them would be charged to the model.

Documents are handled as in training (mambakit.data.packing): with `reset_at_eos` (the default) the
state restarts at every end-of-document token inside a window, so no document is read in the context
of the one before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.conversations import conversation_spans, conversation_windows
from ..data.packing import seq_idx_from_eos, split_window
from ..data.stream import TokenStream, eval_target_count, eval_windows, segment_windows

__all__ = ["Evaluation", "evaluate_stream", "evaluate_bits_per_byte", "token_nll_sum"]


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sum of -ln p(target) over all positions, in float32 (logits (batch, seqlen, >= vocab), targets (batch, seqlen))."""
    logits = logits[..., :vocab_size].float()  # (batch, seqlen, vocab); fp32 softmax even under autocast
    return F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), reduction="sum")


@dataclass(frozen=True)
class Evaluation:
    """What scoring a stream measured: nats per token, bits per byte, per-token perplexity and the counts."""

    loss: float  # mean -ln p(target) in nats per token
    bits_per_byte: float
    tokens: int  # targets scored
    bytes: int  # bytes of text they stand for (each end-of-document token: 1)

    @property
    def perplexity(self) -> float:
        """exp(loss): per token, so it depends on the tokenizer (bits per byte does not)."""
        return math.exp(self.loss)


def _boundaries_or_none(seq_idx: torch.Tensor) -> torch.Tensor | None:
    """seq_idx (b, L), or None when no row holds a document boundary (each row's first and last index agree):
    the same outputs, by a model's fastest path. S4D, for one, turns from an FFT convolution into a scan when it
    is given seq_idx; a held-out genome of a few records has a boundary in one batch of hundreds."""
    return seq_idx if bool((seq_idx[:, -1] != seq_idx[:, 0]).any()) else None


def _score_segments(model: torch.nn.Module, stream: TokenStream, seqlen: int, batch_size: int, max_tokens: int | None,
                    autocast_dtype, rank: int, world_size: int, eos_id: int | None, total: torch.Tensor, bar) -> None:
    """evaluate_stream's carry_state loop: adds the summed -ln p of this rank's segments to `total` (float64)."""
    device = total.device
    cache = None
    for inputs, targets in segment_windows(stream, seqlen, batch_size, max_tokens, rank=rank, world_size=world_size):
        bar.update(int((targets != -100).sum()) * world_size)  # counted on the host, before the copy
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)  # (b, l)
        if cache is None:
            cache = model.allocate_cache(inputs.shape[0])
        seq_idx = None
        if eos_id is not None:
            seq_idx = _boundaries_or_none(seq_idx_from_eos(inputs, eos_id))
            # a document that starts at a window's first token: its seq_idx cannot say so (it is the window's
            # first), so the rows' carried states are cleared instead
            starts = inputs[:, 0] == eos_id
            for layer in cache.layers:
                layer.zero_rows_(starts)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs, cache=cache, seq_idx=seq_idx)  # (b, l, padded vocab)
        total += token_nll_sum(logits, targets, stream.tokenizer.vocab_size).double()


def evaluate_bits_per_byte(model: torch.nn.Module, stream: TokenStream, seqlen: int, batch_size: int,
                           max_tokens: int | None = None, *, autocast_dtype: torch.dtype | None = None,
                           rank: int = 0, world_size: int = 1, reset_at_eos: bool = True,
                           progress: bool = False, carry_state: bool = False) -> tuple[float, float]:
    """(loss in nats per token, bits per byte) of the first `max_tokens` targets of `stream`: `evaluate_stream`'s
    two main numbers, with the same arguments.

    Example:
        >>> nats, bpb = evaluate_bits_per_byte(model, val_stream, seqlen=256, batch_size=16, max_tokens=65536)
    """
    result = evaluate_stream(model, stream, seqlen, batch_size, max_tokens, autocast_dtype=autocast_dtype, rank=rank,
                             world_size=world_size, reset_at_eos=reset_at_eos, progress=progress,
                             carry_state=carry_state)
    return result.loss, result.bits_per_byte


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, stream: TokenStream, seqlen: int, batch_size: int,
                    max_tokens: int | None = None, *, autocast_dtype: torch.dtype | None = None,
                    rank: int = 0, world_size: int = 1, reset_at_eos: bool = True,
                    progress: bool = False, carry_state: bool = False) -> Evaluation:
    """Score the first `max_tokens` targets of `stream` (all when None): loss, bits per byte, tokens and bytes.

    The targets are covered once, in order, by non-overlapping windows of `seqlen` that each start
    from an empty state (`eval_windows`) and, with `reset_at_eos`, restart it at every document
    boundary inside them, as training does. Under torch.distributed (world_size > 1) each rank
    scores its share of the windows and the sums are all-reduced; every rank gets the result.

    With `carry_state` the windows do not start empty: each batch row reads one contiguous segment of the
    stream (`segment_windows`) and its recurrent state (an `allocate_cache` cache: a Mamba state, or a KV cache
    that grows over the segment) goes on from one window to the next, so a document longer than a window is
    scored as a whole, as lm-eval's loglikelihood_rolling reads it; with `reset_at_eos` the state still restarts
    at each document. The model must take `cache=` (and `seq_idx=`) as MambaLM does.

    Args:
        model: maps (batch, seqlen) int64 ids to (batch, seqlen, >= vocab) logits.
        stream: the held-out stream, with the tokenizer that made it (for vocab size and byte counts).
        autocast_dtype: e.g. torch.bfloat16 to run the forward under CUDA autocast.
        reset_at_eos: restart the state at each end-of-document token (passes `seq_idx` to the model, which
            must take it); ignored when the tokenizer has no end-of-document token.
        progress: a tqdm bar over the scored tokens (rank 0 only).

    Example:
        >>> result = evaluate_stream(model, val_stream, seqlen=256, batch_size=16, progress=True)
        >>> result.bits_per_byte, result.perplexity, result.tokens
    """
    n_targets = eval_target_count(stream, max_tokens)
    if n_targets == 0:
        raise ValueError(f"nothing to evaluate: the stream has {len(stream)} tokens")
    scored = getattr(stream, "scored", None)  # (ntokens,) bool: only these targets count (conversations)
    if scored is not None and carry_state:
        raise ValueError("carry_state reads a stream of documents; a stream with a scored mask (conversations) is "
                         "scored window by window")
    spans = None
    if scored is not None:  # conversations: whole ones are read, only their assistant targets count
        spans = conversation_spans(stream, max_tokens)
        n_read = spans[-1][1] - 1
        n_targets = int(scored[1:n_read + 1].sum())
        if n_targets == 0:
            raise ValueError("nothing to evaluate: the held-out conversations read have no assistant tokens")
    device = next(model.parameters()).device
    vocab_size = stream.tokenizer.vocab_size
    was_training = model.training
    model.eval()
    eos_id = stream.tokenizer.eos_id if reset_at_eos else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=n_targets, unit="tok", unit_scale=True, desc="eval", dynamic_ncols=True, leave=False,
               disable=not (progress and rank == 0))
    if carry_state:
        _score_segments(model, stream, seqlen, batch_size, max_tokens, autocast_dtype, rank, world_size, eos_id,
                        total, bar)
    else:
        if scored is None:
            windows = ((w, None, None) for w in eval_windows(stream, seqlen, batch_size, max_tokens, rank=rank,
                                                             world_size=world_size))
        else:  # conversations: a row per conversation, from its start (data.conversation_windows)
            windows = conversation_windows(stream, seqlen, batch_size, max_tokens, rank=rank, world_size=world_size,
                                           spans=spans)
        for window, mask, starts in windows:
            window = window.to(device, non_blocking=True)  # (b, L + 1)
            # the other ranks score about as many targets meanwhile
            bar.update((window[:, 1:].numel() if mask is None else int(mask[:, 1:].sum())) * world_size)
            if mask is not None:
                mask, starts = mask.to(device, non_blocking=True), starts.to(device, non_blocking=True)
            inputs, targets, seq_idx = split_window(window, eos_id, mask, starts)  # (b, L) each
            seq_idx = None if seq_idx is None else _boundaries_or_none(seq_idx)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(inputs) if seq_idx is None else model(inputs, seq_idx=seq_idx)  # (b, L, padded vocab)
            # accumulate in float64: half a million tokens of ~1 nat each lose digits in float32
            total += token_nll_sum(logits, targets, vocab_size).double()
    bar.close()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train(was_training)
    nats = float(total)
    if scored is None:
        n_bytes = stream.tokenizer.count_bytes(stream.tokens[1:n_targets + 1].tolist())
    else:  # the scored targets of the conversations read (whole ones), each run of them decoded whole
        n_bytes = _scored_bytes(stream, n_read)
    return Evaluation(nats / n_targets, nats / (math.log(2) * n_bytes), n_targets, n_bytes)


def _scored_bytes(stream: TokenStream, n_targets: int) -> int:
    """Bytes of text of the scored targets among targets 1..n_targets, each run of consecutive ones decoded whole."""
    mask = stream.scored[1:n_targets + 1].tolist()
    tokens = stream.tokens[1:n_targets + 1].tolist()
    total, start = 0, None
    for i, on in enumerate(mask + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            total += stream.tokenizer.count_bytes(tokens[start:i])
            start = None
    return total
