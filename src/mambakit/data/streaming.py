"""Streaming detokenization: text printed as token ids arrive, in time linear in the number of tokens.

Decoding the whole sequence again at every new token (what this module replaced) costs O(n) per token and
O(n^2) over a stream: 10,000 tokens took seconds (BENCHMARKS.md). Here each token costs O(1) amortised:

    ByteTokenizer                  Python's incremental UTF-8 decoder over the bytes
    HFTokenizer                    `tokenizers.decoders.DecodeStream`, stepped one id at a time
    any other tokenizer            a window of the last few ids (`_WindowDecoder`), the same algorithm as
      (sentencepiece, transformers)  DecodeStream's over the tokenizer's own `decode`

The window: `prefix` marks where the last emitted token's context starts, `read` where the new tokens start.
A new token decodes ids[prefix:] and emits the text beyond what ids[prefix:read] decoded to; once emitted,
the window slides (prefix = read, read = len). Decoding a token with its predecessor as context keeps what
tokenizers decide from their neighbours (sentencepiece's leading space, byte-level pieces). Text is held back
while it ends in U+FFFD, half a character split across tokens, so what has been printed never changes.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["IncrementalDecoder"]

_INCOMPLETE = "\ufffd"


class _WindowDecoder:
    """Incremental text from any `decode(ids) -> str`, decoding only the ids since the last emitted token."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context: the token emitted last
        self._read = 0  # first id whose text is not out yet

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        seen = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(seen) or text.endswith(_INCOMPLETE):
            return ""
        # drop ids no window can need again (keeps memory bounded on endless streams)
        self._ids, self._prefix, self._read = self._ids[self._read:], 0, len(self._ids) - self._read
        return text[len(seen):]

    def flush(self) -> str:
        seen = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = self._ids[-1:], 0, min(1, len(self._ids))
        return text[len(seen):]


class _DecodeStream:
    """`tokenizers.decoders.DecodeStream` with a `flush` for the ids still held back at the end of a stream."""

    def __init__(self, tokenizer: HFTokenizer):
        from tokenizers.decoders import DecodeStream

        self._new_stream = lambda: DecodeStream(skip_special_tokens=False)
        self._backend = tokenizer.backend
        self._stream = self._new_stream()
        self._tokenizer = tokenizer
        self._context: list[int] = []  # the last id the stream emitted text for
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        text = self._stream.step(self._backend, int(token_id))
        if text is None:
            self._pending.append(int(token_id))
            return ""
        self._context, self._pending = [int(token_id)], []
        return text

    def flush(self) -> str:
        if not self._pending:
            return ""
        decode = self._tokenizer.decode
        before = decode(self._context)
        text = decode(self._context + self._pending)[len(before):]
        # the stream still holds those ids: start a fresh one, so that nothing is emitted twice
        self._stream, self._context, self._pending = self._new_stream(), [], []
        return text


class IncrementalDecoder:
    """Turn token ids arriving one at a time into text that can be printed as it comes, in linear time.

    Text is held back while it ends in an incomplete UTF-8 character (a byte tokenizer emits a multi-byte
    character over several tokens, byte-level BPE splits one across pieces), so what has been printed never
    has to change; `flush()` returns whatever is still held back at the end (with U+FFFD for broken bytes).

    Example:
        >>> dec = IncrementalDecoder(ByteTokenizer())
        >>> [dec.push(t) for t in "é!".encode()] + [dec.flush()]
        ['', 'é', '!', '']
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        if isinstance(tokenizer, ByteTokenizer):
            self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._impl = None
        elif isinstance(tokenizer, HFTokenizer):
            self._bytes, self._impl = None, _DecodeStream(tokenizer)
        else:
            self._bytes, self._impl = None, _WindowDecoder(tokenizer.decode)

    def push(self, token_id: int) -> str:
        """The text that token `token_id` completes ("" while a character is still incomplete)."""
        if self._bytes is not None:
            return self._bytes.decode(bytes([int(token_id)]))
        return self._impl.push(token_id)

    def flush(self) -> str:
        """The text still held back (the end of the stream)."""
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        return self._impl.flush()
