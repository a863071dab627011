"""Declarative state-dict key maps between mambakit's names and a checkpoint format's names.

A `KeyMap` is an ordered list of `(ours, theirs)` name patterns. `{i}` in a pattern matches a layer
index (digits); any other `{name}` matches a dotted parameter path (e.g. `mixer.in_proj.weight`).
Reading a checkpoint maps each of its names through the first rule whose `theirs` pattern matches;
writing maps each of mambakit's names through the first rule whose `ours` pattern matches, so a rule
listed later for the same `ours` pattern is an alias accepted on read only (an older spelling).

    >>> km = KeyMap([("backbone.embedding.weight", "backbone.embeddings.weight")])
    >>> km.to_ours("backbone.embeddings.weight"), km.to_theirs("backbone.embedding.weight")
    ('backbone.embedding.weight', 'backbone.embeddings.weight')
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["KeyMap", "IDENTITY"]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        parts.append(rf"(?P<{name}>\d+)" if name == "i" else rf"(?P<{name}>[\w.]+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts) + r"\Z")


class KeyMap:
    """Rename state-dict keys between mambakit (`ours`) and a checkpoint format (`theirs`).

    Args:
        rules: `(ours, theirs)` pattern pairs, tried in order; both sides of a pair use the same placeholders.
    """

    def __init__(self, rules: Sequence[tuple[str, str]]):
        self.rules = tuple(rules)
        for ours, theirs in self.rules:
            if set(_PLACEHOLDER.findall(ours)) != set(_PLACEHOLDER.findall(theirs)):
                raise ValueError(f"KeyMap: rule ({ours!r}, {theirs!r}) uses different placeholders on each side")
        self._compiled = [(_compile(o), _compile(t), o, t) for o, t in self.rules]

    def to_ours(self, name: str) -> str | None:
        """mambakit's name for a checkpoint key, or None when no rule covers it."""
        for _, theirs_re, ours, _ in self._compiled:
            m = theirs_re.match(name)
            if m:
                return ours.format(**m.groupdict())
        return None

    def to_theirs(self, name: str) -> str | None:
        """The checkpoint format's name for one of mambakit's keys, or None when no rule covers it."""
        for ours_re, _, _, theirs in self._compiled:
            m = ours_re.match(name)
            if m:
                return theirs.format(**m.groupdict())
        return None


IDENTITY = KeyMap([("{name}", "{name}")])
