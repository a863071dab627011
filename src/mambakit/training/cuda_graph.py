"""A whole training step as one CUDA graph: for small models whose steps are bound by the host, not the GPU.

A 2-layer, d_model 64 Mamba issues a few hundred kernels per step (forward, backward, clipping, AdamW) and each
does microseconds of work: the host needs ~12 ms to launch them, the GPU ~2 ms to run them (BENCHMARKS.md,
"synthetic-step"). `GraphedTrainStep` runs the first steps of each batch shape eagerly, then captures
zero-grad -> forward + loss under autocast -> backward -> clipping -> optimizer step once, and from then on copies
each batch into the captured input tensors and replays the graph: one launch per step.

What a graph fixes at capture, and so what the caller must keep fixed while it is in use:
- the batch's shapes and dtypes (a new shape, e.g. the next stage of a length curriculum, is captured anew
  after its own eager warm-up steps; the graph of the previous shape is released);
- the learning rate and the other optimizer hyperparameters (AdamW reads them as numbers at capture time): call
  `step` only where the schedule is constant, e.g. after the warm-up of a constant-rate recipe, and do the other
  steps eagerly with `eager_step`;
- the parameters' storage (they are updated in place, which is what optimizers do; `load_state_dict` copies
  into them too) and `p.grad` (set to the graph's own tensors: do not replace or free them while the graph lives).

The replay computes what the eager step computes: the same kernels on the same inputs (the Triton backwards sum
with atomics in either case, so two runs agree to rounding, not bit for bit).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import torch

__all__ = ["GraphedTrainStep", "batch_tensors"]


def batch_tensors(batch: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a batch: a dataclass of tensors (data.SyntheticBatch), a tuple / list of them, or one."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if dataclasses.is_dataclass(batch):
        return tuple(getattr(batch, f.name) for f in dataclasses.fields(batch))
    return tuple(batch)


def _with_tensors(like: Any, tensors: tuple[torch.Tensor, ...]) -> Any:
    """A batch of `like`'s structure holding `tensors` (the inverse of batch_tensors)."""
    if isinstance(like, torch.Tensor):
        return tensors[0]
    if dataclasses.is_dataclass(like):
        return dataclasses.replace(like, **{f.name: t for f, t in zip(dataclasses.fields(like), tensors)})
    return type(like)(tensors)


class GraphedTrainStep:
    """One training step of `model` with `optimizer`, eager or replayed from a CUDA graph.

    loss_fn(model, batch) -> scalar loss tensor (its forward; autocast is applied around it here). grad_clip > 0
    clips the global gradient norm before the optimizer step. autocast_dtype: the torch.autocast dtype of the
    forward (None: none). warmup: eager steps of each new batch shape before its capture (lazy initialisation,
    Triton compilation and the optimizer's state happen in them). after_step(): runs after the optimizer step,
    without autograd, and is captured with the rest, e.g. to copy the step's final recurrent states into the
    tensors the next step starts from (state passing: only in-place writes to tensors that outlive the step).

    `step(batch)` returns the step's loss (a detached float32 scalar on the GPU, not yet read back, so no sync).
    If the capture fails (an op that syncs the host or is not capturable), a warning says why, and every later
    step runs eagerly: the run goes on, only slower.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], *, grad_clip: float = 0.0,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, warmup: int = 3,
                 after_step: Callable[[], None] | None = None):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params or params[0].device.type != "cuda":
            raise ValueError("GraphedTrainStep: the model's parameters must be on a CUDA device")
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup must be >= 1 (the optimizer's state is created eagerly), "
                             f"got {warmup}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.grad_clip, self.autocast_dtype, self.warmup = grad_clip, autocast_dtype, warmup
        self.after_step = after_step
        self.device = params[0].device
        self.disabled = False  # set when a capture failed: eager from then on
        self.captures = 0  # graphs captured so far (one per batch shape met)
        self.replays = 0
        self._key = None  # shapes and dtypes of the captured batch
        self._seen = 0  # eager steps of the current shape
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, ...] = ()
        self._loss: torch.Tensor | None = None
        self._side = torch.cuda.Stream(self.device)

    def _forward_backward_update(self, batch: Any, capturing: bool) -> torch.Tensor:
        # the autocast cache holds casts made outside the graph: none may be reused inside a capture
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                            cache_enabled=not capturing):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step()
        return loss.detach().float()

    def eager_step(self, batch: Any) -> torch.Tensor:
        """One step without a graph (any learning rate, any shape): forward, backward, clipping, update."""
        self.optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_update(batch, capturing=False)

    def step(self, batch: Any) -> torch.Tensor:
        """One step through the graph of this batch's shape (captured after `warmup` eager steps of it)."""
        tensors = batch_tensors(batch)
        if self.disabled:
            return self.eager_step(batch)
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key != self._key:
            self._key, self._seen, self._graph, self._static, self._loss = key, 0, None, (), None
        if self._graph is None and self._seen < self.warmup:
            self._seen += 1
            # warm-up on a side stream, as the capture will run on one (lazily created handles land there)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                loss = self.eager_step(batch)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            return loss
        if self._graph is None:
            self._capture(batch, tensors)
            if self._graph is None:
                return self.eager_step(batch)
        for static, t in zip(self._static, tensors):
            static.copy_(t, non_blocking=True)
        self._graph.replay()
        self.replays += 1
        return self._loss.clone()

    def _capture(self, batch: Any, tensors: tuple[torch.Tensor, ...]) -> None:
        for group in self.optimizer.param_groups:
            group["capturable"] = True  # AdamW then keeps its step counts on the GPU and never reads them back
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device != self.device:
                state["step"] = state["step"].to(self.device, torch.float32)
        static = tuple(t.to(self.device, copy=True) for t in tensors)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph's memory pool
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                loss = self._forward_backward_update(_with_tensors(batch, static), capturing=True)
        except RuntimeError as e:  # e.g. "operation not permitted when stream is capturing"
            self.disabled = True
            self.optimizer.zero_grad(set_to_none=True)
            print(f"mambakit: the training step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                  "training on without one", file=sys.stderr)
            return
        self._graph, self._static, self._loss = graph, static, loss
        self.captures += 1
