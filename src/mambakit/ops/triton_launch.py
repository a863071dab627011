"""Launch helpers shared by the Triton op families: cheap launches (the grid arithmetic and the SM count they are
sized by live in `ops/common.py`, without Triton, and are re-exported here).

`fast_launch`: compile through Triton once, then call the compiled kernel's launcher directly.

Under TRITON_INTERPRET=1 importing this module also lets Triton 3.6's interpreter take runtime ints as
loop bounds with NumPy >= 2.4 (`_interpreter_index_fix`); every kernel module imports it first.

`kernel[grid](*args)` in Triton 3.6 costs tens of microseconds of host time per launch: it binds the
arguments, builds the specialization key (dtype and 16-byte alignment of every tensor, int == 1 or
divisible by 16), hashes it, checks the kernel's globals and, in the C launcher, asks the driver about
every tensor pointer (`cuPointerGetAttribute`). A Mamba layer's training step runs ~40 launches, so at
short sequences those microseconds, not the GPU, set the time (BENCHMARKS.md, "host time per call").

`fast_launch(kernel)` keeps Triton's own launch for the first call of every specialization (it compiles,
checks pointers and raises Triton's errors) and remembers the compiled kernel under a key at least as
fine as Triton's specialization:

    tensor      -> (dtype, data_ptr % 16 == 0, is_cuda)       Triton: (*dtype, 'D' if 16-byte aligned)
    int         -> (v == 1, v % 16 == 0, fits int32, >= 2**63) Triton: constexpr 1 / (i32|i64|u64, 'D'|'')
    bool, float -> the type                                    Triton: u1 / fp32, not specialized
    None        -> None                                        Triton: constexpr None
    constexpr   -> the value itself;  launch options (num_warps, num_stages, ...) -> their values

Later calls with the same key pass the tensors' data pointers as plain ints to `CompiledKernel.run`, the
call Triton's own `JITFunction.run` makes (same arguments in 3.6 through 3.9), so the launched code is
the code Triton would have launched. Any other argument type, a callable grid, a launch hook (profilers
such as proton set one), tracing by torch.compile, the interpreter (`TRITON_INTERPRET=1`), a Triton
outside the checked versions, `MAMBAKIT_TRITON_LAUNCH=triton` in the environment when mambakit is imported
or a `triton_launch_mode("triton")` block falls back to `kernel[grid](...)`. Compile options Triton reads from the environment (TRITON_DEBUG, ...) are read at
the first call of each specialization only (Triton's own launch rereads them): set them before launching.

    >>> @fast_launch
    ... @triton.jit
    ... def _add_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr): ...
    >>> _add_kernel[(cdiv(n, 1024),)](x, y, n, BLOCK=1024)     # same call as before
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
import triton
from triton.runtime.jit import JITFunction

# the grid arithmetic and the SM count live with the torch-side helpers (launch policies run without Triton);
# re-exported here for the launchers
from .common import cdiv, context_value, next_power_of_2, sm_count

__all__ = ["cdiv", "next_power_of_2", "sm_count", "fast_launch", "triton_launch_mode", "fast_launch_enabled",
           "FastLaunchKernel"]

# Versions whose JITFunction.run / CompiledKernel.run protocol was read and matches this module.
_CHECKED_VERSIONS = ((3, 6), (3, 7), (3, 8), (3, 9))
_VERSION_CHECKED = tuple(int(v) for v in triton.__version__.split(".")[:2]) in _CHECKED_VERSIONS
_MISSING = object()
_INT32_MIN, _INT32_MAX, _UINT64_FROM = -(2**31), 2**31, 2**63


LAUNCH_MODES = ("fast", "triton")
# read once: os.environ.get costs a noticeable part of a cached launch; switch at run time with triton_launch_mode
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "mambakit_triton_launch", default=os.environ.get("MAMBAKIT_TRITON_LAUNCH", "fast"))


@contextlib.contextmanager
def triton_launch_mode(mode: str) -> Iterator[None]:
    """Within the block, `fast_launch` kernels launch the cached way ("fast") or through Triton ("triton").

    Example:
        >>> with triton_launch_mode("triton"):
        ...     y = ssd(x, dt, A, B, C)       # every kernel through Triton's own launch, to compare
    """
    if mode not in LAUNCH_MODES:
        raise ValueError(f"triton_launch_mode: mode must be one of {LAUNCH_MODES}, got {mode!r}")
    with context_value(_MODE, mode):
        yield


def fast_launch_enabled() -> bool:
    """Whether `fast_launch` kernels take the cached path (else every launch is `kernel[grid](...)`)."""
    return _VERSION_CHECKED and _MODE.get() != "triton"


def arg_key(value: Any) -> tuple[Any, Any]:
    """(cache-key part, value handed to the launcher) of one non-constexpr argument.

    The key part is `_MISSING` when the type is not handled. Keys are at least as fine as Triton's
    specialization: two values with one key get one compiled kernel from Triton (tested against
    `native_specialize_impl` in tests/ops/test_triton_launch.py). Tensors are handed over as pointers.
    The generated binders below inline the tensor and int cases and call this for the rest.
    """
    kind = type(value)
    if kind is int:
        return (value == 1, value % 16 == 0, _INT32_MIN <= value < _INT32_MAX, value >= _UINT64_FROM), value
    if isinstance(value, torch.Tensor):
        ptr = value.data_ptr()
        return (value.dtype, ptr % 16 == 0, value.is_cuda), ptr
    if value is None or kind is bool or kind is float:
        return kind, value
    return _MISSING, value


def make_binder(fn: JITFunction):
    """A function taking the kernel's arguments as Triton does (positional or keyword, defaults, launch
    options as extra keywords) and returning (values in signature order, tensors as pointers; cache key),
    or None for an argument type `arg_key` does not handle. Generated per kernel, like Triton's own binder,
    so that Python binds the arguments and no per-argument call is made for tensors and ints. None for a
    kernel whose parameter names clash with the names the binder uses (every launch then goes through Triton)."""
    names = [p.name for p in fn.params]
    if any(name.startswith("_") or name in ("options", "type", "tuple") for name in names):
        return None  # would clash with the binder's own names: every launch goes through Triton
    namespace: dict[str, Any] = {"_Tensor": torch.Tensor, "_arg_key": arg_key, "_MISSING": _MISSING}
    signature = []
    for p in fn.params:
        if p.default is inspect.Parameter.empty:
            signature.append(p.name)
        else:
            namespace[f"_default_{p.name}"] = p.default
            signature.append(f"{p.name}=_default_{p.name}")
    body, keys = [], []
    for p in fn.params:
        a = p.name
        if p.is_constexpr:
            keys.append(a)
            continue
        keys.append(f"_k_{a}")
        body += [
            f"    _t = type({a})",
            "    if _t is _Tensor:",
            f"        _p = {a}.data_ptr()",
            f"        _k_{a} = ({a}.dtype, _p % 16 == 0, {a}.is_cuda)",
            f"        {a} = _p",
            "    elif _t is int:",
            f"        _k_{a} = ({a} == 1, {a} % 16 == 0, {_INT32_MIN} <= {a} < {_INT32_MAX}, {a} >= {_UINT64_FROM})",
            "    else:",
            f"        _k_{a}, {a} = _arg_key({a})",
            f"        if _k_{a} is _MISSING:",
            "            return None",
        ]
    source = "\n".join([
        f"def bind({', '.join(signature + ['**options'])}):",
        *body,
        f"    return ({', '.join(names)},), ({', '.join(keys)}, tuple(options.items()))",
    ])
    exec(compile(source, f"<fast_launch binder of {fn.fn.__name__}>", "exec"), namespace)
    return namespace["bind"]


class FastLaunchKernel:
    """A `triton.jit` kernel whose `kernel[grid](...)` skips Triton's launch path after the first call.

    Attributes other than `[grid]` are the wrapped kernel's (so `kernel.fn`, `kernel.cache` still work).
    """

    def __init__(self, fn: Any):
        self.fn = fn
        self.jit = isinstance(fn, JITFunction)  # False under the interpreter
        self._bind = make_binder(fn) if self.jit else None
        self._compiled: dict[int, dict[tuple, Any]] = {}  # device -> key -> CompiledKernel
        self._device_stream = None  # (get_current_device, get_current_stream), bound on first fast call

    def __getattr__(self, name: str) -> Any:
        if name == "fn":  # not set yet (copy, pickle): no recursion through self.fn
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.launch(grid, args, kwargs)

        return launch

    def launch(self, grid, args: tuple, kwargs: dict):
        """Launch on the current device and stream; returns the compiled kernel like Triton's launch."""
        if (self._bind is None or callable(grid) or not fast_launch_enabled() or _hooked()
                or torch.compiler.is_compiling()):  # torch.compile captures Triton kernels by their own launch
            return self.fn[grid](*args, **kwargs)
        try:
            bound = self._bind(*args, **kwargs)
        except TypeError:  # missing or extra arguments: Triton raises its own error
            bound = None
        if bound is None:
            return self.fn[grid](*args, **kwargs)
        values, key = bound
        if self._device_stream is None:
            from triton.runtime import driver

            self._device_stream = (driver.active.get_current_device, driver.active.get_current_stream)
        get_device, get_stream = self._device_stream
        device = get_device()
        compiled = self._compiled.get(device)
        if compiled is None:
            compiled = self._compiled[device] = {}
        try:
            kernel = compiled.get(key)
        except TypeError:  # an unhashable constexpr
            return self.fn[grid](*args, **kwargs)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)  # compiles, validates pointers, raises Triton's errors
            if kernel is not None and not hasattr(kernel, "result"):
                compiled[key] = kernel
            return kernel
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *values)
        return kernel


def _interpreter_index_fix() -> None:
    """Let Triton 3.6's interpreter use runtime ints as loop bounds under NumPy >= 2.4.

    The interpreter holds every scalar as a 1-element array and converts it with int(array), which NumPy
    2.4 rejects for ndim-1 arrays, so `for c in range(nchunks)` fails on CPU although it compiles fine for
    the GPU (Triton 3.9 squeezes the array first). Reading the element instead is exact. Idempotent.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mambakit_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mambakit_index_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_index_fix()


def _hook_set(hook: Any) -> bool:
    """Whether a launch hook would run: Triton 3.6+ keeps an empty `HookChain` there when none is set."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooked() -> bool:
    runtime = triton.knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def fast_launch(fn: Any) -> FastLaunchKernel:
    """Decorator (outside `@triton.jit`): cached direct launches for the kernel; see the module docstring."""
    return FastLaunchKernel(fn)
