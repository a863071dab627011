"""A sequence's text as its tokens arrive: incremental detokenization and OpenAI stop sequences.

Token ids do not map to text one by one (a byte-level token can hold part of a character), so text is
released only once it is settled: a byte tokenizer goes through a UTF-8 incremental decoder; another
tokenizer decodes a short window of recent ids and releases text that no longer ends in U+FFFD.
Stop sequences follow OpenAI's rule: generation ends at the first occurrence, and the stop text is not
part of the output; text that could still be the start of a stop sequence is held back, so a streamed
response never sends what the final text does not contain.
"""

from __future__ import annotations

import codecs

from ..data import ByteTokenizer
from ..generation import StopTextFilter


class _ByteDecoder:
    """UTF-8 bytes -> text for the byte tokenizer: a character split over tokens is released once complete."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(bytes((token_id,)))

    def push_many(self, token_ids: list[int]) -> str:
        return self.decoder.decode(bytes(token_ids))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class _WindowDecoder:
    """Incremental decode for byte-level BPE tokenizers: O(window) per token instead of the whole output."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded into text already sent
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # half a character: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def push_many(self, token_ids: list[int]) -> str:
        """The text of several tokens with two decodes in all (`push` costs two per token)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:] + token_ids)
        if after.endswith("\ufffd") or len(after) <= len(before):
            # the block ends inside a character: token by token, so that the text before it still goes now
            return "".join(self.push(t) for t in token_ids)
        self.ids += token_ids
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class TextStream:
    """The text of one sequence's new tokens, with stop sequences applied.

    Example:
        >>> text = TextStream(ByteTokenizer(), stops=["\\n\\n"])
        >>> text.push(104)          # -> (delta text safe to send, whether a stop sequence ended the sequence)
    """

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self.decoder = _ByteDecoder() if isinstance(tokenizer, ByteTokenizer) else _WindowDecoder(tokenizer)
        # what may be sent, holding back a tail that could begin a stop sequence (as `mambakit generate` prints)
        self.filter = StopTextFilter(stops or [])
        self.stops = self.filter.stops
        # what was sent (a list: appending to one string of the whole output would copy it at every token)
        self.sent: list[str] = []

    @property
    def text(self) -> str:
        """The sequence's text so far (cut before a stop sequence that ended it), held-back part included."""
        return "".join(self.sent) + self.filter.pending

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text to send now, True if a stop sequence now ends the sequence)."""
        delta = self.filter.push(self.decoder.push(token_id))
        self.sent.append(delta)
        return delta, self.filter.stopped

    def push_many(self, token_ids: list[int]) -> str:
        """Add several tokens when there are no stop sequences (nothing to search for, nothing held back):
        the text to send now, the same as the texts of `push` for each token joined."""
        if self.stops:
            raise ValueError(f"TextStream.push_many: only without stop sequences, this stream has {self.stops!r}")
        delta = self.decoder.push_many(token_ids)
        self.sent.append(delta)
        return delta

    def finish(self) -> str:
        """The sequence ended for another reason (EOS, length): the rest of the text, held-back part included."""
        delta = self.filter.push(self.decoder.flush()) + self.filter.flush()
        self.sent.append(delta)
        return delta
