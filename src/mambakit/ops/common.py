"""Helpers shared by the op families, torch side (the Triton side is `triton_math.py`): the compute dtype,
log2(e), contiguity, launch-grid arithmetic and the SM count, out= writes on the PyTorch paths, the autocast
dtype, the custom-op plumbing of the Triton paths (a torch.library op for torch.compile, a plain autograd.Function
in eager mode), and whether the decode kernels launch with programmatic dependent launch (`pdl_launch`). Nothing
here imports Triton: the launch policies built on it run on CPU."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Iterator

import torch

# exp(v) = exp2(v * LOG2E): every family's recurrences use exp2 (one MUFU instruction on the GPU; the same
# rounding on the CPU paths that mirror the kernels)
LOG2E = math.log2(math.e)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every family accumulates in for inputs of `dtype`: float64 stays float64 (the reference
    comparisons), everything else (float32, bf16, fp16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar, value) -> Iterator[None]:
    """`var` holds `value` within the block (the backend and launch-mode switches: per thread and task)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; a same-dtype `.to` still costs a dispatch, and a decode step makes a dozen of these."""
    return t if t.dtype == dtype else t.to(dtype)


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t.contiguous(), passing None through (optional parameters read as dense vectors by the kernels)."""
    return None if t is None else t.contiguous()


def lastdim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with a unit stride on its last axis (a copy only if needed); None passes through. Kernels that take
    the other strides as arguments need only this (views of a fused projection stay views)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (`triton.cdiv` is a constexpr function in Triton 3.6: microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n itself for n <= 1), as `triton.next_power_of_2` without its host cost."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, off_gpu: int) -> int:
    """Streaming multiprocessors of `device` if it is a CUDA device, else `off_gpu` (the interpreter).

    Cached: `get_device_properties` costs microseconds of host time per call."""
    if device.type != "cuda":
        return off_gpu
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Programmatic dependent launch (PDL, CUDA on sm_90+): a kernel launched with it may start while the kernel before
# it in the stream is still running; it reads only constant data (weights) until `griddepcontrol.wait`, which
# returns once that kernel has finished and its writes are visible (`triton_math.pdl_enter`). The decode step's
# kernels (a few us each, most of it launch and first-load latency) then overlap their start with the previous
# kernel's end. On by default where the GPU has it; `MAMBAKIT_PDL=0` in the environment (read at import) or a
# `pdl_mode(False)` block turns it off (the benchmarks' A/B).
_PDL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mambakit_pdl", default=os.environ.get("MAMBAKIT_PDL", "1") != "0")


@contextlib.contextmanager
def pdl_mode(on: bool) -> Iterator[None]:
    """Within the block the decode kernels launch with programmatic dependent launch (True) or without (False).

    Example:
        >>> with pdl_mode(False):
        ...     out = generate(model, ids, max_new_tokens=32)   # every decode kernel launched the plain way
    """
    if not isinstance(on, bool):
        raise TypeError(f"pdl_mode: on must be a bool, got {type(on).__name__}")
    with context_value(_PDL, on):
        yield


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_launch(device: torch.device) -> bool:
    """Whether a decode kernel on `device` launches with programmatic dependent launch: a CUDA device of compute
    capability 9.0 or later, `pdl_mode` on (the default), not while torch.compile traces (it launches Triton
    kernels its own way). False on CPU tensors (Triton's interpreter has no `griddepcontrol`)."""
    if device.type != "cuda" or not _PDL.get() or torch.compiler.is_compiling():
        return False
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def write_into(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """fn(*args, out=out): the result lands in `out` (a preallocated buffer or a slice of one) and is returned.

    Eager mode passes `out=` (no allocation per call: the CPU paths that loop over checkpoint intervals or
    SSD chunks reuse scratch buffers in their loops). torch.compile cannot trace an `out=` into a strided view, so while compiling the result is
    computed and copied in, which functionalises to the same values.
    """
    if torch.compiler.is_compiling():
        return out.copy_(fn(*args, **kwargs))
    return fn(*args, **kwargs, out=out)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device`'s type inside an autocast region; None outside one.

    A fused op that does its own matmuls casts their operands to this dtype itself and then runs with
    autocast off, so that its forward and its backward (which autograd runs outside the region) see the
    dtypes the unfused modules would see: weights cast for the matmul, gradients back in the parameters' dtype.
    """
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


# A custom op's schema cannot return None: the backward ops of the Triton families return their gradients as
# a list in which an absent one is an empty tensor, each in its input's dtype and contiguous, so that the fake
# (meta) implementation can state every output from the inputs alone.


def pack_grads(grads, inputs) -> list[torch.Tensor]:
    """Real backward outputs: grads[i] cast to inputs[i]'s dtype, contiguous; None -> an empty tensor."""
    ref = next(t for t in inputs if t is not None)
    return [ref.new_empty(0) if g is None else g.to(t.dtype).contiguous() for g, t in zip(grads, inputs)]


def fake_grads(inputs, present) -> list[torch.Tensor]:
    """Fake backward outputs matching `pack_grads`: present[i] says whether gradient i is computed."""
    ref = next(t for t in inputs if t is not None)
    return [ref.new_empty(t.shape, dtype=t.dtype) if keep and t is not None else ref.new_empty(0)
            for t, keep in zip(inputs, present)]


def unpack_grads(grads, present) -> list[torch.Tensor | None]:
    """The gradients a registered backward returns: the computed ones, None for the rest."""
    return [g if keep else None for g, keep in zip(grads, present)]


def autograd_op(name: str, fwd_impl, fwd_op, setup_context, backward, bwd_impl, bwd_op):
    """The op a Triton family calls: `fwd_op` (a torch.library custom op) under torch.compile, and the same
    implementation through a plain autograd.Function in eager mode.

    Registers `backward` (calling `bwd_op`) as `fwd_op`'s autograd. In eager mode the dispatcher's Python path
    of a custom op (schema binding, alias checks of every output, its autograd wrapper) costs tens of
    microseconds per call, which a 130M training step at 2048 tokens pays ~150 times; the eager Function runs
    `fwd_impl`, the same `setup_context` and `backward` (calling `bwd_impl`) with none of it, and when no
    backward can follow (grad disabled, or no input requires grad) `fwd_impl` alone. Same numbers: the paths
    share every function but the dispatch.

    backward(ctx, *grads, bwd) -> the input gradients; setup_context(ctx, inputs, output) as for
    `torch.library.register_autograd`.
    """
    torch.library.register_autograd(fwd_op, functools.partial(backward, bwd=bwd_op), setup_context=setup_context)

    def forward(ctx, *args):
        out = fwd_impl(*args)
        setup_context(ctx, args, out)
        return tuple(out) if isinstance(out, list) else out

    def eager_backward(ctx, *grads):
        return tuple(backward(ctx, *grads, bwd=bwd_impl))

    function = type(f"{name}Function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)})

    def call(*args):
        if torch.compiler.is_compiling():
            return fwd_op(*args)
        if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            # no backward can follow (inference, evaluation, frozen inputs): the implementation alone, without
            # the Function's node or `setup_context` (whose saved inputs, and the conv's private copy of its
            # initial window, nobody would read)
            out = fwd_impl(*args)
            return tuple(out) if isinstance(out, list) else out
        return function.apply(*args)

    call.__name__ = name
    return call
