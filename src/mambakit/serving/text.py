"""A sequence's text as its tokens arrive: incremental detokenization and OpenAI stop sequences.

Token ids do not map to text one by one (a byte-level token can hold part of a character), so text is
released only once it is settled: a byte tokenizer goes through a UTF-8 incremental decoder; another
tokenizer decodes a short window of recent ids and releases text that no longer ends in U+FFFD.
Stop sequences follow OpenAI's rule: generation ends at the first occurrence, and the stop text is not
part of the output; text that could still be the start of a stop sequence is held back, so a streamed
response never sends what the final text does not contain.
"""

from __future__ import annotations

from ..data import ByteTokenizer, IncrementalDecoder


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
        self.decoder = IncrementalDecoder(tokenizer) if isinstance(tokenizer, ByteTokenizer) else _WindowDecoder(tokenizer)
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def _release(self, final: bool) -> tuple[str, bool]:
        for_search = self.text[self.sent:]
        hits = [i for i in (for_search.find(s) for s in self.stops) if i >= 0]
        if hits:
            end = self.sent + min(hits)
            delta, self.text, self.sent = self.text[self.sent:end], self.text[:end], end
            return delta, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta, False

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text to send now, True if a stop sequence now ends the sequence)."""
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended for another reason (EOS, length): the rest of the text, held-back part included."""
        self.text += self.decoder.flush()
        delta, _ = self._release(final=True)
        return delta
