"""Shared test helpers: one `assert_close` for every numerical comparison, and gradient plumbing.

Tolerances follow DESIGN.md: float32 paths stay under 1e-4 of the reference's scale; low
precision paths are held to at most twice the error that PyTorch itself makes in that dtype
against the float32 reference (see `low_precision_tolerance`).
"""

from __future__ import annotations

import os
import subprocess
import sys

from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "tensor", rel: float = 1e-4,
                 atol: float = 0.0) -> None:
    """Assert max|actual - expected| <= rel * max|expected| + atol; NaN/inf never pass.

    On failure the message names the tensor and prints the worst element, its index, and both scales.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64).cpu()
    e = expected.detach().to(a.dtype).cpu()
    assert torch.isfinite(e).all(), f"{name}: the reference itself is not finite"
    bad = ~torch.isfinite(a)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values, first at {tuple(bad.nonzero()[0].tolist())}"
    if a.numel() == 0:
        return
    err = (a - e).abs()
    scale = float(e.abs().max())
    tol = rel * scale + atol
    worst = float(err.max())
    if worst > tol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max abs error {worst:.3e} > tol {tol:.3e} (rel {rel:g} x scale {scale:.3e} + atol {atol:g}); "
            f"worst at {idx}: got {a[idx].item()}, expected {e[idx].item()}"
        )


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| in float64 (for measuring PyTorch's own low-precision error)."""
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())


def low_precision_tolerance(torch_lowp: torch.Tensor, reference: torch.Tensor, factor: float = 2.0,
                            floor_rel: float = 1e-3) -> float:
    """Absolute tolerance for a low-precision fast path: `factor` x PyTorch's own error, with a small floor."""
    return factor * max_error(torch_lowp, reference) + floor_rel * float(reference.detach().abs().max())


def run_with_grads(fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]], inputs: dict[str, torch.Tensor | None],
                   upstream: Sequence[torch.Tensor], grad_names: Sequence[str]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Call fn(**inputs) on detached leaf copies, backpropagate `upstream`, return outputs and named grads.

    Only inputs listed in `grad_names` require grad; a missing gradient (None) is returned as zeros,
    so a path that silently drops a gradient fails the comparison instead of passing.
    """
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if k in grad_names:
                v.requires_grad_(True)
        leaves[k] = v
    out = fn(**leaves)
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if o is not None]
    used = [(o, g) for o, g in zip(outs, upstream) if o.requires_grad]
    torch.autograd.backward([o for o, _ in used], [g.to(o.dtype) for o, g in used])
    grads = {k: (leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k])) for k in grad_names}
    return [o.detach() for o in outs], grads


def saved_bytes(fn: Callable[[], object], distinct_storages: bool = False) -> tuple[object, int]:
    """fn()'s result and the bytes autograd saved for its backward (tensors saved inside a checkpointed
    region are not kept, so they are not counted).

    distinct_storages: count each underlying storage once, whole (views of one tensor share it), i.e. the
    memory the saved tensors really keep; by default every saved tensor counts its own elements."""
    sizes: dict[int, int] = {}
    total = 0

    def pack(t):
        nonlocal total
        if distinct_storages:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        else:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total + sum(sizes.values())


def use_foreach_adamw(run) -> None:
    """Give a training `Run` foreach AdamW over its own param groups: what FSDP2's sharded parameters get, and the
    CPU's optimizer before session 32 (no `found_inf`: the loop must read each step's flag on the host)."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in run.optimizer.param_groups]
    run.optimizer = torch.optim.AdamW(groups, lr=run.cfg.lr, foreach=True)


def save_foreach_checkpoint(cfg, steps: int = 3) -> None:
    """Train `steps` steps of `cfg` with foreach AdamW (`use_foreach_adamw`) and save: a checkpoint whose param
    groups say fused=False, as a CPU run's did before session 32."""
    from mambakit.training import Run

    run = Run(cfg)
    try:
        use_foreach_adamw(run)
        for _ in range(steps):
            run.step()
        run.save()
    finally:
        run.close()


def run_sass_script(script: str, *flags: str) -> subprocess.CompletedProcess:
    """Run `benchmarks/<script>` (an sm_90 compile on the CPU: `scan_bwd_sass.py`, `scan_fwd_sass.py`,
    `ssd_sass.py`) from the repository root without TRITON_INTERPRET, which would keep Triton from compiling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, f"benchmarks/{script}", *flags], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=600)
