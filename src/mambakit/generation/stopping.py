"""Stop strings: end a row when the text of its new tokens contains one of a few strings.

Token ids do not map to text piecewise (a byte-level BPE token can hold half a character), so the
check decodes the row's last tokens as a whole. A match that ends before the newest token was found
one step earlier, so only the window of the last `4 * longest + 8` tokens needs decoding: a
character spans at most 4 byte-level tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopStrings:
    """stops: the strings; decode: token ids -> text (e.g. `tokenizer.decode`).

    Example:
        >>> stop = StopStrings(["\\n\\n"], tokenizer.decode)
        >>> stop.hit(row_tokens)        # True once the text of row_tokens contains a stop string
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str] | None):
        if isinstance(stops, str):
            stops = [stops]
        stops = list(stops)
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"generate: stop_strings must be a non-empty list of non-empty strings, got {stops!r}")
        if decode is None or not callable(decode):
            raise ValueError("generate: stop_strings needs decode= (a function from token ids to text, "
                             "e.g. tokenizer.decode)")
        self.stops = stops
        self.decode = decode
        self.window = 4 * max(len(s) for s in stops) + 8

    def hit(self, tokens: list[int]) -> bool:
        """Whether the text of `tokens` (a row's new tokens so far) contains a stop string ending in its tail."""
        text = self.decode(tokens[-self.window:])
        return any(s in text for s in self.stops)


class StopTextFilter:
    """Streamed text with the stop strings cut: what may be shown now, holding back a tail that could still
    become a stop string, and nothing from the first stop string on (as OpenAI's `stop` reads).

    Example:
        >>> f = StopTextFilter(["<|end|>"])
        >>> f.push("42<|e"), f.push("nd|>\\n"), f.stopped
        ('42', '', True)
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to show (none once a stop string has been seen)."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        # hold back the longest tail that is the start of a stop string
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if s.startswith(self.pending[-k:])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        """What was held back, at the end of the stream (no stop string completed it)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
