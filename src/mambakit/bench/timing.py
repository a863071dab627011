"""Timing helpers of `mambakit bench` and of the scripts in benchmarks/ (which import them from here).

On CUDA a call is timed by `triton.testing.do_bench` (median of many runs, the L2 cache flushed between them)
when Triton is installed, else by CUDA events; on CPU by `time_interleaved`: one call of every variant per
round, so that a machine shared with other jobs slows every variant alike, and the median of the rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def forward_only(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """fn under torch.no_grad(), its result dropped."""
    def run():
        with torch.no_grad():
            fn()
    return run


def forward_backward(fn: Callable[[], torch.Tensor], grad_out: torch.Tensor) -> Callable[[], None]:
    """fn, then the backward of its result against grad_out."""
    def run():
        fn().backward(grad_out)
    return run


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward of one call."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def time_interleaved(variants: dict[str, Callable[[], None]], repeats: int, warmup: int,
                     limit: dict[str, int] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call; one call of every variant per round, so machine noise hits all alike.

    `limit` caps the rounds (and skips the warm-up) of the slow variants named in it; `clock` may be
    time.process_time to count CPU time instead of wall time.
    """
    limit = limit or {}
    for k, fn in variants.items():
        for _ in range(0 if k in limit else warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for k, fn in variants.items():
            if r >= limit.get(k, repeats):
                continue
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of fn() with its device work: do_bench on CUDA, `repeats` timed calls on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:  # the `gpu` extra is not installed: CUDA events, as do_bench would
            return _cuda_event_ms(fn, repeats, warmup)
        return float(do_bench(fn, return_mode="median"))
    times = time_interleaved({"fn": fn}, repeats, warmup)["fn"]
    return statistics.median(times) * 1e3


def _cuda_event_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn() takes, its device work included (for calls long enough to time once)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the device running out of memory (a data point for a benchmark, not a bug)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated during fn() (None off CUDA: CPU allocations are not tracked)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def kernel_times(prof, steps: int) -> list[tuple[str, float, int]]:
    """GPU time per step of every kernel a `torch.profiler.profile` recorded (CUDA activity), costliest first.

    Args:
        prof: a finished `torch.profiler.profile`.   steps: how many steps (calls) ran under it.
    Returns:
        (name, us per step summed over the kernel's launches, launches per step) for each kernel with GPU time.
    """
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            rows.append((ev.key, us / steps, ev.count // steps))
    return sorted(rows, key=lambda r: -r[1])
