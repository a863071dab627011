"""How many device kernels one decode step launches: aten ops that run a kernel plus Triton launches.

At batch 1 a decode step is bound by launches, not bytes (a 130M step reads ~0.25 GB of bf16 weights, ~0.06 ms
on an H200, against ~0.6 ms measured), so the kernel count per token is the figure to drive down. This module
counts it on any device, CPU included (Triton kernels through TRITON_INTERPRET=1 and `use_backend("triton")`):

    aten ops    seen by a TorchDispatchMode, except those that launch nothing: allocations (empty, ...), and
                ops whose outputs all alias an input (views; contiguous / to / reshape that return their input)
    Triton      every `fast_launch` kernel launch (all of mambakit's kernels are fast_launch kernels);
                aten ops the Triton interpreter runs inside a launch (CPU tests) are not counted

A cuBLAS matmul counts as one (cuBLAS may add a split-K reduction kernel on some shapes: a lower bound there).
A `.item()` (a host sync, which no CUDA graph can hold) is not a kernel; it is counted in `syncs` (MambaLM's
input check on CPU makes two; on CUDA there are none).

    counts = count_decode_kernels(model, batch_size=1)
    counts.per_token, counts.per_layer, counts.by_op        # e.g. 170, 7, Counter({'aten.mm': 73, ...})
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DecodeKernels", "KernelCounter", "count_decode_kernels", "format_decode_kernels", "launches_kernel",
           "profile_decode_kernels"]

_aten = torch.ops.aten
# ops that allocate or alias without running anything on the device
_NO_KERNEL = {
    _aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default, _aten.new_empty.default,
    _aten.new_empty_strided.default, _aten.detach.default, _aten.lift_fresh.default, _aten._unsafe_view.default,
    _aten.alias.default,
}

# a device -> host read: a sync (and no CUDA graph can hold it); `item` may reach the mode without its inner op
_SYNCS = {_aten.item.default, _aten._local_scalar_dense.default}


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)}


def launches_kernel(func, args, kwargs, out) -> bool:
    """Whether the aten op `func`, which returned `out` for these arguments, ran a device kernel.

    In-place and out= ops did; allocations did not; otherwise a kernel ran exactly when some output has storage
    of its own: views, and ops that may return their input (contiguous, to, reshape under inference_mode, where
    they reach this mode undecomposed) launch nothing when they alias.
    """
    if func in _NO_KERNEL:
        return False
    returns = func._schema.returns
    if any(r.alias_info is not None and r.alias_info.is_write for r in returns):
        return True
    outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outputs:
        return False  # scalars and dtypes (promote_types, sym sizes)
    inputs = _storages((args, kwargs))
    return any(t.numel() > 0 and t.untyped_storage().data_ptr() not in inputs for t in outputs)


class KernelCounter(TorchDispatchMode):
    """Counts kernels launched inside the block, by op name and by `section` (set by the caller).

    Example:
        >>> with KernelCounter() as kc:
        ...     y = layer(x)
        >>> kc.total, kc.by_op
    """

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.by_section: Counter = Counter()
        self.by_section_op: Counter = Counter()
        self.syncs = 0
        self.section = "other"
        self._in_triton = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, name: str) -> None:
        self.by_op[name] += 1
        self.by_section[self.section] += 1
        self.by_section_op[(self.section, name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._in_triton:
            if func in _SYNCS:
                self.syncs += 1
            elif launches_kernel(func, args, kwargs, out):
                self.add(f"aten.{func.overloadpacket.__name__}")
        return out

    @contextlib.contextmanager
    def counting_triton(self) -> Iterator[None]:
        """Count every `fast_launch` kernel launch within the block (patches the launch method, then restores)."""
        from ..ops.triton_launch import FastLaunchKernel

        original = FastLaunchKernel.launch
        counter = self

        def launch(kernel, grid, args, kwargs):
            fn = getattr(kernel.fn, "fn", kernel.fn)
            counter.add(f"triton.{getattr(fn, '__name__', 'kernel')}")
            counter._in_triton += 1
            try:
                return original(kernel, grid, args, kwargs)
            finally:
                counter._in_triton -= 1

        FastLaunchKernel.launch = launch
        try:
            yield
        finally:
            FastLaunchKernel.launch = original


@dataclass
class DecodeKernels:
    """Kernels of one decode step of a model: per token, per layer (by block index), by op, host syncs."""

    per_token: int
    per_layer: dict[int, int]
    outside_layers: int
    by_op: Counter
    layer_ops: Counter = field(default_factory=Counter)  # ops of the busiest layer
    syncs: int = 0

    @property
    def max_per_layer(self) -> int:
        return max(self.per_layer.values(), default=0)


def count_decode_kernels(model: nn.Module, batch_size: int = 1, cache=None) -> DecodeKernels:
    """Count the kernels of one `decode_one_token` call of `model` (a MambaLM), after one uncounted step.

    The uncounted step first fills the per-layer caches of derived parameters (`DecodeParams`), as in steady
    decoding. `cache` (optional) is used and advanced by two tokens; otherwise a fresh one is allocated.
    Backends follow the usual choice (wrap the call in `use_backend("triton")` to count the Triton path on CPU
    under TRITON_INTERPRET=1).
    """
    from ..generation.steps import decode_one_token, model_device

    device = model_device(model)
    if cache is None:
        cache = model.allocate_cache(batch_size)
    tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
    decode_one_token(model, tokens, cache)
    counter = KernelCounter()
    handles = []
    for i, block in enumerate(model.backbone.layers):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: setattr(counter, "section", i)))
        handles.append(block.register_forward_hook(lambda m, a, o: setattr(counter, "section", "other")))
    try:
        with counter.counting_triton(), counter:
            decode_one_token(model, tokens, cache)
    finally:
        for h in handles:
            h.remove()
    per_layer = {k: v for k, v in counter.by_section.items() if k != "other"}
    busiest = max(per_layer, key=per_layer.get) if per_layer else None
    layer_ops = Counter({op: n for (sec, op), n in counter.by_section_op.items() if sec == busiest})
    return DecodeKernels(per_token=counter.total, per_layer=dict(sorted(per_layer.items())),
                         outside_layers=counter.by_section["other"], by_op=counter.by_op, layer_ops=layer_ops,
                         syncs=counter.syncs)


def profile_decode_kernels(model: nn.Module, batch_size: int = 1,
                           steps: int = 4) -> tuple[float, Counter, Counter]:
    """CUDA only: the device activities (kernels, memcpy, memset) torch.profiler records per eager decode step.

    The ground truth the dispatch count above approximates (a cuBLAS matmul may be two kernels: split-K).
    Returns (activities per token, Counter of kernel names per token, Counter of their device microseconds per
    token). The durations are the kernels' own: a CUDA graph replays the same kernels without the host's gaps, so
    their sum is the floor of a graphed step at this batch.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ..generation.steps import decode_one_token, model_device

    device = model_device(model)
    cache = model.allocate_cache(batch_size)
    tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
    for _ in range(2):
        decode_one_token(model, tokens, cache)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decode_one_token(model, tokens, cache)
        torch.cuda.synchronize(device)
    names, micros = Counter(), Counter()
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA:
            names[ev.name] += 1
            micros[ev.name] += ev.time_range.elapsed_us()
    return (sum(names.values()) / steps, Counter({k: v / steps for k, v in names.items()}),
            Counter({k: v / steps for k, v in micros.items()}))


def format_decode_kernels(name: str, k: DecodeKernels) -> str:
    """One line per model: kernels per token, per layer (max), outside the layers, and the busiest layer's ops."""
    ops = ", ".join(f"{op} {n}" for op, n in sorted(k.layer_ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"{name}: {k.per_token} kernels/token, {k.max_per_layer} per layer (max), {k.outside_layers} outside "
            f"the layers, {k.syncs} host syncs; one layer: {ops}")
