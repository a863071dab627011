"""`ops.common.autograd_op`: which path a call takes (custom op under compile, Function with a backward, the
implementation alone when no backward can follow), and that every path gives the same numbers and gradients."""

import pytest
import torch

from mambakit.ops.common import autograd_op

_calls: list[str] = []


def _fwd_impl(x: torch.Tensor, w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _calls.append("fwd")
    return x * w * scale, (x * x).sum(-1)


def _setup_context(ctx, inputs, output):
    _calls.append("setup")
    x, w, scale = inputs
    ctx.save_for_backward(x, w)
    ctx.scale = scale


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: float) -> list[torch.Tensor]:
    return [dy * w * scale, (dy * x * scale).sum(0)]


def _backward(ctx, dy, _dsq, bwd):
    x, w = ctx.saved_tensors
    dx, dw = bwd(dy, x, w, ctx.scale)
    return dx, dw, None


_fwd_op = torch.library.custom_op("mambakit_test::scaled_mul_fwd", mutates_args=())(_fwd_impl)


@_fwd_op.register_fake
def _(x, w, scale):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


_bwd_op = torch.library.custom_op("mambakit_test::scaled_mul_bwd", mutates_args=())(_bwd_impl)


@_bwd_op.register_fake
def _(dy, x, w, scale):
    return [torch.empty_like(x), torch.empty_like(w)]


op = autograd_op("ScaledMul", _fwd_impl, _fwd_op, _setup_context, _backward, _bwd_impl, _bwd_op)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen_inputs"])
def test_without_a_possible_backward_the_implementation_runs_alone(mode):
    x, w = torch.randn(3, 4), torch.randn(4)
    _calls.clear()
    if mode == "no_grad":
        with torch.no_grad():
            y, sq = op(x.requires_grad_(), w.requires_grad_(), 2.0)
    elif mode == "inference_mode":
        with torch.inference_mode():
            y, sq = op(x, w, 2.0)
    else:
        y, sq = op(x, w, 2.0)  # grad enabled, but nothing requires it
    assert _calls == ["fwd"]  # no Function: setup_context (and what it saves) never ran
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, x.detach() * w.detach() * 2.0, rtol=0, atol=0)
    torch.testing.assert_close(sq, (x.detach() ** 2).sum(-1), rtol=0, atol=0)


def test_with_a_backward_the_function_runs_and_gives_the_gradients():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4)  # one input requiring grad is enough
    _calls.clear()
    y, _ = op(x, w, 2.0)
    assert _calls == ["fwd", "setup"] and type(y.grad_fn).__name__ == "ScaledMulFunctionBackward"
    y.sum().backward()
    torch.testing.assert_close(x.grad, (w * 2.0).expand(3, 4), rtol=0, atol=0)


def test_compiled_calls_take_the_custom_op_with_the_same_numbers_and_gradients():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    eager_y, _ = op(x, w, 2.0)
    eager_y.sum().backward()
    eager = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    compiled = torch.compile(lambda a, b: op(a, b, 2.0)[0], backend="aot_eager", fullgraph=True)
    y = compiled(x, w)
    y.sum().backward()
    torch.testing.assert_close(y, eager_y, rtol=0, atol=0)
    torch.testing.assert_close((x.grad, w.grad), eager, rtol=0, atol=0)
