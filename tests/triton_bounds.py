"""`triton_bounds_checked()`: every load and store a Triton kernel makes under the interpreter stays inside the
tensors it was given.

On the GPU an address outside every tensor is an illegal memory access (or a silent read of a neighbour); the
interpreter reads host memory and usually says nothing. Inside the context each masked load / store checks its
active addresses against the extents of the kernel's tensor arguments (first to last element of each view,
strides included): a kernel reading past the end of a row slice, a prefetch one row too far, a wrong stride
multiplier all fail with the kernel's name and the first stray address.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def _extent(t: torch.Tensor) -> tuple[int, int]:
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
    lo = t.data_ptr() - sum((n - 1) * -s for n, s in zip(t.shape, t.stride()) if s < 0) * t.element_size()
    return lo, lo + span * t.element_size()


@contextlib.contextmanager
def triton_bounds_checked():
    from triton.runtime import interpreter as interp

    ranges: list[tuple[int, int]] = []
    names: list[str] = []
    init, run = interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__
    load, store = interp.InterpreterBuilder.create_masked_load, interp.InterpreterBuilder.create_masked_store

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges.clear()
        for a in list(args_hst) + list(kwargs_hst.values()):
            if isinstance(a, torch.Tensor) and a.numel():
                ranges.append(_extent(a))
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        names.append(getattr(self.fn, "__name__", str(self.fn)))
        try:
            return run(self, *args, **kwargs)
        finally:
            names.pop()

    def check(ptrs, mask, what):
        addr = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        active = addr[np.broadcast_to(mask.data, addr.shape).astype(bool)].astype(np.uint64)  # int8 masks too
        if active.size == 0:
            return
        ok = np.zeros(active.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (active >= lo) & (active < hi)
        if not ok.all():
            stray = int(active[~ok][0])
            near = min(ranges, key=lambda r: min(abs(stray - r[0]), abs(stray - r[1]))) if ranges else None
            raise AssertionError(f"{names[-1] if names else 'a Triton kernel'}: {what} at address {stray:#x} outside "
                                 f"every tensor argument ({int((~ok).sum())} stray addresses; nearest tensor "
                                 f"[{near[0]:#x}, {near[1]:#x}))")

    def masked_load(self, ptrs, mask, other, *a, **k):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *a, **k)

    interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__ = init_args, call
    interp.InterpreterBuilder.create_masked_load = masked_load
    interp.InterpreterBuilder.create_masked_store = masked_store
    try:
        yield
    finally:
        interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__ = init, run
        interp.InterpreterBuilder.create_masked_load, interp.InterpreterBuilder.create_masked_store = load, store
