"""A whole training step as one CUDA graph: for models whose steps are bound by the host, not the GPU.

A 2-layer, d_model 64 Mamba issues a few hundred kernels per step (forward, backward, clipping, AdamW) and each
does microseconds of work: the host needs ~12 ms to launch them, the GPU ~2 ms to run them (BENCHMARKS.md,
"synthetic-step"); even the 130M model's eager Mamba-2 step spends longer launching than computing. `CapturedStep`
runs a step function eagerly for its first calls of each input shape, then captures it once and from then on copies
each call's inputs into the captured input tensors and replays the graph: one launch per step. `GraphedTrainStep`
is the plain step on it (zero-grad -> forward + loss under autocast -> backward -> clipping -> optimizer step);
`mambakit train --cuda-graph` (training.loop.Run) builds its own step (gradient accumulation, the learning rate
as a tensor, the non-finite skip on the GPU) on `CapturedStep`.

What a graph fixes at capture, and so what the caller must keep fixed while it is in use:
- the inputs' shapes and dtypes (a new shape, e.g. the next stage of a length curriculum, is captured anew
  after its own eager warm-up steps; the graph of the previous shape is released);
- every number the step reads on the host: AdamW's learning rate and other hyperparameters are read as numbers at
  capture time unless they are tensors (`scheduled_rate` puts the rate in one tensor on the device that the
  caller refills each step: GraphedTrainStep(scheduled_lr=True) + `set_lr`, and Run, use it);
- the parameters' storage (they are updated in place, which is what optimizers do; `load_state_dict` copies
  into them too) and `p.grad` (set to the graph's own tensors: do not replace or free them while the graph lives).

The replay computes what the eager step computes: the same kernels on the same inputs (the Triton backwards sum
with atomics in either case, so two runs agree to rounding, not bit for bit).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

__all__ = ["CapturedStep", "GraphedTrainStep", "batch_tensors", "make_capturable", "portable_optimizer_state",
           "scheduled_rate"]

log = logging.getLogger("mambakit.training")


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


class CapturedStep:
    """`fn(*inputs) -> tuple of tensors`, replayed from a CUDA graph per input signature after `warmup` eager calls.

    fn: the step. It must do all its work on `device` and keep nothing between calls but in-place writes to
        tensors that outlive it (parameters, optimizer state, `p.grad`): the graph replays its kernels, not its
        Python. It may set `p.grad = None` first (`optimizer.zero_grad(set_to_none=True)`): captured, the backward
        then writes the gradients into the graph's own tensors, which stay in `p.grad` from then on.
    inputs: tensors on any device (a CPU batch is copied into the graph's input tensors on `device`; eager calls
        get them as given), the same number and order every call. A call with other shapes or dtypes than the
        graph's is a new signature: `warmup` eager calls of it, then a capture (the old graph is released).
    warmup: eager calls of each signature first, on a side stream as the capture will be (lazy initialisation,
        Triton's compilation and the optimizer's state happen in them).
    before_capture(): runs before each capture (e.g. make the optimizer capturable).
    on_failure(): runs when a capture fails (an op that syncs the host or is not capturable); a warning (logger
        "mambakit.training") says why, and every later call runs eagerly: the run goes on, only slower.

    A call returns fn's outputs: an eager call's as fn returned them, a replay's as copies (the graph's own output
    tensors are overwritten by the next replay). Nothing is read back to the host.
    """

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], device: torch.device | str, *, warmup: int = 3,
                 before_capture: Callable[[], None] | None = None, on_failure: Callable[[], None] | None = None,
                 what: str = "the training step"):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CapturedStep: a CUDA graph needs a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError(f"CapturedStep: warmup must be >= 1 (lazy state is created eagerly), got {warmup}")
        self.fn, self.device, self.warmup, self.what = fn, device, warmup, what
        self.before_capture, self.on_failure = before_capture, on_failure
        self.disabled = False  # set when a capture failed: eager from then on
        self.captures = 0  # graphs captured so far (one per input signature met)
        self.replays = 0
        self._key = None  # shapes and dtypes of the current signature
        self._seen = 0  # eager calls of the current signature
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, ...] = ()
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._side = torch.cuda.Stream(self.device)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.disabled:
            return self.fn(*inputs)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key != self._key:
            self._key, self._seen, self._graph, self._static, self._outputs = key, 0, None, (), ()
        if self._graph is None and self._seen < self.warmup:
            self._seen += 1
            # warm-up on a side stream, as the capture will run on one (lazily created handles land there)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                out = self.fn(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            return out
        if self._graph is None:
            self._capture(inputs)
            if self._graph is None:
                return self.fn(*inputs)
        for static, t in zip(self._static, inputs):
            static.copy_(t, non_blocking=True)
        self._graph.replay()
        self.replays += 1
        return tuple(o.clone() for o in self._outputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.before_capture is not None:
            self.before_capture()
        static = tuple(t.to(self.device, copy=True) for t in inputs)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                outputs = tuple(self.fn(*static))
        except RuntimeError as e:  # e.g. "operation not permitted when stream is capturing"
            self.disabled = True
            if self.on_failure is not None:
                self.on_failure()
            log.warning("%s could not be captured as a CUDA graph (%s); going on without one", self.what,
                        str(e).splitlines()[0])
            return
        self._graph, self._static, self._outputs = graph, static, outputs
        self.captures += 1


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let `optimizer.step()` be captured: AdamW then keeps its step counts on the GPU and never reads them back."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor) and state["step"].device != device:
            state["step"] = state["step"].to(device, torch.float32)


def portable_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """State-dict post-hook: `optimizer.state_dict()` of a graphed run as an eager run's, the learning rate as a
    number (read back once per checkpoint) and capturable off (the state's step counts then load onto any device)."""
    for group in state["param_groups"]:  # copies of the optimizer's groups, made by state_dict()
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = False
    return state


def scheduled_rate(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """Let a captured optimizer step follow a learning-rate schedule: the optimizer becomes capturable, every param
    group reads its rate from the one returned 0-d tensor on `device` (fill it before each step; it starts at the
    first group's rate), and its checkpoints stay an eager run's (`portable_optimizer_state`)."""
    make_capturable(optimizer, device)
    optimizer.register_state_dict_post_hook(portable_optimizer_state)
    rate = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate


class GraphedTrainStep:
    """One training step of `model` with `optimizer`, eager or replayed from a CUDA graph (a `CapturedStep`).

    loss_fn(model, batch) -> scalar loss tensor (its forward; autocast is applied around it here). grad_clip > 0
    clips the global gradient norm before the optimizer step. autocast_dtype: the torch.autocast dtype of the
    forward (None: none). warmup: eager steps of each new batch shape before its capture (lazy initialisation,
    Triton compilation and the optimizer's state happen in them). after_step(): runs after the optimizer step,
    without autograd, and is captured with the rest, e.g. to copy the step's final recurrent states into the
    tensors the next step starts from (state passing: only in-place writes to tensors that outlive the step).

    scheduled_lr: the optimizer reads its rate from a tensor (`scheduled_rate`) that `set_lr(value)` refills, so
    one graph serves every step of a schedule (warm-up, cosine); without it the rate is fixed at capture, and a
    step at another rate must be taken with `eager_step`.

    `step(batch)` returns the step's loss (a detached float32 scalar on the GPU, not yet read back, so no sync).
    If the capture fails (an op that syncs the host or is not capturable), a warning says why, and every later
    step runs eagerly: the run goes on, only slower.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], *, grad_clip: float = 0.0,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, warmup: int = 3,
                 after_step: Callable[[], None] | None = None, scheduled_lr: bool = False):
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
        self._rate = scheduled_rate(optimizer, self.device) if scheduled_lr else None
        self._like: Any = None  # the structure of the batch being stepped on (batch_tensors' inverse needs it)
        self._captured = CapturedStep(
            self._graph_step, self.device, warmup=warmup,
            before_capture=lambda: make_capturable(optimizer, self.device),
            on_failure=lambda: optimizer.zero_grad(set_to_none=True))

    @property
    def disabled(self) -> bool:
        """True once a capture failed: every step runs eagerly."""
        return self._captured.disabled

    @property
    def captures(self) -> int:
        return self._captured.captures

    @property
    def replays(self) -> int:
        return self._captured.replays

    def set_lr(self, value: float) -> None:
        """The learning rate of the following steps, graphed or eager (needs `scheduled_lr=True`)."""
        if self._rate is None:
            raise RuntimeError("GraphedTrainStep.set_lr needs scheduled_lr=True: a graph captured without it keeps the "
                               "rate it was captured with")
        self._rate.fill_(value)

    def _graph_step(self, *tensors: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.eager_step(_with_tensors(self._like, tensors)),)

    def eager_step(self, batch: Any) -> torch.Tensor:
        """One step without a graph (any learning rate, any shape): forward, backward, clipping, update."""
        self.optimizer.zero_grad(set_to_none=True)  # captured: the gradients land in the graph's memory pool
        # the autocast cache holds casts made outside the graph: none may be reused inside a capture
        capturing = torch.cuda.is_current_stream_capturing()
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

    def step(self, batch: Any) -> torch.Tensor:
        """One step through the graph of this batch's shape (captured after `warmup` eager steps of it)."""
        self._like = batch
        return self._captured(*batch_tensors(batch))[0]
