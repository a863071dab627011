"""Timing helpers shared by the CPU op benchmarks (`cpu_selective_scan.py`, `cpu_ssd.py`)."""

from __future__ import annotations

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
