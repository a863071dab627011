"""Token streams and the windows that training and evaluation read from them.

Shapes:
    ntokens   tokens in a stream (all documents, each preceded by the end-of-document token)
    batch     windows per step (per process under torchrun)
    seqlen    tokens the model sees per window; a window holds seqlen + 1 tokens so that
              inputs = window[:, :-1] and targets = window[:, 1:]

Layout of a stream: EOD doc_1 EOD doc_2 ... EOD doc_n. The separator comes before each document,
so the model always sees a boundary before a document's first token (a prompt at generation time
is prefixed with EOD the same way), and predicting EOD at the end of a document is part of the
loss (it counts as one byte in bits per byte).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .corpora import Document
from .errors import DataError
from .tokenizers import ByteTokenizer, Tokenizer

__all__ = ["TokenStream", "RandomWindows", "eval_windows", "eval_target_count", "segment_windows"]


class TokenStream:
    """Tokenized documents concatenated into one 1-D tensor, with the tokenizer that made them.

    `tokens` is uint8 for byte-level streams (a 5 MB corpus is 5 MB in memory), int32 otherwise.

    Example:
        >>> s = TokenStream.from_documents([Document("a", "hi"), Document("b", "yo")], ByteTokenizer())
        >>> s.tokens.tolist()
        [0, 104, 105, 0, 121, 111]
    """

    def __init__(self, tokens: torch.Tensor, tokenizer: Tokenizer):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D (ntokens,), got shape {tuple(tokens.shape)}")
        self.tokens = tokens  # (ntokens,)
        self.tokenizer = tokenizer
        # A conversation set (data.conversations) adds two (ntokens,) bool masks: `scored`, whether token i is
        # scored as a target (the assistant's tokens), and `starts`, whether a conversation starts at token i (the
        # state restarts there: conversations are not separated by an end-of-document token, so each is read as
        # a chat request renders it). None for a stream of documents: every token scored, EOS separates.
        self.scored: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None

    @classmethod
    def from_documents(cls, docs: list[Document], tokenizer: Tokenizer) -> TokenStream:
        eos = tokenizer.eos_id
        if isinstance(tokenizer, ByteTokenizer):
            # One bytes object and a zero-copy view: avoids a Python int per byte.
            sep = bytes([eos])
            data = bytearray(b"".join(sep + d.text.encode("utf-8") for d in docs))
            return cls(torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8), tokenizer)
        texts = [d.text for d in docs]
        encoded = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(t) for t in texts]
        ids: list[int] = []
        for doc_ids in encoded:
            if eos is not None:
                ids.append(eos)
            ids.extend(doc_ids)
        return cls(torch.tensor(ids, dtype=torch.int32), tokenizer)

    def __len__(self) -> int:
        return self.tokens.numel()

    def __repr__(self) -> str:
        return f"TokenStream(ntokens={len(self)}, tokenizer={self.tokenizer!r})"


class RandomWindows:
    """Random (batch, seqlen + 1) windows of a stream, drawn by a seeded generator.

    Every step draws `batch_size * world_size` start offsets from one generator seeded
    identically on every process; process `rank` keeps its slice. So each rank sees different
    windows, and 2 processes x batch b read exactly the windows of 1 process x batch 2b (which
    is what makes distributed runs reproducible and testable against single-process ones).
    `state_dict()` / `load_state_dict()` capture the generator for resuming.

    Example:
        >>> windows = RandomWindows(stream, seqlen=256, batch_size=16, seed=0)
        >>> windows.next_batch().shape
        torch.Size([16, 257])
    """

    def __init__(self, stream: TokenStream, seqlen: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(stream) < seqlen + 1:
            raise DataError(f"the training stream has {len(stream)} tokens, fewer than seqlen + 1 = {seqlen + 1}: use a shorter --seqlen or more data")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.stream, self.seqlen, self.batch_size = stream, seqlen, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._arange = torch.arange(seqlen + 1)  # (seqlen + 1,)
        # a conversation stream: windows start at conversation starts (see _conversation_batch)
        self._conversations = None if stream.starts is None else torch.nonzero(stream.starts).flatten()

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seqlen + 1) int64 windows of this rank (on CPU)."""
        return self.next_batch_masked()[0]

    def next_batch_masked(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The next windows (as `next_batch`) and, for a conversation stream, its `scored` and `starts` masks'
        (batch_size, seqlen + 1) bool windows at the same places (None otherwise). One draw either way: the two
        methods advance the generator alike.

        A conversation stream's windows each start at a random conversation's first token (never inside one: an
        assistant's token is always read after its whole conversation so far, as in a chat request); a
        conversation longer than the window is trained on its first seqlen + 1 tokens only."""
        s = self.stream
        if self._conversations is not None:
            return self._conversation_batch()
        n_starts = len(s) - self.seqlen  # valid starts: 0 .. ntokens - (seqlen + 1)
        starts = torch.randint(0, n_starts, (self.world_size * self.batch_size,), generator=self.generator)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # (batch,)
        index = starts[:, None] + self._arange  # (batch, seqlen + 1)
        return s.tokens[index].long(), None, None

    def _conversation_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows that start where a conversation starts (a random one each), so no scored token loses its
        context: a window holds that conversation and those after it, cut at seqlen + 1 tokens, padded (token 0,
        not scored, its own segment) past the stream's end."""
        s, n = self.stream, len(self.stream)
        pick = torch.randint(0, len(self._conversations), (self.world_size * self.batch_size,),
                             generator=self.generator)
        starts = self._conversations[pick[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]]
        index = starts[:, None] + self._arange  # (batch, seqlen + 1)
        inside = index < n
        index = index.clamp(max=n - 1)
        tokens = torch.where(inside, s.tokens[index].long(), 0)
        first_pad = inside & ~torch.cat([inside[:, 1:], torch.zeros_like(inside[:, :1])], dim=1)
        starts_mask = s.starts[index] & inside
        starts_mask[:, 1:] |= first_pad[:, :-1]  # the padding after the end restarts the state
        return tokens, s.scored[index] & inside, starts_mask

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_target_count(stream: TokenStream, max_tokens: int | None = None) -> int:
    """How many targets `eval_windows` scores: the whole stream (ntokens - 1) or `max_tokens` of it."""
    n = max(len(stream) - 1, 0)
    return n if max_tokens is None else min(n, int(max_tokens))


def eval_windows(stream: TokenStream, seqlen: int, batch_size: int, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows that score the stream's targets 1..n exactly once, in order.

    Window i holds tokens [i * seqlen, (i + 1) * seqlen] (seqlen + 1 tokens; its targets are
    tokens i * seqlen + 1 .. (i + 1) * seqlen). Full windows come in batches of up to
    `batch_size`; a shorter last window, when the count is not a multiple of seqlen, comes
    alone as a (1, r + 1) batch. Under several processes window i belongs to rank
    i % world_size. Every window starts from an empty state, as the model does in training.

    Yields:
        int64 tensors of shape (b, seqlen + 1), b <= batch_size, and possibly one (1, r + 1).

    Example:
        >>> [w.shape for w in eval_windows(stream_of_11_tokens, seqlen=4, batch_size=8)]
        [torch.Size([2, 5]), torch.Size([1, 3])]
    """
    n = eval_target_count(stream, max_tokens)
    n_full, rest = divmod(n, seqlen)
    mine = list(range(rank, n_full, world_size))
    arange = torch.arange(seqlen + 1)
    for i in range(0, len(mine), batch_size):
        starts = torch.tensor(mine[i:i + batch_size]) * seqlen  # (b,)
        yield stream.tokens[starts[:, None] + arange].long()  # (b, seqlen + 1)
    if rest and n_full % world_size == rank:
        yield stream.tokens[n_full * seqlen:n + 1].long()[None]  # (1, rest + 1)


def segment_windows(stream: TokenStream, seqlen: int, batch_size: int, max_tokens: int | None = None,
                    rank: int = 0, world_size: int = 1,
                    ignore_index: int = -100) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows for a reader that carries each row's state from one window to the next: the targets 1..n cut into
    up to batch_size x world_size contiguous segments of equal length (the last shorter), one per row, read
    seqlen at a time in lockstep, so row r of a window continues row r of the window before. Segment j belongs
    to rank j % world_size. Every target is scored exactly once; a state starts empty only at a segment's start
    (batch_size x world_size places) instead of at every window's.

    Yields:
        (inputs, targets), int64 (b, l) each, b the rank's rows, l <= seqlen (shorter at the end); a row whose
        segment has ended holds inputs 0 and targets `ignore_index` (cross_entropy's default skips them).

    Example:
        >>> [(i.tolist(), t.tolist()) for i, t in segment_windows(stream_of_9_tokens, seqlen=2, batch_size=2)]
        [([[t0, t1], [t4, t5]], [[t1, t2], [t5, t6]]), ([[t2, t3], [t6, t7]], [[t3, t4], [t7, t8]])]
    """
    n = eval_target_count(stream, max_tokens)
    if n == 0:
        return
    rows = max(1, min(batch_size * world_size, -(-n // seqlen)))
    length = -(-n // rows)  # targets per segment
    segments = [(j * length, min((j + 1) * length, n)) for j in range(rows)][rank::world_size]
    segments = [(a, b) for a, b in segments if b > a]
    if not segments:
        return
    tokens = stream.tokens
    for start in range(0, length, seqlen):
        width = min(seqlen, length - start)
        inputs = torch.zeros(len(segments), width, dtype=torch.long)
        targets = torch.full((len(segments), width), ignore_index, dtype=torch.long)
        for row, (a, b) in enumerate(segments):
            lo, hi = a + start, min(a + start + width, b)
            if hi > lo:
                inputs[row, :hi - lo] = tokens[lo:hi]
                targets[row, :hi - lo] = tokens[lo + 1:hi + 1]
        yield inputs, targets
