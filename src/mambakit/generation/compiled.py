"""The decode step compiled by `torch.compile` (inductor): the CPU's counterpart of the CUDA-graph decoder.

Shapes (legend): B batch (fixed per decoder), V padded vocab.

On a CPU a decode step of a 24-layer model is some 600 small PyTorch ops (norms, conv window, state update,
gate, dtype casts) around a hundred matrix-vector products. Eager, each op pays its dispatch and Python cost:
at the 130M shape that is about a third of the step (BENCHMARKS.md, "CPU: compiled decoding"). Inductor fuses
the small ops of each layer into a few generated C++ loops and leaves the products to the library kernels
(including `torch._weight_int8pack_mm` for int8 weights), so what remains is close to the time of reading the
weights.

What is compiled is the model's one-token forward at a fixed cache position: the mixers of a Mamba model never
read the position, so the graph does not depend on it, and the decoder advances its cache after each call
(one compiled graph serves every step). The cache's tensors are updated in place, as in eager decoding. Models
with attention layers are refused: their KV cache grows every step, and a graph of fixed shapes would be
compiled again at each length.

Compilation takes seconds to a minute the first time a model and batch size are seen in a process (inductor's
on-disk cache shortens later processes); it pays for itself after a few hundred tokens at the 130M shape. The
compiled code is specialised to `torch.get_num_threads()`: changing the thread count compiles the step again
(once per count), which is why `mambakit generate --compile` keeps the count fixed.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..models import MambaConfig
from ..modules.state import InferenceCache
from .cache import allocate_cache
from .steps import model_device, one_token_logits

__all__ = ["CompiledDecoder", "check_compilable", "compiled_step"]


# model -> {(batch size, mode): its compiled step}. Each is a function of its own: dynamo keeps its compiled graphs
# per code object, at most `recompile_limit` (8) of them, so one code object shared by every model and batch size
# would stop compiling (fullgraph: fail) after 8 in one process (a server's batch-size buckets alone can be 9); a
# second generate() of the same model and batch size finds its graph here instead of compiling again.
_STEPS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, str | None], Callable]]" = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module, batch_size: int, mode: str | None = None) -> Callable:
    """`model`'s compiled one-token step for `batch_size` rows (made on first use):
    (model, tokens (B,), cache) -> logits (B, V); the cache must be at position 1 (see the module docstring)."""
    steps = _STEPS.setdefault(model, {})
    if (batch_size, mode) not in steps:
        own = types.FunctionType(one_token_logits.__code__.replace(), one_token_logits.__globals__,
                                 one_token_logits.__name__)
        steps[batch_size, mode] = torch.compile(own, mode=mode, fullgraph=True, dynamic=False)
    return steps[batch_size, mode]


def check_compilable(model: nn.Module, who: str) -> None:
    """Raise ValueError unless `model` is a CPU Mamba model without attention layers (what a compiled step serves)."""
    config = getattr(model, "config", None)
    if not isinstance(config, MambaConfig) or config.attn_layer_idx:
        # a KV cache grows every step: a graph of fixed shapes would be compiled again at every length
        raise ValueError(f"{who}: only Mamba models without attention layers are compiled (a KV cache grows every "
                         "step); decode eagerly")
    device = model_device(model)
    if device.type != "cpu":
        raise ValueError(f"{who}: compiles CPU decoding; the model is on {device} (on CUDA, CUDA graphs replay "
                         "the step: cuda_graph=True)")


class CompiledDecoder:
    """`decode_one_token` for a fixed batch size, compiled by `torch.compile` (inductor's C++ code on a CPU).

    Args:
        model: a Mamba `MambaLM` on the CPU (no attention layers).
        batch_size: the number of rows; the decoder serves this batch size only.
        dtype: dtype of the conv windows in the cache (default: the model's).
        state_dtype: the SSM states' dtype in the cache (default: float32).
        mode: `torch.compile`'s mode (None: the default).
    Attributes:
        cache: the InferenceCache the step reads and advances. Prefill into it with
            `prefill(model, prompts, cache=decoder.cache.reset())`.

    Example:
        >>> decoder = CompiledDecoder(model, batch_size=1)
        >>> cache, logits = prefill(model, [prompt_ids], cache=decoder.cache.reset())
        >>> for _ in range(100):
        ...     logits = decoder(logits.argmax(-1))      # (1, V) float32
    """

    def __init__(self, model: nn.Module, batch_size: int, *, dtype: torch.dtype | None = None,
                 state_dtype: torch.dtype | None = None, mode: str | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"CompiledDecoder: batch_size must be an int >= 1, got {batch_size!r}")
        check_compilable(model, "CompiledDecoder")
        device = model_device(model)
        self.model = model
        self.batch_size = batch_size
        # normal tensors even when called under inference_mode: a compiled graph cannot take inference tensors
        with torch.inference_mode(False):
            self.cache: InferenceCache = allocate_cache(model, batch_size, dtype=dtype, state_dtype=state_dtype)
            self._tokens_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._step = compiled_step(model, batch_size, mode)
        # compile now, as the CUDA-graph decoder captures in its constructor: the first token pays for it, not the rate
        self(self._tokens_B)
        self.cache.reset()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) float32, advancing `self.cache` by one token."""
        if tokens.shape != self._tokens_B.shape:
            raise ValueError(f"CompiledDecoder: tokens must have shape ({self.batch_size},), got {tuple(tokens.shape)}")
        with torch.inference_mode(False), torch.no_grad():
            self._tokens_B.copy_(tokens)
            # the graph runs at one fixed position (its value is never read by a Mamba mixer), on the same states
            logits = self._step(self.model, self._tokens_B, InferenceCache(self.cache.layers, seqlen_offset=1))
        self.cache.advance(1)
        return logits
