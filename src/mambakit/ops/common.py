"""Small helpers shared by the op families' PyTorch paths."""

from __future__ import annotations

from collections.abc import Callable

import torch


def write_into(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """fn(*args, out=out): the result lands in `out` (a preallocated buffer or a slice of one) and is returned.

    Eager mode passes `out=` (no allocation per call: the chunked CPU paths reuse scratch buffers in their
    loops). torch.compile cannot trace an `out=` into a strided view, so while compiling the result is
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
