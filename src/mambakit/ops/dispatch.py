"""Backend choice for every op, in one place.

Backends:
    "reference"  sequential recurrence in float64: the ground truth (slow, exact)
    "torch"      vectorised / chunked PyTorch: CPU and GPU, autograd by torch or a hand-written backward
    "triton"     fused Triton kernels: CUDA tensors (or any tensors under TRITON_INTERPRET=1, for tests)

`backend=None` picks "triton" for CUDA tensors when Triton is importable, "torch" otherwise; inside
`with use_backend("torch"):` it picks the named backend instead (benchmarks and tests compare whole
layers and models on both paths this way, without threading a flag through every module).
Ops call `select_backend` and nothing else decides; modules never import kernels themselves.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("reference", "torch", "triton")

_DEFAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("mambakit_default_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Within the block, ops called with `backend=None` run `backend` (None: the automatic choice).

    An op that does not implement `backend` keeps its automatic choice (e.g. `use_backend("triton")`
    leaves an op without a Triton kernel on "torch"); an explicit `backend=` argument always wins.

    Example:
        >>> with use_backend("torch"):
        ...     y = layer(x)          # every op inside runs its PyTorch path, even on CUDA
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"use_backend: backend must be None or one of {BACKENDS}, got {backend!r}")
    token = _DEFAULT.set(backend)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


# whether `import triton` can succeed, checked once at import without importing it (torch.compile cannot trace
# importlib, and the answer cannot change within a process)
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the triton package is installed."""
    return _TRITON_FOUND


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pinned_backend(fn):
    """`fn`, run under the `use_backend` choice in force now wherever it is called later (activation recomputation
    calls a layer again in the backward, outside the caller's `use_backend` block). Under torch.compile the
    choice is fixed at tracing already, and `fn` is returned as it is."""
    if torch.compiler.is_compiling():
        return fn
    backend = _DEFAULT.get()
    if backend is None:
        return fn

    def run(*args, **kwargs):
        with use_backend(backend):
            return fn(*args, **kwargs)

    return run


@torch.compiler.assume_constant_result
def _default_backend() -> str | None:
    """The `use_backend` block's backend. Under torch.compile it is read once, while tracing (Dynamo cannot trace
    a ContextVar): a compiled model keeps the backend it was compiled under."""
    return _DEFAULT.get()


def select_backend(op: str, backend: str | None, device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """Return the backend that runs `op` for tensors on `device`.

    Args:
        op: the op's public name, for error messages.
        backend: None (automatic) or one of "reference", "torch", "triton".
        device: the device of the op's main input.
        supported: the backends this op implements.
    Raises:
        ValueError: unknown backend, or one this op / device / installation cannot run.
    """
    if backend is None:
        default = _default_backend()
        if default in supported:
            backend = default
    if backend is None:
        if device.type == "cuda" and "triton" in supported and triton_available():
            return "triton"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; choose one of {supported}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend 'triton' needs the triton package (pip install 'mambakit[gpu]')")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(
                f"{op}: backend 'triton' needs CUDA tensors, got device {device} "
                "(set TRITON_INTERPRET=1 to run the kernels on CPU through Triton's interpreter)"
            )
    return backend
