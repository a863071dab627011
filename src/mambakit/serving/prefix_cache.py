"""Exact prefix-state reuse: recurrent states after a token prefix, kept in an LRU store bounded in bytes.

A Mamba model's whole memory of a prefix is its cache (conv windows and SSM states, a fixed size per
sequence), so reusing a shared prefix (a system prompt, a few-shot header) is one copy of that state,
not a page table. Entries are keyed by (length, blake2b digest of the token ids) and hold the ids
themselves, so a hit is verified token for token, never trusted on the hash alone.

Exactness: the scheduler prefills every prompt in chunks whose ends are the multiples of `chunk` (and
the prompt's end), and stores states only at those ends; a request that starts from a stored state
therefore runs exactly the model calls it would have run without it, and its output is bitwise the same.
A state at a prompt's end that is not a chunk multiple is only reused by a prompt of exactly that length
(it comes with the logits of the last position, so such a request skips prefill altogether).
"""

from __future__ import annotations

import array
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..generation import InferenceCache


def prefix_digest(ids: list[int], start_hash: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """An incremental blake2b over the ids (as little-endian int64): `h.copy().update(more)` extends it."""
    h = hashlib.blake2b(digest_size=16) if start_hash is None else start_hash.copy()
    h.update(array.array("q", ids).tobytes())
    return h


@dataclass
class PrefixEntry:
    """The state of one sequence (a 1-row cache) after the ids (packed int64), and the logits at its last position
    (1, V); nbytes counts all three."""

    ids: bytes
    cache: InferenceCache
    logits: torch.Tensor
    nbytes: int


def _copied(cache: InferenceCache, logits: torch.Tensor) -> tuple[InferenceCache, torch.Tensor]:
    """Copies of a 1-row cache and its logits, in storage of their own."""
    rows = torch.zeros(1, dtype=torch.long, device=logits.device)
    return cache.index_select(rows), logits.detach().clone()


class PrefixCache:
    """LRU store of prefix states, at most `capacity_bytes` bytes (0 disables it). Thread-safe.

    Example:
        >>> store = PrefixCache(256 << 20)
        >>> store.put(ids[:64], row_cache, logits)              # copies the state
        >>> hit = store.longest(ids, boundaries=[64, 128])      # PrefixEntry or None
    """

    def __init__(self, capacity_bytes: int):
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"PrefixCache: capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[int, bytes], PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def contains(self, ids: list[int], digest: bytes) -> bool:
        with self._lock:
            return (len(ids), digest) in self._entries

    def put(self, ids: list[int], digest: bytes, cache: InferenceCache, logits: torch.Tensor, *,
            copy: bool = True) -> bool:
        """Store the 1-row `cache` and `logits` (1, V) as the state after `ids`; False if it cannot fit.

        copy=True stores a copy. copy=False stores the tensors themselves, for a caller that never writes them
        again (the scheduler's prefill results: a call's states are fresh tensors, read afterwards only): no
        device copy per request. Such rows are often views of one batch tensor of their prefill call, which
        lives until every entry of that call is evicted; an entry that is used again (a hit, or stored again)
        gets a copy of its own then, so the entries still sharing a batch tensor are the untouched ones, evicted
        together in insertion order, and the store holds at most one prefill call's states and logits beyond its
        bound.
        """
        if not self.enabled:
            return False
        key = (len(ids), digest)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self._own(self._entries[key])
                return True
        if copy:
            cache, logits = _copied(cache, logits)
        packed = array.array("q", ids).tobytes()
        nbytes = cache.nbytes() + logits.nbytes + len(packed)
        if nbytes > self.capacity_bytes:
            return False
        with self._lock:
            while self.nbytes + nbytes > self.capacity_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
            self._entries[key] = PrefixEntry(packed, cache, logits, nbytes)
            self.nbytes += nbytes
        return True

    @staticmethod
    def _own(entry: PrefixEntry) -> None:
        """Give an entry whose tensors are views of a larger one (a `copy=False` row) storage of its own."""
        tensors = [entry.logits] + [t for layer in entry.cache.layers for t in (layer.conv_state, layer.ssm_state)]
        if all(t.untyped_storage().nbytes() == t.nbytes for t in tensors):
            return
        entry.cache, entry.logits = _copied(entry.cache, entry.logits)

    def get(self, ids: list[int], digest: bytes) -> PrefixEntry | None:
        """The entry for exactly `ids` (verified token for token), marked most recently used; None if absent."""
        key = (len(ids), digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.ids != array.array("q", ids).tobytes():
                return None
            self._entries.move_to_end(key)
            self._own(entry)
            return entry
