"""Host cost of one call through `ops.common.autograd_op`, per path, on tiny CPU tensors (the op's own work ~0).

The Triton ops go through autograd_op. When no backward can follow it runs the forward implementation alone; with a
backward possible it goes through an autograd Function whose `setup_context` saves the inputs. This times both
paths with a stand-in op of 12 arguments (8 tensors, 4 flags: about the SSD's), median of --repeats runs of
--calls calls each: the wrapper's microseconds per call, which an eager 130M forward pays ~100 times.

Usage (repository root):  python benchmarks/autograd_op_overhead.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mambakit.ops.common import autograd_op


def _fwd_impl(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor, f: torch.Tensor,
              g: torch.Tensor, h: torch.Tensor, flag1: bool, flag2: bool, x1: float, x2: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return a, b  # no work: only the wrapper is timed


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.flags = inputs[8:]


def _backward(ctx, da, db, bwd):
    return (da, db) + (None,) * 10


def _op_impl(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor, f: torch.Tensor,
             g: torch.Tensor, h: torch.Tensor, flag1: bool, flag2: bool, x1: float, x2: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return a.clone(), b.clone()  # a custom op may not return its inputs


_fwd = torch.library.custom_op("mambakit_bench::wrapper_fwd", mutates_args=())(_op_impl)
_fwd.register_fake(lambda a, b, *rest: (torch.empty_like(a), torch.empty_like(b)))
OP = autograd_op("Wrapper", _fwd_impl, _fwd, _setup_context, _backward, None, None)


def _per_call_us(args: tuple, calls: int, grad: bool) -> float:
    with torch.set_grad_enabled(grad):
        t0 = time.perf_counter()
        for _ in range(calls):
            OP(*args)
        return 1e6 * (time.perf_counter() - t0) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    tensors = tuple(torch.zeros(4, requires_grad=(i == 0)) for i in range(8))
    call_args = tensors + (True, False, 0.5, 3)
    result = {}
    for name, grad in (("no backward possible (implementation alone)", False), ("autograd Function", True)):
        _per_call_us(call_args, 200, grad)  # warm-up
        result[name] = round(statistics.median(_per_call_us(call_args, args.calls, grad)
                                               for _ in range(args.repeats)), 2)
    print(json.dumps({"benchmark": "autograd_op_overhead", "torch": torch.__version__, "us_per_call": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
