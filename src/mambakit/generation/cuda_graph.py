"""The decode step captured into a CUDA graph: one launch per token instead of a few hundred.

Shapes (legend): B batch (fixed per graph), V padded vocab.

A decode step of a 24-layer model is one to a few hundred small kernels (Mamba-1: 4 per layer, Mamba-2: 3,
with the fused step; `mambakit.bench.decode_kernels` counts them) whose launch overhead (a few us each from
Python) is larger than their run time at small batch. `torch.cuda.CUDAGraph` records them
once and replays them with one call. Replay reads and writes fixed addresses, so everything the step
touches is static: the token buffer (B,), the cache (the mixers update it in place) and the logits
buffer (B, V) the graph writes. Sampling stays outside the graph (it is cheap, and its generator
state would otherwise have to be registered with the graph).
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import InferenceCache, allocate_cache
from .steps import decode_one_token, model_device


class CUDAGraphDecoder:
    """`decode_one_token` for a fixed batch size, replayed from a CUDA graph; eager on a CPU model.

    Args:
        model: a MambaLM (on CUDA for a graph; elsewhere the decoder runs the eager step).
        batch_size: the number of rows; the graph serves this batch size only.
        dtype: dtype of the conv windows in the cache (default: the model's).
        warmup_steps: eager steps run on a side stream before capture (Triton compiles and tunes there).
    Attributes:
        cache: the static InferenceCache the graph reads and advances. Prefill into it with
            `prefill(model, prompts, cache=decoder.cache)` after `decoder.cache.reset()`.

    Example:
        >>> decoder = CUDAGraphDecoder(model, batch_size=1)
        >>> cache, logits = prefill(model, [prompt_ids], cache=decoder.cache.reset())
        >>> for _ in range(100):
        ...     logits = decoder(logits.argmax(-1))      # (1, V); valid until the next call
    """

    def __init__(self, model: nn.Module, batch_size: int, *, dtype: torch.dtype | None = None,
                 state_dtype: torch.dtype | None = None, warmup_steps: int = 2):
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CUDAGraphDecoder: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if getattr(model.config, "attn_layer_idx", None):
            # a KV cache grows (reallocates) with the sequence; a graph would keep reading the old buffers
            raise ValueError(f"CUDAGraphDecoder: attention layers (attn_layer_idx={model.config.attn_layer_idx}) "
                             "have a growing KV cache that a CUDA graph cannot follow; decode eagerly (cuda_graph=False)")
        self.model = model
        self.batch_size = batch_size
        self.device = model_device(model)
        self.cache: InferenceCache = allocate_cache(model, batch_size, dtype=dtype, state_dtype=state_dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._tokens_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._logits_BV: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._capture(warmup_steps)

    @property
    def graphed(self) -> bool:
        """Whether calls replay a CUDA graph (False on CPU)."""
        return self.graph is not None

    def _capture(self, warmup_steps: int) -> None:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # warm-up off the capture: first launches compile Triton kernels and create cuBLAS handles
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    decode_one_token(self.model, self._tokens_B, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._logits_BV = decode_one_token(self.model, self._tokens_B, self.cache)
            self.graph = graph
            # the warm-up advanced the states; capture itself runs nothing
            self.cache.reset()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) float32, advancing `self.cache` by one token.

        With a graph, the returned tensor is the graph's static output: the next call overwrites it.
        """
        if self.graph is None:
            return decode_one_token(self.model, tokens, self.cache)
        self._tokens_B.copy_(tokens)
        self.graph.replay()
        self.cache.advance(1)  # the replayed step bypasses the model's forward, which would advance it
        return self._logits_BV
