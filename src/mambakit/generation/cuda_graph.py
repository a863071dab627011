"""The decode step captured into a CUDA graph: one launch per token instead of a few hundred; and a server's
prefill calls of full chunks, captured the same way at bucketed row counts (`ChunkPrefillGraphs`).

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

from ..modules.attention import KVState
from ..modules.state import MixerState
from .cache import InferenceCache, allocate_cache, first_rows, row_buckets
from .steps import decode_one_token, model_device


class CUDAGraphDecoder:
    """`decode_one_token` for a fixed batch size, replayed from a CUDA graph; eager on a CPU model.

    Args:
        model: a MambaLM (on CUDA for a graph; elsewhere the decoder runs the eager step).
        batch_size: the number of rows; the graph serves this batch size only.
        dtype: dtype of the conv windows in the cache (default: the model's).
        warmup_steps: eager steps run on a side stream before capture (Triton compiles and tunes there).
        max_length: for models with attention layers (a hybrid, a Transformer), the most tokens a row will hold,
            prompt (with its left padding) and generated tokens together: their KV caches get exactly this
            capacity (`KVState.fix_capacity`), so the step writes at fixed addresses; a step past it raises.
            Ignored by models without attention, whose cache has one size whatever the length.
    Attributes:
        max_length: the KV caches' fixed capacity (None for a model without attention layers).
        cache: the static InferenceCache the graph reads and advances. Prefill into it with
            `prefill(model, prompts, cache=decoder.cache)` after `decoder.cache.reset()`.

    Example:
        >>> decoder = CUDAGraphDecoder(model, batch_size=1)
        >>> cache, logits = prefill(model, [prompt_ids], cache=decoder.cache.reset())
        >>> for _ in range(100):
        ...     logits = decoder(logits.argmax(-1))      # (1, V); valid until the next call
    """

    def __init__(self, model: nn.Module, batch_size: int, *, dtype: torch.dtype | None = None,
                 state_dtype: torch.dtype | None = None, warmup_steps: int = 2, max_length: int | None = None):
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CUDAGraphDecoder: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        attention = getattr(model.config, "attn_layer_idx", None)
        if attention and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
            # a growing KV cache reallocates, and a graph would go on reading the old buffers: fix its capacity
            raise ValueError(f"CUDAGraphDecoder: a model with attention layers (attn_layer_idx={list(attention)}) "
                             f"needs max_length (an int >= 1: prompt plus generated tokens), the capacity its KV "
                             f"caches are fixed at; got {max_length!r}")
        backbone = getattr(model, "backbone", None)
        if attention and getattr(backbone, "pos_embedding", None) is not None and max_length > backbone.max_positions:
            # a replay skips the forward's host-side check of the position table's length
            raise ValueError(f"CUDAGraphDecoder: max_length {max_length} passes the model's "
                             f"{backbone.max_positions} learned positions (max_position_embeddings)")
        self.model = model
        self.batch_size = batch_size
        self.device = model_device(model)
        self.cache: InferenceCache = allocate_cache(model, batch_size, dtype=dtype, state_dtype=state_dtype)
        # the attention layers' caches at a fixed capacity (the warm-up steps below need room too)
        self._kv_layers = [s for s in self.cache.layers if isinstance(s, KVState)]
        # tokens a row may hold: the KV caches' capacity, or None (a Mamba cache holds any number)
        self.max_length = max(max_length, warmup_steps + 1) if self._kv_layers else None
        for state in self._kv_layers:
            state.fix_capacity(self.max_length)  # max_length is an int: checked above
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
        for state in self._kv_layers:  # raises before the replay when a KV cache is full
            state.advance_slot(1)
        self._tokens_B.copy_(tokens)
        self.graph.replay()
        self.cache.advance(1)  # the replayed step bypasses the model's forward, which would advance it
        return self._logits_BV


class ChunkPrefillGraphs:
    """Prefill calls of exactly `chunk` tokens a row from given states, replayed from CUDA graphs at bucketed
    row counts (what a server's prefill of full chunks is).

    Shapes (legend): n rows of a call, R max rows, b bucket (1, 2, 4, ... R: the smallest >= n), K chunk, V vocab.

    An eager prefill call of a 24-layer model is a few hundred kernel launches and the Python around them: on the
    H200's host 16-29 ms for the 130M shape at 64 rows x 128 tokens, whose GPU time is 8-10 ms (BENCHMARKS.md,
    "the prefill's host cost"). A replay issues the same kernels in one call. The graphs read static buffers:
    the ids (R, K) and a cache of R rows (the entry states, updated in place by the forward). A call copies the
    n rows' ids and entry states into the first n rows, replays bucket b's graph (rows n..b-1 compute on
    whatever those rows hold; nobody reads them) and copies the states and last logits out, so the results are
    the caller's to keep while the next call reuses the buffers. All buckets share one memory pool.

    Args:
        model: a MambaLM without attention layers (a growing KV cache cannot be captured).
        chunk: tokens a row in every call (K).
        max_rows: the most rows of one call (R).
        state_dtype: as `allocate_cache` (the SSM states' dtype; default float32).
        graphs: capture CUDA graphs (default: when the model is on CUDA). False runs the same calls eagerly
            on the same static buffers: the bookkeeping without a GPU (what the CPU tests check).
        warmup_calls: eager calls per bucket on a side stream before its capture (Triton compiles there).

    Example:
        >>> graphs = ChunkPrefillGraphs(model, chunk=128, max_rows=64)
        >>> logits, states = graphs(ids_nK, None)            # n new prompts: (n, V) float32, n-row cache
        >>> rows = [states.index_select(torch.tensor([i])) for i in range(states.batch_size)]
        >>> logits, states = graphs(next_ids_nK, rows)       # their next chunk: one one-row cache per row
    """

    def __init__(self, model: nn.Module, chunk: int, max_rows: int, *, state_dtype: torch.dtype | None = None,
                 graphs: bool | None = None, warmup_calls: int = 2):
        for name, value in (("chunk", chunk), ("max_rows", max_rows), ("warmup_calls", warmup_calls)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ChunkPrefillGraphs: {name} must be an int >= 1, got {value!r}")
        if getattr(model.config, "attn_layer_idx", None):
            raise ValueError(f"ChunkPrefillGraphs: attention layers (attn_layer_idx={model.config.attn_layer_idx}) "
                             "have a growing KV cache that a CUDA graph cannot follow")
        self.model, self.chunk, self.max_rows = model, chunk, max_rows
        self.device = model_device(model)
        if graphs is None:
            graphs = self.device.type == "cuda"
        if graphs and self.device.type != "cuda":
            raise ValueError(f"ChunkPrefillGraphs: graphs=True needs a model on CUDA, this one is on {self.device}")
        self.buckets = row_buckets(max_rows)
        self._ids_RK = torch.zeros(max_rows, chunk, dtype=torch.long, device=self.device)
        self.cache: InferenceCache = allocate_cache(model, max_rows, state_dtype=state_dtype)
        # the first b rows of the cache as one view per bucket (the forward advances a view's position: harmless)
        self._views = {b: first_rows(self.cache, b, 1) for b in self.buckets}
        # one zero row per layer state: the entry state of a new prompt inside a mixed call
        self._zero_rows = [(torch.zeros_like(s.conv_state[:1]), torch.zeros_like(s.ssm_state[:1]))
                           for s in self.cache.layers]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self._capture(warmup_calls)

    @property
    def graphed(self) -> bool:
        """Whether calls replay CUDA graphs."""
        return bool(self.graphs)

    def _forward(self, bucket: int) -> torch.Tensor:
        """The captured call: bucket rows of the static ids from the static states -> last logits (b, V)."""
        return self.model(self._ids_RK[:bucket], cache=self._views[bucket], logits_to_keep=1)[:, -1]

    def _capture(self, warmup_calls: int) -> None:
        pool = None
        with torch.cuda.device(self.device), torch.inference_mode():
            for b in reversed(self.buckets):  # the largest first: the smaller ones fit in its pool
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuBLAS makes handles
                    for _ in range(warmup_calls):
                        self._forward(b)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = (graph, logits)
        self.cache.reset()

    def __call__(self, ids_nK: torch.Tensor, states: "list[InferenceCache | None] | None"
                 ) -> tuple[torch.Tensor, InferenceCache]:
        """One prefill call: ids (n, K) from the rows' entry states -> (last logits (n, V) float32, the n rows'
        states after the chunk as a new `InferenceCache` whose tensors are the caller's).

        states: None when every row is a new prompt (zero states), else one entry per row, in order: the one-row
            cache that row continues, or None for a new prompt.
        The returned cache's position is 0: the caller knows where each row is.
        """
        n = ids_nK.shape[0]
        if ids_nK.dim() != 2 or ids_nK.shape[1] != self.chunk or not 1 <= n <= self.max_rows:
            raise ValueError(f"ChunkPrefillGraphs: ids must be (n, {self.chunk}) with 1 <= n <= {self.max_rows}, "
                             f"got {tuple(ids_nK.shape)}")
        if states is not None and (len(states) != n or any(c is not None and c.batch_size != 1 for c in states)):
            raise ValueError(f"ChunkPrefillGraphs: {n} rows need {n} one-row entry states (or None), got "
                             f"{[None if c is None else c.batch_size for c in states]}")
        bucket = next(b for b in self.buckets if b >= n)
        self._ids_RK[:n].copy_(ids_nK)
        for i, s in enumerate(self.cache.layers):
            if states is None:
                s.conv_state[:n].zero_()
                s.ssm_state[:n].zero_()
            else:  # one launch per state: the rows are concatenated straight into the static rows
                zero_conv, zero_ssm = self._zero_rows[i]
                torch.cat([zero_conv if c is None else c.layers[i].conv_state for c in states], out=s.conv_state[:n])
                torch.cat([zero_ssm if c is None else c.layers[i].ssm_state for c in states], out=s.ssm_state[:n])
        if self.graphs:
            graph, logits_bV = self.graphs[bucket]
            graph.replay()
        else:
            logits_bV = self._forward(bucket)
        out = InferenceCache([MixerState(s.conv_state[:n].clone(), s.ssm_state[:n].clone())
                              for s in self.cache.layers])
        return logits_bV[:n].to(torch.float32, copy=True), out
