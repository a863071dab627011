"""The cached direct Triton launch (ops/triton_launch.py): keys, binding, fallbacks, and on the GPU the launch itself.

The key must never be coarser than Triton's specialization, or a kernel compiled for 16-byte-aligned
pointers would be launched on an unaligned one: checked against Triton's own `native_specialize_impl`.
"""

import itertools

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction

from mambakit.ops.triton_launch import (
    _MISSING,
    FastLaunchKernel,
    _hooked,
    arg_key,
    cdiv,
    fast_launch,
    fast_launch_enabled,
    make_binder,
    next_power_of_2,
    triton_launch_mode,
)

GPU = torch.cuda.is_available()


def _scale_add(x_ptr, y_ptr, out_ptr, n, alpha, shift=0.0, BLOCK: tl.constexpr = 64, HAS_Y: tl.constexpr = True):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * alpha + shift
    if HAS_Y:
        acc += tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _triton_spec(value):
    return native_specialize_impl(BaseBackend, value, False, True, True)


def _values():
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, 2**40,
            2**63 - 1, 2**63, 2**63 + 16]
    base = torch.zeros(64)
    tensors = [base, base[1:], base[4:], base[3:], torch.zeros(8, dtype=torch.bfloat16),
               torch.zeros(16, dtype=torch.bfloat16)[1:], torch.zeros(4, dtype=torch.int32),
               torch.zeros(4, dtype=torch.float64)]
    return ints + [True, False, 0.5, 1.0, -3.0, None] + tensors


def _one(a):
    pass


def test_keys_are_at_least_as_fine_as_triton_specialization():
    """Equal keys imply equal Triton specializations, for arg_key and for the generated binder's inlined cases."""
    bind = make_binder(JITFunction(_one))
    values = _values()
    keyed = [(arg_key(v)[0], bind(v)[1], _triton_spec(v)) for v in values]
    for k, b, _ in keyed:
        assert k is not _MISSING and b[0] == k
    for (ka, _, sa), (kb, _, sb) in itertools.combinations(keyed, 2):
        if ka == kb:
            assert sa == sb, (ka, sa, sb)


def test_arg_key_hands_tensors_over_as_pointers():
    t = torch.zeros(8)[2:]
    key, value = arg_key(t)
    assert value == t.data_ptr() and key == (torch.float32, t.data_ptr() % 16 == 0, False)
    assert arg_key(7) == ((False, False, True, False), 7)
    assert arg_key("text")[0] is _MISSING and arg_key((1, 2))[0] is _MISSING
    param = torch.nn.Parameter(torch.zeros(4))  # a Tensor subclass: the binder's generic branch
    assert make_binder(JITFunction(_one))(param)[0] == (param.data_ptr(),)


def test_binder_orders_arguments_and_keys_constexprs_and_options():
    bind = make_binder(JITFunction(_scale_add))
    x, y, out = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    values, key = bind(x, y, out, 64, alpha=2.0, BLOCK=32, num_warps=2)
    assert values == (x.data_ptr(), y.data_ptr(), out.data_ptr(), 64, 2.0, 0.0, 32, True)
    assert key[-3:] == (32, True, (("num_warps", 2),))  # constexprs by value, then the launch options
    # Another constexpr value or option: another key.
    _, key_block = bind(x, y, out, 64, alpha=2.0, BLOCK=64, num_warps=2)
    _, key_warps = bind(x, y, out, 64, alpha=2.0, BLOCK=32, num_warps=4)
    assert len({key, key_block, key_warps}) == 3
    # n and alpha changed within one specialization, positional or keyword: the same key.
    assert bind(x, y, out, 48, 5.0, BLOCK=32, num_warps=2)[1] == key
    assert bind(x_ptr=x, y_ptr=y, out_ptr=out, n=80, alpha=1.0, BLOCK=32, num_warps=2)[1] == key
    # Unaligned pointer, n == 1, the default of a constexpr overridden: new keys.
    assert bind(x[1:], y, out, 64, alpha=2.0, BLOCK=32, num_warps=2)[1] != key
    assert bind(x, y, out, 1, alpha=2.0, BLOCK=32, num_warps=2)[1] != key
    assert bind(x, y, out, 64, alpha=2.0, BLOCK=32, HAS_Y=False, num_warps=2)[1] != key


def test_binder_declines_what_it_cannot_key():
    bind = make_binder(JITFunction(_scale_add))
    x = torch.zeros(64)
    with pytest.raises(TypeError):  # alpha missing: the launch falls back and Triton raises its own error
        bind(x, x, x, 64)
    assert bind(x, x, x, "64", 1.0) is None  # a type Triton specializes its own way
    with pytest.raises(TypeError):
        bind(x, x, x, 64, 1.0, 0.0, 64, True, "extra")


def _clashing(_a, options):
    pass


def _shadowing(x_ptr, type):
    pass


def test_kernel_with_clashing_names_always_uses_tritons_launch():
    for fn in (_clashing, _shadowing):
        assert make_binder(JITFunction(fn)) is None
        assert FastLaunchKernel(JITFunction(fn))._bind is None


@pytest.mark.skipif(GPU, reason="the interpreter runs only on machines without a GPU in this suite")
def test_interpreted_kernel_launches_through_triton():
    kernel = fast_launch(triton.jit(_scale_add))
    assert not kernel.jit and kernel._bind is None  # TRITON_INTERPRET=1 (tests/conftest.py): Triton's own launch
    x, y = torch.randn(100), torch.randn(100)
    out = torch.full((100,), float("nan"))
    kernel[(triton.cdiv(100, 32),)](x, y, out, 100, 3.0, shift=0.25, BLOCK=32)
    torch.testing.assert_close(out, 3.0 * x + 0.25 + y)


def test_launch_mode_switch():
    assert fast_launch_enabled()  # the default (MAMBAKIT_TRITON_LAUNCH unset when the suite imports mambakit)
    with triton_launch_mode("triton"):
        assert not fast_launch_enabled()
        with triton_launch_mode("fast"):
            assert fast_launch_enabled()
        assert not fast_launch_enabled()
    assert fast_launch_enabled()
    with pytest.raises(ValueError, match="mode must be one of"):
        with triton_launch_mode("cached"):
            pass


def test_launch_hooks_force_tritons_launch():
    """A profiler's launch hook must see every launch, so a set hook turns the cached path off."""
    runtime = triton.knobs.runtime
    assert not _hooked()  # Triton 3.6+ holds an empty HookChain when no hook is set

    def hook(metadata):
        return None

    chain = runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert _hooked()
        finally:
            chain.remove(hook)
        assert not _hooked()
    else:  # older Triton: a plain attribute
        runtime.launch_enter_hook = hook
        try:
            assert _hooked()
        finally:
            runtime.launch_enter_hook = None


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_fast_launch_matches_triton_launch_on_gpu():
    kernel = fast_launch(triton.jit(_scale_add))
    assert kernel.jit and fast_launch_enabled()
    n = 1000
    base = torch.randn(4 * n + 16, device="cuda", dtype=torch.bfloat16)
    for offset, n_run, has_y, block in [(0, n, True, 64), (0, n, True, 64), (3, n - 5, True, 64), (0, n, False, 128),
                                        (8, 1, True, 64), (0, n, True, 64), (5, n, True, 64)]:
        x = base[offset:offset + n_run]
        y = base[2 * n:2 * n + n_run]
        out = torch.full((n_run,), float("nan"), device="cuda", dtype=torch.float32)
        alpha = float(torch.rand(()).item()) + 0.5
        kernel[(triton.cdiv(n_run, block),)](x, y, out, n_run, alpha, shift=-0.5, BLOCK=block, HAS_Y=has_y)
        want = x.float() * alpha - 0.5 + (y.float() if has_y else 0.0)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # Repeats of one specialization hit the cache; each new specialization added one entry: aligned; x
    # unaligned (n - 5 and n both not multiples of 16); HAS_Y off; n == 1.
    assert len(kernel._compiled[torch.cuda.current_device()]) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_fast_launch_uses_current_stream_and_graphs():
    kernel = fast_launch(triton.jit(_scale_add))
    x, y = torch.randn(512, device="cuda"), torch.randn(512, device="cuda")
    out = torch.empty(512, device="cuda")
    kernel[(8,)](x, y, out, 512, 1.0)  # first call: Triton's launch, compiles
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            kernel[(8,)](x, y, out, 512, 2.0)  # cached launch on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 2.0 * x + y)


def test_host_grid_helpers_match_triton():
    for n in [0, 1, 2, 3, 4, 5, 7, 8, 9, 255, 256, 257, 1000, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in [1, 2, 3, 16, 64, 255]:
            assert cdiv(n, d) == triton.cdiv(n, d)


@pytest.mark.skipif(GPU, reason="the interpreter runs only on machines without a GPU in this suite")
def test_interpreter_takes_runtime_loop_bounds():
    """A loop over a runtime int (NumPy >= 2.4 rejects Triton 3.6's int(array)): the package's fix applies."""

    @triton.jit
    def _count(out_ptr, n):
        acc = tl.zeros((1,), dtype=tl.float32)
        for _ in range(n):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, 1), acc)

    out = torch.zeros(1)
    fast_launch(_count)[(1,)](out, 7)
    assert out.item() == 7.0


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records what the cached path hands its launcher."""

    function, packed_metadata = "fn-handle", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeJit:
    """Stands in for the JITFunction behind a FastLaunchKernel: counts Triton's own launches."""

    def __init__(self):
        self.launches = 0
        self.compiled = _FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self.compiled
        return launch


def _fake_kernel():
    kernel = FastLaunchKernel(JITFunction(_scale_add))  # the real binder of a real signature
    kernel.fn = _FakeJit()
    kernel._device_stream = (lambda: 0, lambda device: 777)  # device 0, stream handle 777
    return kernel


def test_cached_path_hands_pointers_grid_and_stream_to_the_launcher():
    kernel = _fake_kernel()
    x, y, out = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    assert kernel[(3,)](x, y, out, 64, 2.0, BLOCK=32) is kernel.fn.compiled  # miss: Triton's launch
    assert kernel.fn.launches == 1 and kernel.fn.compiled.runs == []
    kernel[(5, 2)](x, y, out, 48, 3.0, BLOCK=32)  # same specialization: the launcher, directly
    assert kernel.fn.launches == 1
    (run,) = kernel.fn.compiled.runs
    assert run[:9] == (5, 2, 1, 777, "fn-handle", "metadata", None, None, None)
    assert run[9:] == (x.data_ptr(), y.data_ptr(), out.data_ptr(), 48, 3.0, 0.0, 32, True)
    kernel[(1,)](x[1:], y, out, 48, 3.0, BLOCK=32)  # unaligned x: a new specialization, Triton's launch
    assert kernel.fn.launches == 2 and len(kernel.fn.compiled.runs) == 1


@pytest.mark.parametrize("switch", ["launch mode", "hook", "compiling", "callable grid"])
def test_fallbacks_use_tritons_launch(switch, monkeypatch):
    kernel = _fake_kernel()
    x = torch.zeros(64)
    kernel[(1,)](x, x, x, 64, 1.0)  # compiled and cached
    grid = (1,)
    if switch == "launch mode":
        monkeypatch.setattr("mambakit.ops.triton_launch.fast_launch_enabled", lambda: False)
    elif switch == "hook":
        monkeypatch.setattr("mambakit.ops.triton_launch._hooked", lambda: True)
    elif switch == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        grid = lambda meta: (1,)  # noqa: E731
    kernel[grid](x, x, x, 64, 1.0)
    assert kernel.fn.launches == 2 and kernel.fn.compiled.runs == []
