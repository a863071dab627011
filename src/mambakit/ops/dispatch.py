"""Backend choice for every op, in one place: the backend table and the three ways to pick a path.

Backends:
    "reference"  sequential recurrence in float64: the ground truth (slow, exact)
    "torch"      vectorised PyTorch (by checkpoint intervals, or by SSD chunks): CPU and GPU, autograd by torch
                 or a hand-written backward
    "triton"     fused Triton kernels: CUDA tensors (or any tensors under TRITON_INTERPRET=1, for tests)

`BACKEND_TABLE` maps op -> backend -> `Implementation` (where the function lives and its declared limits:
complex A, empty input, a backward). Ops call `implementation(op, backend, device, ...)`, which picks the
backend, enforces the limits and returns the function; nothing else decides, and modules never import
kernels themselves.

Three ways to pick a path, strongest first:
    1. `backend=` on an op call: "reference", "torch" or "triton" (an error if the op, device or
       installation cannot run it, or the input breaks a declared limit).
    2. `with use_backend("torch"):` sets the automatic choice for every op called inside with
       `backend=None` (benchmarks and tests compare whole layers and models this way); an op without
       that backend keeps its automatic choice. `pinned_backend(fn)` carries the choice into a later call
       (activation recomputation in the backward).
    3. Automatic (`backend=None`): "triton" for CUDA tensors when Triton is installed, "torch" otherwise.
`record_backends()` counts the choices made inside a block (which path a layer, model or wrapped model took).
The mixers (`modules.Mamba1`, `modules.Mamba2`) choose *which ops* run, not backends: their constructor
arguments `fused` (one fused mixer op, `ops.mamba1_inner` / `ops.mamba2_inner`, instead of the ops one by
one) and `recompute` (checkpoint the whole mixer) are in the model config's `ssm_cfg`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .common import context_value

BACKENDS = ("reference", "torch", "triton")

_DEFAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("mambakit_default_backend", default=None)
_RECORD: contextvars.ContextVar[Counter | None] = contextvars.ContextVar("mambakit_record_backends", default=None)


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
    with context_value(_DEFAULT, backend):
        yield


@contextlib.contextmanager
def record_backends() -> Iterator[Counter]:
    """Count, within the block, the (op, backend) that every op call ran: the path a module took.

    A wrapper that made a mixer leave its fused op (FSDP2, DDP, hooks, an adapter) shows up as the
    separate ops (`ssd`, `causal_conv1d`, `rms_norm`) in place of `mamba2_inner`. Calls traced by
    torch.compile are not counted (the choice is made once, while tracing).

    Example:
        >>> with record_backends() as seen:
        ...     model(input_ids).sum().backward()
        >>> seen      # Counter({('add_rms_norm', 'torch'): 3, ('mamba2_inner', 'triton'): 2})
    """
    seen: Counter = Counter()
    with context_value(_RECORD, seen):
        yield seen


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


# ----------------------------------------------------------------------------------------------
# the backend table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """One backend of one op: `load()` returns the function (imported on first use, so that Triton is imported
    only when a Triton backend runs), and the limits it declares.

    complex_A: accepts a complex A (the S4D-Lin baselines); otherwise a complex A is an error naming the
        backends that take it.
    empty: accepts seqlen == 0.
    grad: has a backward. Without one, a call that needs gradients runs `grad_fallback` instead.
    automatic: the automatic choice (backend=None, no `use_backend` block) may pick it. False for a backend that
        is tested but not yet timed against the one it would replace: it runs only when named.
    grad_automatic: the automatic choice may run its backward. False for a backward tested (interpreter, static
        SASS) but not yet timed on a GPU: an automatic call that needs gradients runs `grad_fallback`; named (or in
        a `use_backend` block) it runs.
    """

    load: Callable[[], Callable]
    complex_A: bool = False
    empty: bool = True
    grad: bool = True
    grad_fallback: str | None = None
    automatic: bool = True
    grad_automatic: bool = True


# Loaders use import statements, not importlib: torch.compile traces these calls (fullgraph) and cannot
# trace importlib.


def _selective_scan_reference():
    from .selective_scan.reference import selective_scan_reference
    return selective_scan_reference


def _selective_scan_torch():
    from .selective_scan.torch_scan import selective_scan_torch
    return selective_scan_torch


def _selective_scan_triton():
    from .selective_scan.triton_scan import selective_scan_triton
    return selective_scan_triton


def _selective_state_update_reference():
    from .selective_scan.reference import selective_state_update_reference
    return selective_state_update_reference


def _selective_state_update_torch():
    from .selective_scan.torch_step import selective_state_update_torch
    return selective_state_update_torch


def _selective_state_update_triton():
    from .selective_scan.triton_step import selective_state_update_triton
    return selective_state_update_triton


def _ssd_reference():
    from .ssd.reference import ssd_reference
    return ssd_reference


def _ssd_torch():
    from .ssd.torch_ssd import ssd_torch
    return ssd_torch


def _ssd_triton():
    from .ssd.triton_ssd import ssd_triton
    return ssd_triton


def _ssd_state_update_reference():
    from .ssd.reference import ssd_state_update_reference
    return ssd_state_update_reference


def _ssd_state_update_torch():
    from .ssd.torch_step import ssd_state_update_torch
    return ssd_state_update_torch


def _ssd_state_update_triton():
    from .ssd.triton_step import ssd_state_update_triton
    return ssd_state_update_triton


def _causal_conv1d_reference():
    from .causal_conv1d.reference import causal_conv1d_reference
    return causal_conv1d_reference


def _causal_conv1d_torch():
    from .causal_conv1d.torch_conv import causal_conv1d_torch
    return causal_conv1d_torch


def _causal_conv1d_triton():
    from .causal_conv1d.triton_conv import causal_conv1d_triton
    return causal_conv1d_triton


def _causal_conv1d_update_reference():
    from .causal_conv1d.reference import causal_conv1d_update_reference
    return causal_conv1d_update_reference


def _causal_conv1d_update_torch():
    from .causal_conv1d.torch_conv import causal_conv1d_update_torch
    return causal_conv1d_update_torch


def _causal_conv1d_update_triton():
    from .causal_conv1d.triton_conv import causal_conv1d_update_triton
    return causal_conv1d_update_triton


def _rms_norm_reference():
    from .rms_norm.reference import rms_norm_reference
    return rms_norm_reference


def _rms_norm_torch():
    from .rms_norm.torch_norm import rms_norm_torch
    return rms_norm_torch


def _rms_norm_triton():
    from .rms_norm.triton_norm import rms_norm_triton
    return rms_norm_triton


def _add_rms_norm_torch():
    from .rms_norm.torch_norm import add_rms_norm_torch
    return add_rms_norm_torch


def _add_rms_norm_triton():
    from .rms_norm.triton_norm import add_rms_norm_triton
    return add_rms_norm_triton


def _mamba1_inner_composed():
    from .mamba_inner.mamba1 import mamba1_inner_composed
    return mamba1_inner_composed


def _mamba1_inner_triton():
    from .mamba_inner.triton_mamba1 import mamba1_inner_triton
    return mamba1_inner_triton


def _mamba2_inner_composed():
    from .mamba_inner.mamba2 import mamba2_inner_composed
    return mamba2_inner_composed


def _mamba2_inner_triton():
    from .mamba_inner.triton_mamba2 import mamba2_inner_triton
    return mamba2_inner_triton


def _norm_linear_torch():
    from .norm_linear.torch_norm_linear import norm_linear_torch
    return norm_linear_torch


def _norm_linear_triton():
    from .norm_linear.triton_norm_linear import norm_linear_triton
    return norm_linear_triton


def _decode_linear_torch():
    return torch.nn.functional.linear


def _decode_linear_triton():
    from .norm_linear.triton_gemv import linear_rows_triton
    return linear_rows_triton


def _mamba1_step_composed():
    from .mamba_inner.mamba1_step import mamba1_step_composed
    return mamba1_step_composed


def _mamba1_step_triton():
    from .mamba_inner.triton_mamba1_step import mamba1_step_triton
    return mamba1_step_triton


def _three(reference, torch_, triton, **triton_limits) -> dict[str, Implementation]:
    return {"reference": Implementation(reference), "torch": Implementation(torch_),
            "triton": Implementation(triton, **triton_limits)}


def _linear_cross_entropy_reference():
    from .cross_entropy.reference import linear_cross_entropy_reference
    return linear_cross_entropy_reference


def _linear_cross_entropy_torch():
    from .cross_entropy.torch_ce import linear_cross_entropy_torch
    return linear_cross_entropy_torch


def _linear_cross_entropy_triton():
    from .cross_entropy.triton_ce import linear_cross_entropy_triton
    return linear_cross_entropy_triton


# op -> backend -> implementation. The composed mixer ops run the public ops in a row on the backend named by
# their `backend` argument ("reference" or "torch"); their Triton backend is one fused autograd node.
BACKEND_TABLE: dict[str, dict[str, Implementation]] = {
    "selective_scan": {
        "reference": Implementation(_selective_scan_reference, complex_A=True),
        "torch": Implementation(_selective_scan_torch, complex_A=True),
        "triton": Implementation(_selective_scan_triton),
    },
    "selective_state_update": {
        "reference": Implementation(_selective_state_update_reference, complex_A=True),
        "torch": Implementation(_selective_state_update_torch, complex_A=True),
        "triton": Implementation(_selective_state_update_triton),
    },
    "ssd": _three(_ssd_reference, _ssd_torch, _ssd_triton),
    "ssd_state_update": _three(_ssd_state_update_reference, _ssd_state_update_torch, _ssd_state_update_triton),
    "causal_conv1d": _three(_causal_conv1d_reference, _causal_conv1d_torch, _causal_conv1d_triton),
    "causal_conv1d_update": _three(_causal_conv1d_update_reference, _causal_conv1d_update_torch,
                                   _causal_conv1d_update_triton),
    # the Triton backend runs when named (backend="triton" or use_backend) until a GPU A/B has timed it against the
    # torch backend (`bash benchmarks/gpu_all.sh ce`); then the automatic choice on CUDA
    "linear_cross_entropy": {"reference": Implementation(_linear_cross_entropy_reference),
                             "torch": Implementation(_linear_cross_entropy_torch),
                             "triton": Implementation(_linear_cross_entropy_triton, automatic=False)},
    "rms_norm": _three(_rms_norm_reference, _rms_norm_torch, _rms_norm_triton),
    # one Triton kernel forward and one backward: every block's pre-norm, in training and decoding (the 130M
    # training step's kernels 7 ms faster on an H200, BENCHMARKS.md session 29)
    "add_rms_norm": {"torch": Implementation(_add_rms_norm_torch),
                     "triton": Implementation(_add_rms_norm_triton)},
    # the decode step's projections with their norm (and conv) fused: one kernel each, forward only
    "add_rms_norm_linear": {"torch": Implementation(_norm_linear_torch),
                            "triton": Implementation(_norm_linear_triton, grad=False, grad_fallback="torch")},
    "gated_rms_norm_linear": {"torch": Implementation(_norm_linear_torch),
                              "triton": Implementation(_norm_linear_triton, grad=False, grad_fallback="torch")},
    "decode_linear": {"torch": Implementation(_decode_linear_torch),
                      "triton": Implementation(_decode_linear_triton, grad=False, grad_fallback="torch")},
    "mamba1_inner": _three(_mamba1_inner_composed, _mamba1_inner_composed, _mamba1_inner_triton),
    "mamba2_inner": _three(_mamba2_inner_composed, _mamba2_inner_composed, _mamba2_inner_triton, empty=False),
    # Mamba-1's decode step after the norm, before out_proj, in two kernels (forward only)
    "mamba1_step": {"reference": Implementation(_mamba1_step_composed),
                    "torch": Implementation(_mamba1_step_composed),
                    "triton": Implementation(_mamba1_step_triton, grad=False, grad_fallback="torch")},
}


def implementation(op: str, backend: str | None, device: torch.device, *, complex_A: bool = False,
                   empty: bool = False, needs_grad: bool = False) -> tuple[str, Callable]:
    """(backend name, function) that runs `op` for these inputs: `select_backend` over the op's row of
    `BACKEND_TABLE`, then its declared limits.

    Args:
        op: a key of BACKEND_TABLE.   backend: None or a backend name.   device: the main input's device.
        complex_A: the input has a complex A.   empty: seqlen == 0.   needs_grad: a backward will be needed.
    Raises:
        ValueError: as `select_backend`, or a limit the chosen backend declares (naming the backends that
            accept the input).
    """
    row = BACKEND_TABLE[op]
    supported = tuple(row)
    automatic = backend is None and _default_backend() is None
    if automatic:
        supported = tuple(n for n, i in row.items() if i.automatic)
    name = select_backend(op, backend, device, supported=supported)
    impl = row[name]
    if complex_A and not impl.complex_A:
        ok = tuple(n for n, i in row.items() if i.complex_A)
        raise ValueError(f"{op}: complex A is supported by the backends {ok}, not {name!r}")
    if empty and not impl.empty:
        raise ValueError(f"{op}: backend {name!r} needs seqlen >= 1")
    if needs_grad and (not impl.grad or (automatic and not impl.grad_automatic)):
        name = impl.grad_fallback
        impl = row[name]
    if torch.compiler.is_compiling():
        # Dynamo cannot trace a ContextVar (compiled calls are not counted), and reading _LOADED would guard the graph
        # on that dict's contents: the first eager call after a compile (a prefill) fills it and every compiled graph
        # was compiled again (`mambakit generate --compile` paid its step's compile twice, inside the timed rate)
        return name, impl.load()
    seen = _RECORD.get()
    if seen is not None:
        seen[(op, name)] += 1
    fn = _LOADED.get(impl.load)
    if fn is None:  # first use of this implementation: import it (an eager forward looks up ~70 per call)
        fn = _LOADED[impl.load] = impl.load()
    return name, fn


_LOADED: dict[Callable[[], Callable], Callable] = {}  # Implementation.load -> the function it returned
