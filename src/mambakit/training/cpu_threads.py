"""CPU thread count that survives a busy machine.

PyTorch's OpenMP pool has one thread per core, and each parallel region ends at a barrier that every
thread must reach. When another process keeps a core busy, the thread sharing that core runs only part
of the time, and every region waits for it while the other threads spin: on a 2-core machine one busy
process made generation 10-60x and training 2-9x slower (BENCHMARKS.md, "CPU: a busy machine").
Running on the cores the others leave idle avoids the barrier stalls; this module measures the others'
load from /proc/stat (minus this process's own CPU time) and sets `torch.set_num_threads` accordingly.

    governor = CPUThreadGovernor()        # measures ~0.1 s, sets the thread count
    governor.update()                     # call often (each step): re-measures every `every_s` seconds

Nothing happens when the user fixed the count (OMP_NUM_THREADS or MKL_NUM_THREADS in the environment),
or where /proc/stat does not exist (not Linux): PyTorch's default stays.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["CPUThreadGovernor", "available_cores", "other_cpu_load", "user_fixed_threads"]


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; the CPU count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def user_fixed_threads() -> bool:
    """Whether the environment fixes the thread count (then it is left alone)."""
    return any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def _sample() -> tuple[float, float, float] | None:
    """(wall time, CPU-seconds busy on the machine, CPU-seconds of this process) or None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time
    busy = sum(ticks[:8]) - idle if len(ticks) >= 8 else sum(ticks) - idle
    hz = os.sysconf("SC_CLK_TCK")
    own = time.process_time()
    return time.monotonic(), busy / hz, own


def other_cpu_load(interval_s: float = 0.1) -> float | None:
    """Cores kept busy by other processes over the next `interval_s` seconds (None where not measurable)."""
    first = _sample()
    if first is None:
        return None
    time.sleep(interval_s)
    return _load_between(first, _sample())


def _load_between(first, second) -> float:
    wall = max(second[0] - first[0], 1e-6)
    return max(0.0, ((second[1] - first[1]) - (second[2] - first[2])) / wall)


def threads_for(other_load: float, cores: int) -> int:
    """One thread per core that the others leave idle (at least one).

    Example:
        >>> threads_for(0.9, 2), threads_for(0.2, 2), threads_for(3.5, 2)
        (1, 2, 1)
    """
    return max(1, min(cores, int(cores - other_load + 0.5)))


class CPUThreadGovernor:
    """Sets torch's intra-op thread count to the cores other processes leave idle, and keeps it current.

    Args:
        every_s: seconds between re-measurements in `update` (each costs two reads of /proc/stat).
        enabled: False makes every call a no-op (e.g. a CUDA run, or a count the user fixed).
    """

    def __init__(self, every_s: float = 5.0, enabled: bool = True):
        self.every_s = every_s
        self.threads_before = torch.get_num_threads()  # what `restore` gives back
        self.cores = available_cores()
        self.enabled = enabled and not user_fixed_threads() and self.cores > 1 and _sample() is not None
        self._last = None
        if self.enabled:
            load = other_cpu_load()
            self._apply(load if load is not None else 0.0)
            self._last = _sample()

    def _apply(self, load: float) -> None:
        threads = threads_for(load, self.cores)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def restore(self) -> None:
        """Set the thread count back to what it was before this governor (a caller in the same process, a test
        after a command run in-process, gets the count it had)."""
        if self.enabled:
            torch.set_num_threads(self.threads_before)

    def update(self) -> None:
        """Re-measure the others' load (at most every `every_s` seconds) and adjust the thread count."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last[0] < self.every_s:
            return
        sample = _sample()
        self._apply(_load_between(self._last, sample))
        self._last = sample
