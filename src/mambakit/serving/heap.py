"""Python's garbage collector in a server process: its pauses counted, and the start-up heap kept out of its scans.

A serving process holds hundreds of thousands of long-lived objects once torch, the model and the HTTP stack are
loaded. CPython's full (generation 2) collection walks all of them, tens to hundreds of milliseconds during which
the process's threads stop: a decode loop or an event loop stalls for that long, and under a new load the first
full collections come within the first second. `freeze_heap()` (gc.freeze) moves everything alive at start-up to
a generation the collector never scans, so later collections walk only what serving itself allocated.
`gc_pauses()` counts the collections of this process and the seconds they took (gc.callbacks), for /metrics.
"""

from __future__ import annotations

import gc
import threading
import time


class GcPauses:
    """Collections and their seconds in this process, per generation (0, 1, 2), from gc.callbacks."""

    def __init__(self):
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = min(int(info.get("generation", 2)), 2)
            self.collections[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._started

    def gauges(self, prefix: str = "") -> dict[str, float]:
        """`{prefix}gc_collections_gen2`, `{prefix}gc_pause_seconds` (all generations) and
        `{prefix}gc_frozen_objects` (`freeze_heap`) for /metrics."""
        return {f"{prefix}gc_collections_gen2": self.collections[2], f"{prefix}gc_pause_seconds": sum(self.seconds),
                f"{prefix}gc_frozen_objects": gc.get_freeze_count()}


_pauses: GcPauses | None = None
_lock = threading.Lock()


def gc_pauses() -> GcPauses:
    """This process's collector pauses, counted from the first call on (one callback per process)."""
    global _pauses
    with _lock:
        if _pauses is None:
            _pauses = GcPauses()
        return _pauses


def freeze_heap() -> int:
    """Collect once, then freeze every object alive now out of later collections (gc.freeze); call it when start-up
    is done (model loaded, graphs captured). Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
