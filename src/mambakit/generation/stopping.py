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
