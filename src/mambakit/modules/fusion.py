"""When a fused op may read a submodule's parameters instead of calling it.

The fused mixer ops (`ops.mamba1_inner`, `ops.mamba2_inner`) and the Block's fused add + norm take
weights as tensors, so they compute exactly what the submodule would only when the submodule is a
plain instance of its class (not a peft LoRA layer, a quantized linear or any other subclass), holds
plain tensors (not a tensor subclass such as a quantized or float8 weight) and has no hooks. Anything
else is called as a module: the layers fall back to their unfused path, which honours it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..ops.norm_linear import rows_policy


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def reads_as_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """True when a fused op may use `module`'s parameters directly: exactly `cls`, plain tensors, no hooks."""
    if type(module) is not cls:
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    if _global_hooks():
        return False
    return all(p is None or type(p) in (nn.Parameter, torch.Tensor) for p in module._parameters.values())


def autocast_input_dtype(mixer: nn.Module, x: torch.Tensor, norm_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype autocast will cast the mixer's input `x` to before its first op, or None when that is not known.

    Known for a mixer whose first op on its input is `in_proj` (class attribute `first_op_in_proj`: Mamba1,
    Mamba2), a plain nn.Linear, with no hooks on the mixer, while autocast is on for x's device and the input
    would be a float32 tensor (norm_dtype: the dtype the norm writes by default). The block's norm then writes
    its output in that dtype directly: the values the cast would give, without the cast's pass over them and
    without the float32 copy it keeps for the backward.
    """
    device = x.device.type
    if not getattr(type(mixer), "first_op_in_proj", False) or norm_dtype != torch.float32:
        return None
    if not torch.is_autocast_enabled(device):
        return None
    if mixer._forward_hooks or mixer._forward_pre_hooks or _global_hooks():
        return None
    if not reads_as_plain(getattr(mixer, "in_proj", None), nn.Linear):
        return None
    return torch.get_autocast_dtype(device)


def require_plain_conv(conv: nn.Module, layer: str) -> None:
    """The causal conv is always computed from its weight (the mixers' conv ops carry state and documents across
    calls, which nn.Conv1d cannot): refuse a conv1d that would be skipped rather than ignore it."""
    if not reads_as_plain(conv, nn.Conv1d):
        raise ValueError(f"{layer}: conv1d must be a plain nn.Conv1d with plain weights and no hooks, got "
                         f"{type(conv).__name__}: an adapter, quantized weight or hook on conv1d would be ignored "
                         "by the causal conv op (adapt in_proj, x_proj, dt_proj or out_proj instead)")


# Rows up to which the fused decode step runs. H200, 130M shape, bf16, CUDA graphs (BENCHMARKS.md, 2026-12-02):
# batch 1 fused 0.547 / 0.464 ms per token against 0.677 / 0.526 op by op (Mamba-1 / Mamba-2), batch 64 fused
# 64.9k / 34.5k tok/s against 79.4k / 55.5k (each program of the norm + in_proj kernel re-reads its rows).
# Only those two batch sizes were measured: 8 is a guess on the safe side of the crossover. Again at batch 64 on an
# H100 (session 40, bf16 states, every projection then a Triton kernel): 1.01 ms a step fused against 0.75 op by op.
FUSED_STEP_MAX_BATCH = 8


# Rows from FUSED_STEP_MAX_BATCH + 1 up to which Mamba-1's decode step runs `ops.mamba1_step` (in_proj + conv +
# x_proj's partial sums in one kernel, dt_proj + the state update in another: 4 launches a layer with the block's
# norm and out_proj, against 7). On an H100 (session 38, 130M shape, BENCHMARKS.md) the op took 11.5 / 16.1 / 22.9
# us at 16 / 32 / 64 rows against 15.0 / 16.7 / 18.2 for the five ops it replaces (`gpu_decode_proj.py
# --mamba1-step`), and graphed decoding of the whole model ran 25.3k against 23.0k tokens/s at batch 16 and 44.6k
# against 43.3k at batch 32: it wins up to 32, not at 64.
MAMBA1_STEP_MAX_BATCH = 32


def mamba1_step_allowed(hidden: torch.Tensor) -> bool:
    """Whether Mamba-1's decode step of more rows than the fused step takes runs `ops.mamba1_step`: up to
    MAMBA1_STEP_MAX_BATCH rows, under fused_step_allowed's conditions (no gradients, autocast or torch.compile)."""
    return FUSED_STEP_MAX_BATCH < hidden.shape[0] <= MAMBA1_STEP_MAX_BATCH and _plain_inference(hidden)


def many_rows_step_allowed(hidden: torch.Tensor) -> bool:
    """Whether a decode step of more rows than the fused step takes runs its plain projections through
    `ops.decode_linear` (on Triton the many-rows kernel, `ops/norm_linear/triton_rows_matmul.py`; Mamba-1 also moves
    dt_proj inside the state update): where `rows_policy.takes_rows_matmul` says (off until the kernel is timed
    against cuBLAS; read without importing Triton), otherwise under fused_step_allowed's conditions (no gradients,
    autocast or torch.compile)."""
    rows = hidden.shape[0]
    return FUSED_STEP_MAX_BATCH < rows and rows_policy.takes_rows_matmul(rows) and _plain_inference(hidden)


def fused_step_allowed(hidden: torch.Tensor) -> bool:
    """Whether a decode step may take its fused kernels: they are forward-only, do not re-cast under autocast and
    are no torch.library ops, so with gradients or autocast on, or under torch.compile, the step runs op by op
    (which honours all three); and they win only at small batches (FUSED_STEP_MAX_BATCH)."""
    return hidden.shape[0] <= FUSED_STEP_MAX_BATCH and _plain_inference(hidden)


def _plain_inference(hidden: torch.Tensor) -> bool:
    """No gradients, no autocast on hidden's device, not under torch.compile: where the decode kernels may run."""
    return (not torch.is_grad_enabled() and not torch.is_autocast_enabled(hidden.device.type)
            and not torch.compiler.is_compiling())
