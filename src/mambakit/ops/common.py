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
