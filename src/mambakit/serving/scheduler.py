"""Continuous batching over cache slots: requests join and leave a running decode batch at any step.

Shapes (legend): S max batch size (slots), B running rows, V padded vocab, K prefill chunk length,
k decode steps per host round trip.

A Mamba request's whole state is one row of an `InferenceCache`, a fixed size whatever its length.
The scheduler owns one cache of S slots. Running sequences occupy slots 0..B-1 (kept contiguous: when
a sequence ends, the last running row moves into its slot, one row copy), so a decode step is one
model call over the first B slots (on CUDA, a graph replay of the smallest captured bucket >= B).

One thread runs the loop; each iteration:
  1. takes new requests and cancellations from the HTTP side, and admits waiting requests (oldest
     first) while their choices fit in the slots not yet taken;
  2. runs one prefill call: the next chunk (at most K tokens, ending at a multiple of K or the prompt's
     end) of every admitted request whose chunk has the same length as the oldest one's, up to
     `max_prefill_tokens`, as one batch; a request whose prompt is done joins the running batch: its
     state is copied into n slots (n choices) and its last logits become those rows' next logits; on CUDA
     a call of full chunks replays a CUDA graph captured at a row bucket (`ChunkPrefillGraphs`): one launch
     instead of a whole forward's few hundred, whose host time the decode batch would otherwise wait for;
  3. launches k decode steps for the running rows (per-row settings and seeds, `BatchSampler`; the
     tokens stay on the device between steps, then go to the host with a non-blocking copy), and only
     then reads the tokens of the block launched in the previous iteration: the host's work (text, stop
     sequences, events, freeing the slots of finished rows) runs while the device computes the next
     block. On a CPU the calls are synchronous and the order changes nothing.
Prefill chunks therefore interleave with decode steps: a long prompt delays the running batch by one
chunk per iteration, never by its whole length. A row that finished (EOS, a stop sequence, max_tokens)
keeps computing until the host has read its block and compacted the batch, up to 2k - 1 steps later;
those tokens are dropped. That waste pays for reading the device once per k steps, off its critical path.

Prefill chunks end at the multiples of K (and at the prompt's end), and the state at each of those
ends goes into the `PrefixCache`; a request whose prompt starts with a stored prefix starts from the
copy and runs the same chunks after it, so its output is what it would be without the store: bitwise
when its chunks are computed in batches of the same composition (always so for a request alone); a
different batch composition changes float rounding of the matrix products (as in any batched decode).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..generation import ChunkPrefillGraphs, InferenceCache, allocate_cache, decode_one_token
from ..generation.cache import first_rows, row_buckets
from ..generation.compiled import check_compilable, compiled_step
from ..modules import MixerState
from .heap import gc_pauses
from .metrics import SCHEDULER_PHASES, Metrics
from .prefix_cache import PrefixCache, prefix_digest
from .sampler import BatchSampler, RowParams, to_device, token_logprobs
from .text import TextStream

logger = logging.getLogger("mambakit.serving")


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue requests already (HTTP 429)."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model (None for a prompt's first token) and the `top` best."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one scheduler step produced for one choice of a request (delivered to the request's sink)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None  # "engine_unavailable": the engine process is gone (HTTP 503, not 500)


@dataclass(eq=False)  # identity: two requests with the same settings are still two requests
class GenerationRequest:
    """One prompt and its n choices, as the HTTP layer submits it.

    sink: called from the scheduler thread with a list of Events (must not block); every choice gets
    exactly one event with a finish_reason ("stop", "length", "abort" when cancelled or shut down), or
    an event with `error` set.
    flush: optional, called from the scheduler thread once per loop iteration after the sinks of that
    iteration ran (once per distinct callable, however many requests share it): a sink may only queue its
    events, and `flush` wakes their reader once for the whole iteration instead of once per request.
    """

    prompt_ids: list[int]
    max_tokens: int
    choices: list[RowParams]
    sink: Callable[[list[Event]], None]
    stops: list[str] = field(default_factory=list)
    flush: Callable[[], None] | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # filled by the scheduler
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prefix_hit_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprob_list: list[TokenLogprob] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    engine_id: int | None = None  # its id across the process boundary (`EngineClient`), None in one process

    @property
    def n(self) -> int:
        return len(self.choices)


@dataclass
class _Seq:
    request: GenerationRequest
    index: int
    params: RowParams
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    launched: int = 0  # tokens sampled on the device so far (ahead of `tokens` while a block is in flight)


@dataclass
class _Block:
    """k decode steps launched for `seqs` (slot order at launch): their tokens on their way to the host."""

    seqs: list[_Seq]
    tokens_Bk: torch.Tensor
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # chosen (B, k), top values / ids (B, k, t)
    ready: "torch.cuda.Event | None"


@dataclass
class _Prefill:
    request: GenerationRequest
    cache: InferenceCache | None  # None: the zero state of a new prompt, allocated with its batch's
    pos: int = 0
    logits: torch.Tensor | None = None  # (1, V) after the last prefilled token
    digest: object = None  # blake2b state over ids[:pos]


def detokenize_event(text: TextStream, token_ids: list[int], finish_reason: str | None) -> str:
    """The text of one event of a row without stop sequences, from its tokens and finish reason.

    Such a row ends with "stop" only at EOS, whose token is not part of the text; an ended row releases the
    text held back (an incomplete character). An aborted row's event has no tokens and no text.
    """
    if finish_reason == "abort":
        return ""
    out = text.push_many(token_ids[:-1] if finish_reason == "stop" else token_ids)
    if finish_reason is not None:
        out += text.finish()
    return out


class SlotDecoder:
    """The decode step over slots 0..B-1 of a cache of S slots; CUDA graphs at bucketed batch sizes on CUDA, or
    on a CPU with `compile` the step compiled by torch.compile at the same buckets (`generation/compiled.py`).

    Each bucket b (1, 2, 4, ... up to S) is captured (compiled) once, over the first b slots of the same cache
    (views: every graph reads and writes the same memory), and a step of B rows replays the smallest
    bucket >= B; rows B..b-1 compute on free slots, whose contents nobody reads.
    """

    def __init__(self, model: nn.Module, cache: InferenceCache, cuda_graph: bool, compile: bool = False):
        self.model, self.cache = model, cache
        slots = cache.batch_size
        device = cache.layers[0].ssm_state.device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.compiled: dict[int, Callable] = {}
        self.buckets: list[int] = []
        if compile:
            check_compilable(model, "Scheduler(compile=True)")
        if (cuda_graph and device.type == "cuda") or compile:
            self.buckets = row_buckets(slots)
            with torch.inference_mode(False):  # a compiled graph cannot take inference tensors
                self._tokens_S = torch.zeros(slots, dtype=torch.long, device=device)
        if compile:
            self._compile()
        elif self.buckets:
            self._capture(device)

    def _compile(self) -> None:
        for b in self.buckets:  # compile every bucket now, not while requests wait
            self.compiled[b] = compiled_step(self.model, b)
            self._run_compiled(b, b)
        self.cache.reset()  # the warm-up advanced the states

    def _run_compiled(self, bucket: int, rows: int) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            # at the one position a compiled step runs at (never read by a mixer)
            return self.compiled[bucket](self.model, self._tokens_S[:bucket], first_rows(self.cache, bucket, 1))[:rows]

    def _capture(self, device: torch.device) -> None:
        with torch.cuda.device(device):
            for b in self.buckets:
                view = first_rows(self.cache, b)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles and tunes here
                    for _ in range(2):
                        decode_one_token(self.model, self._tokens_S[:b], view)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = decode_one_token(self.model, self._tokens_S[:b], view)
                self.graphs[b] = (graph, logits)
            self.cache.reset()  # the warm-up advanced the states

    def __call__(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) float32, advancing slots 0..B-1 by one token."""
        rows = tokens_B.shape[0]
        if not self.buckets:
            return decode_one_token(self.model, tokens_B, first_rows(self.cache, rows))
        bucket = next(b for b in self.buckets if b >= rows)
        self._tokens_S[:rows].copy_(tokens_B)
        if self.compiled:
            return self._run_compiled(bucket, rows)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:rows]


def check_servable(model: nn.Module) -> None:
    """Raise ValueError unless `model` is what the scheduler serves: a language model of Mamba layers only. Its
    slots hold each sequence's fixed-size recurrent state; an attention layer's KV cache (a Transformer's, a
    hybrid's) grows with the sequence, which neither the slots nor the captured decode graphs follow."""
    attention = getattr(getattr(model, "config", None), "attn_layer_idx", None)
    if attention:
        raise ValueError(f"the server decodes Mamba models without attention layers; this one has attention at layers "
                         f"{list(attention)}, whose KV cache grows with each sequence (generate from it with "
                         "`mambakit generate` or mambakit.generation.generate)")


class Scheduler:
    """Continuous batching of `GenerationRequest`s over `max_batch_size` cache slots, on its own thread.

    Args:
        model: a MambaLM in eval mode.
        tokenizer: its tokenizer (decodes the text of each choice, knows the end-of-document id).
        max_batch_size: cache slots, the most sequences decoded together.
        max_queue: requests waiting for a slot beyond which `submit` raises QueueFullError.
        prefill_chunk: tokens per prefill call (K), and the spacing of stored prefix states.
        prefix_cache_bytes: bytes of the prefix-state store (0: no reuse).
        cuda_graph: capture the decode step at bucketed batch sizes (CUDA only).
        prefill_graphs: replay prefill calls of full chunks (K tokens a row) from CUDA graphs captured at row
            counts 1, 2, 4, ... up to min(max_batch_size, max_prefill_tokens // K) (`ChunkPrefillGraphs`; a
            prompt's last, shorter chunk runs eagerly). Default: with `cuda_graph` on a CUDA model without
            attention layers. On a CPU model True runs the same static-buffer calls eagerly (for tests).
        compile: compile the decode step with torch.compile at the same bucketed batch sizes (CPU models; every
            bucket compiles here, seconds each).
        max_model_len: prompt + new tokens per sequence; a sequence that reaches it ends ("length").
        decode_steps: decode steps per host round trip (k); 1 hands every token over at once.
        max_prefill_tokens: tokens in one batched prefill call (at least one chunk always runs).
        detokenize: False leaves the text of rows without stop sequences to the reader of the events (their
            events carry token ids only; `EngineClient` makes the text in the HTTP process). Rows with stop
            sequences are always detokenized here: where their text matches a stop decides where they end.

    Example:
        >>> sched = Scheduler(model, tokenizer, max_batch_size=8).start()
        >>> sched.submit(GenerationRequest(prompt_ids=[0, 104, 105], max_tokens=16, choices=[RowParams()],
        ...                                sink=print))
        >>> sched.stop()
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch_size: int = 32, max_queue: int = 256,
                 prefill_chunk: int = 64, prefix_cache_bytes: int = 256 << 20, cuda_graph: bool = True,
                 max_model_len: int = 16384, state_dtype: torch.dtype | None = None, decode_steps: int = 1,
                 max_prefill_tokens: int = 8192, detokenize: bool = True, compile: bool = False,
                 prefill_graphs: bool | None = None):
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 0),
                                 ("prefill_chunk", prefill_chunk, 1), ("max_model_len", max_model_len, 2),
                                 ("decode_steps", decode_steps, 1), ("max_prefill_tokens", max_prefill_tokens, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Scheduler: {name} must be an int >= {low}, got {value!r}")
        if not isinstance(compile, bool):
            raise ValueError(f"Scheduler: compile must be a bool, got {compile!r}")
        if prefill_graphs is not None and not isinstance(prefill_graphs, bool):
            raise ValueError(f"Scheduler: prefill_graphs must be a bool or None, got {prefill_graphs!r}")
        check_servable(model)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_chunk, self.max_model_len = prefill_chunk, max_model_len
        self.decode_steps, self.max_prefill_tokens = decode_steps, max_prefill_tokens
        self.detokenize = detokenize
        self.device = next(model.parameters()).device
        self.state_dtype = state_dtype
        self.vocab, self.real_vocab = model.config.padded_vocab_size, model.config.vocab_size
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.metrics = Metrics()
        self._gc = gc_pauses()
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.cache = allocate_cache(model, max_batch_size, state_dtype=state_dtype, device=self.device)
        with torch.inference_mode():
            self.decoder = SlotDecoder(model, self.cache, cuda_graph, compile)
        self.prefill_graphs: ChunkPrefillGraphs | None = None
        asked = prefill_graphs
        if prefill_graphs is None:
            prefill_graphs = (cuda_graph and self.device.type == "cuda"
                              and not getattr(model.config, "attn_layer_idx", None))
        if prefill_graphs:
            try:
                self.prefill_graphs = ChunkPrefillGraphs(
                    model, prefill_chunk, min(max_batch_size, max(1, max_prefill_tokens // prefill_chunk)),
                    state_dtype=state_dtype, graphs=self.device.type == "cuda")
            except (RuntimeError, ValueError) as err:
                if asked:  # asked for by name: say so
                    raise
                # on by default: a model whose forward cannot be captured still serves, with eager prefill calls
                logger.warning("prefill calls run eagerly: capturing them failed (%s: %s)", type(err).__name__, err)
        self.sampler = BatchSampler(max_batch_size, self.vocab, self.real_vocab, self.device)
        self._logits_SV = torch.zeros(max_batch_size, self.vocab, dtype=torch.float32, device=self.device)
        self._steps_B = torch.zeros(0, dtype=torch.long, device=self.device)
        self.running: list[_Seq] = []
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.prefilling: list[_Prefill] = []
        self._dirty = True
        self._pending: _Block | None = None
        self._phases = dict.fromkeys(SCHEDULER_PHASES, 0.0)  # this iteration's seconds per phase
        self._phase_end = time.perf_counter()
        self._lock = threading.Condition()
        self._inbox: list[GenerationRequest] = []
        self._cancels: list[GenerationRequest] = []
        self._flushes: dict[Callable[[], None], None] = {}  # the `flush` of requests that got events (ordered set)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- the HTTP side (any thread) ----

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="mambakit-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, requests: list[GenerationRequest]) -> None:
        """Queue requests (all or none); QueueFullError when max_queue would be exceeded."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            if len(self.waiting) + len(self._inbox) + len(requests) > self.max_queue:
                self.metrics.add("requests_rejected_total", len(requests))
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._inbox.extend(requests)
            self.metrics.add("requests_total", len(requests))
            self._lock.notify()

    async def submit_async(self, requests: list[GenerationRequest]) -> None:
        """`submit`, for the HTTP app (which awaits it: `EngineClient.submit_async` waits for the engine's answer)."""
        self.submit(requests)

    async def metrics_text(self) -> str:
        """/metrics' exposition text (awaited by the app: `EngineClient` asks its engine process)."""
        return self.metrics.render(self.gauges())

    def cancel(self, requests: list[GenerationRequest]) -> None:
        """Stop requests (a client went away): their slots are freed at the next step. Idempotent."""
        with self._lock:
            self._cancels.extend(r for r in requests if not r.cancelled)
            self._lock.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, abort the ones in flight (each gets finish_reason "abort") and end the thread."""
        with self._lock:
            self._accepting = False
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def gauges(self) -> dict[str, float]:
        """The /metrics gauges, read now. On CUDA also the caching allocator's reserved bytes and its device
        allocations so far (`device_mallocs`, cudaMalloc calls: each one synchronises the device, so a count
        that grows under load is a stall the scheduler's phases do not name). `gc_collections_gen2` and
        `gc_pause_seconds` count this process's garbage-collector pauses (serving.heap), another such stall."""
        gauges = {"queue_length": len(self.waiting) + len(self._inbox),
                  "running_sequences": len(self.running),
                  "prefilling_requests": len(self.prefilling),
                  "free_slots": self.max_batch_size - len(self.running),
                  "prefix_cache_bytes": self.prefix_cache.nbytes,
                  "prefix_cache_entries": len(self.prefix_cache), **self._gc.gauges()}
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            gauges["device_reserved_bytes"] = stats.get("reserved_bytes.all.current", 0)
            gauges["device_mallocs"] = stats.get("segment.all.allocated", 0)
        return gauges

    # ---- the scheduler thread ----

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the graphs and kernels run on the model's GPU from this thread
        while True:
            idle_from = time.perf_counter()
            with self._lock:
                while not (self._stop or self._inbox or self._cancels or self.running or self.waiting
                           or self.prefilling or self._pending):
                    self._lock.wait(1.0)
                self.waiting.extend(self._inbox)
                self._inbox.clear()
                cancels, self._cancels = self._cancels, []
                stopping = self._stop
            self._phase("idle", idle_from)
            for request in cancels:
                self._abort(request)
            if stopping:
                for request in self._in_flight():
                    self._abort(request)
                self._flush()
                return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as err:  # a bug or out of memory: fail what is in flight, keep serving
                logger.exception("scheduler step failed")
                self._fail_all(f"{type(err).__name__}: {err}")
            self._flush()
            self._phase("flush")
            self.metrics.phases(self._phases)
            self._phases = dict.fromkeys(self._phases, 0.0)

    def _phase(self, name: str, since: float | None = None) -> None:
        """Charge the time since `since` (default: the end of the previous phase) to phase `name`."""
        now = time.perf_counter()
        self._phases[name] += now - (self._phase_end if since is None else since)
        self._phase_end = now

    def _in_flight(self) -> list[GenerationRequest]:
        return list(self.waiting) + [job.request for job in self.prefilling] \
            + list({id(s.request): s.request for s in self.running}.values())

    def _step(self) -> None:
        free = self.max_batch_size - len(self.running) - sum(job.request.n for job in self.prefilling)
        while self.waiting and self.waiting[0].n <= free:
            free -= self.waiting[0].n
            self._start_prefill(self.waiting.popleft())
        self._phase("admit")
        if self.prefilling:
            self._prefill_chunk()
            self._phase("prefill")
        block = self._launch() if self.running else None
        self._phase("launch")
        if self._pending is not None:  # the previous block's tokens, read while the new block runs
            self._process(self._pending)
            self._phase("process")
        self._pending = block

    def _emit(self, request: GenerationRequest, events: list[Event]) -> None:
        try:
            request.sink(events)
        except Exception:  # a sink must never break the loop (e.g. its event loop has closed)
            logger.exception("request %s: delivering events failed", request.request_id)
        if request.flush is not None:
            self._flushes[request.flush] = None

    def _flush(self) -> None:
        """Call the `flush` of every request that got events in this iteration, once each."""
        flushes, self._flushes = self._flushes, {}
        for flush in flushes:
            try:
                flush()
            except Exception:  # as for sinks: never break the loop
                logger.exception("flushing events failed")

    def _abort(self, request: GenerationRequest) -> None:
        if request.cancelled or request.done:
            return
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
        self.prefilling = [job for job in self.prefilling if job.request is not request]
        rows = [s for s in self.running if s.request is request and not s.finished]
        for s in rows:
            s.finished = True
        if rows:
            self._compact()
        self.metrics.finished("abort")
        self._emit(request, [Event(index=i, finish_reason="abort") for i in range(request.n)])
        self._log(request, "abort")

    def _fail_all(self, message: str) -> None:
        requests = self._in_flight()
        self.waiting.clear()
        self.prefilling = []
        self._pending = None
        self.running = []
        self._dirty = True
        for request in requests:
            request.done = True
            self.metrics.finished("error")
            self._emit(request, [Event(index=-1, error=message)])

    def _log(self, request: GenerationRequest, reason: str) -> None:
        now = time.monotonic()
        ttft = "-" if request.first_token_at is None else f"{request.first_token_at - request.arrival:.3f}s"
        logger.info("request %s: %d prompt tokens (%d from the prefix cache), %d completion tokens, n=%d, "
                    "first token %s, %.3fs, %s", request.request_id, len(request.prompt_ids),
                    request.prefix_hit_tokens, request.completion_tokens, request.n, ttft, now - request.arrival, reason)

    # ---- prefill ----

    def _start_prefill(self, request: GenerationRequest) -> None:
        ids, chunk = request.prompt_ids, self.prefill_chunk
        self.metrics.add("prompt_tokens_total", len(ids))
        if request.prompt_logprobs:
            request.prompt_logprob_list = self._prompt_logprobs(ids, request.logprobs or 0)
        job = _Prefill(request, None)
        # the longest stored prefix: the whole prompt, else the longest chunk multiple inside it
        if self.prefix_cache.enabled:
            bounds = list(range(chunk, len(ids) + 1, chunk))
            digests, h = {}, None
            start = 0
            for end in bounds + ([len(ids)] if len(ids) % chunk else []):
                h = prefix_digest(ids[start:end], h)
                digests[end] = h
                start = end
            for end in sorted(digests, reverse=True):
                entry = self.prefix_cache.get(ids[:end], digests[end].digest())
                if entry is not None:
                    job.cache = self._zero_cache(1)
                    job.cache.index_copy_(torch.zeros(1, dtype=torch.long, device=self.device), entry.cache)
                    job.cache.advance(end)  # a fresh cache (position 0) now holds the cached prefix
                    job.pos, job.logits, job.digest = end, entry.logits, digests[end]
                    request.prefix_hit_tokens = end
                    self.metrics.add("prefix_cache_hits_total")
                    self.metrics.add("prefix_cache_hit_tokens_total", end)
                    break
            else:
                self.metrics.add("prefix_cache_misses_total")
        self.prefilling.append(job)

    def _prompt_logprobs(self, ids: list[int], top: int) -> list[TokenLogprob]:
        """Log-probability of each prompt token given the ones before it (None for the first), for echo."""
        if len(ids) < 2:
            return [TokenLogprob(ids[0], None, [])]
        ids_1L = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits_LV = self.model(ids_1L)[0, :-1]
        chosen, values, top_ids = token_logprobs(logits_LV, ids_1L[0, 1:], self.real_vocab, top)
        chosen, values, top_ids = chosen.tolist(), values.tolist(), top_ids.tolist()
        return [TokenLogprob(ids[0], None, [])] + [TokenLogprob(t, c, list(zip(i, v))) for t, c, v, i in zip(ids[1:], chosen, values, top_ids)]

    def _next_end(self, job: _Prefill) -> int:
        return min((job.pos // self.prefill_chunk + 1) * self.prefill_chunk, len(job.request.prompt_ids))

    def _prefill_chunk(self) -> None:
        """One model call: the next chunk of the admitted requests whose chunks have the oldest one's length."""
        done = [job for job in self.prefilling if job.pos == len(job.request.prompt_ids)]  # whole-prompt hits
        todo = [job for job in self.prefilling if job.pos < len(job.request.prompt_ids)]
        if todo:
            length = self._next_end(todo[0]) - todo[0].pos
            group = [job for job in todo if self._next_end(job) - job.pos == length]
            group = group[:max(1, self.max_prefill_tokens // length)]
            ids_KL = to_device([job.request.prompt_ids[job.pos:job.pos + length] for job in group], torch.long,
                               self.device)
            graphs = self.prefill_graphs
            if graphs is not None and length == graphs.chunk and len(group) <= graphs.max_rows:
                states = None if all(job.cache is None for job in group) else [job.cache for job in group]
                logits_KV, batch = graphs(ids_KL, states)
                self.metrics.add("prefill_graph_calls_total")
            else:
                if all(job.cache is None for job in group):  # new prompts: their zero states in one allocation
                    layers = self._zero_cache(len(group)).layers
                else:
                    caches = [self._zero_cache(1) if job.cache is None else job.cache for job in group]
                    layers = [MixerState(torch.cat([c.layers[i].conv_state for c in caches]),
                                         torch.cat([c.layers[i].ssm_state for c in caches]))
                              for i in range(len(caches[0].layers))]
                batch = InferenceCache(layers, seqlen_offset=1)
                # the model reads the states as they are (zero for a new prompt): no reset, unlike prefill()
                logits_KV = self.model(ids_KL, cache=batch, logits_to_keep=1)[:, -1].float()
            self.metrics.add("prefill_chunks_total")
            for row, job in enumerate(group):
                job.cache = InferenceCache([MixerState(s.conv_state[row:row + 1], s.ssm_state[row:row + 1])
                                            for s in batch.layers], seqlen_offset=job.pos + length)
                job.logits = logits_KV[row:row + 1]
                ids = job.request.prompt_ids
                job.digest = prefix_digest(ids[job.pos:job.pos + length], job.digest)
                job.pos += length
                if self.prefix_cache.enabled:  # no copy: this call's states are fresh and only read from now on
                    self.prefix_cache.put(ids[:job.pos], job.digest.digest(), job.cache, job.logits, copy=False)
                if job.pos == len(ids):
                    done.append(job)
        for job in done:
            self.prefilling.remove(job)
        self._join(done)

    def _zero_cache(self, rows: int) -> InferenceCache:
        return allocate_cache(self.model, rows, state_dtype=self.state_dtype, device=self.device)

    def _join(self, jobs: list[_Prefill]) -> None:
        """Requests whose prompts are done join the running batch: each one's state goes into n slots.

        All of them at once: one copy per layer state for the lot, not one per request (on a GPU each copy is a
        kernel launch, and the host's time per request is what a wave of arrivals waits for).
        """
        joining = []
        for job in jobs:
            request = job.request
            if request.max_tokens == 0:
                request.done = True
                self.metrics.finished("length")
                self._emit(request, [Event(index=i, finish_reason="length") for i in range(request.n)])
                self._log(request, "length")
            else:
                joining.append(job)
        if not joining:
            return
        first = len(self.running)
        total = sum(job.request.n for job in joining)

        def rows(t: torch.Tensor, n: int) -> torch.Tensor:  # a 1-row state or logits as n rows (a view)
            return t.expand(n, *t.shape[1:])

        def gather(get) -> torch.Tensor:
            parts = [rows(get(job), job.request.n) for job in joining]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        source = InferenceCache([MixerState(gather(lambda job: job.cache.layers[i].conv_state),
                                            gather(lambda job: job.cache.layers[i].ssm_state))
                                 for i in range(len(joining[0].cache.layers))])
        self.cache.index_copy_(torch.arange(first, first + total, device=self.device), source)
        self._logits_SV[first:first + total] = gather(lambda job: job.logits)
        for job in joining:
            request = job.request
            for i, params in enumerate(request.choices):
                self.sampler.reset_row(len(self.running), request.prompt_ids, params)
                self.running.append(_Seq(request, i, params, TextStream(self.tokenizer, request.stops)))
        self._dirty = True

    # ---- decode ----

    def _compact(self) -> None:
        """Drop finished rows; move the last running rows into their slots so that slots 0..B-1 stay full."""
        alive = sum(not s.finished for s in self.running)
        holes = [r for r in range(alive) if self.running[r].finished]
        movers = [r for r in range(alive, len(self.running)) if not self.running[r].finished]
        if holes:
            src = to_device(movers, torch.long, self.device)
            dst = to_device(holes, torch.long, self.device)
            for state in self.cache.layers:
                state.conv_state.index_copy_(0, dst, state.conv_state.index_select(0, src))
                state.ssm_state.index_copy_(0, dst, state.ssm_state.index_select(0, src))
            self._logits_SV.index_copy_(0, dst, self._logits_SV.index_select(0, src))
            for s, d in zip(movers, holes):
                self.sampler.move_row(s, d, self.running[s].params)
                self.running[d] = self.running[s]
        del self.running[alive:]
        self._dirty = True

    def _launch(self) -> _Block:
        """Queue k decode steps for the running rows (sampling included); the host does not wait for them.

        Rows already finished in the block still being read compute on for nothing until the next compaction.
        The tokens go to the host with a non-blocking copy, recorded by an event before the last step's model
        call, so reading them waits for the sampling only, not for that call.
        """
        rows = len(self.running)
        if self._dirty:
            self.sampler.set_rows([s.params for s in self.running])
            self._steps_B = to_device([s.launched for s in self.running], torch.long, self.device)
            self._dirty = False
        want = max((s.request.logprobs for s in self.running if s.request.logprobs is not None), default=None)
        logits_BV = self._logits_SV[:rows]
        steps, parts = [], []
        for j in range(self.decode_steps):
            tokens_B = self.sampler.sample(logits_BV, self._steps_B)
            self._steps_B += 1
            steps.append(tokens_B)
            if want is not None:
                parts.append(token_logprobs(logits_BV, tokens_B, self.real_vocab, want))
            if j + 1 < self.decode_steps:
                logits_BV = self.decoder(tokens_B)
        for seq in self.running:
            seq.launched += self.decode_steps
        tokens_Bk = torch.stack(steps, dim=1).to("cpu", non_blocking=True)
        logprobs = None
        if want is not None:
            logprobs = tuple(torch.stack([p[i] for p in parts], dim=1).to("cpu", non_blocking=True) for i in range(3))
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        # the next logits of every row (compaction moves them with their rows)
        self._logits_SV[:rows] = self.decoder(steps[-1])
        self.metrics.add("decode_steps_total", self.decode_steps)
        return _Block(list(self.running), tokens_Bk, logprobs, ready)

    def _process(self, block: _Block) -> None:
        """Hand a block's tokens to their requests; finished rows free their slots.

        The host's cost per token is what bounds a server whose decode step takes a millisecond or two, so a
        row without stop sequences takes its k tokens in one go: where they end (EOS, max_tokens, the model
        length) is a scan of ints, and their text is one decode of the block, not one per token. Stop
        sequences need to know which token completed one, so such rows go token by token.
        """
        if block.ready is not None:
            block.ready.synchronize()
        self._phase("wait")
        tokens = block.tokens_Bk.tolist()
        if block.logprobs is not None:
            chosen_Bk, values_Bkt, ids_Bkt = (t.tolist() for t in block.logprobs)
        now = time.monotonic()
        events: dict[int, tuple[GenerationRequest, list[Event]]] = {}
        any_finished = False
        produced = 0
        for row, (seq, row_tokens) in enumerate(zip(block.seqs, tokens)):
            if seq.finished:  # ended in an earlier block, or cancelled since this one was launched
                continue
            request = seq.request
            if request.first_token_at is None:
                request.first_token_at = now
                self.metrics.ttft(now - request.arrival)
            if seq.text.stops:
                event = self._row_by_token(seq, row_tokens)
            else:
                event = self._row_at_once(seq, row_tokens)
            taken = len(event.token_ids)
            request.completion_tokens += taken
            produced += taken
            if request.logprobs is not None:
                k = request.logprobs
                event.logprobs = [TokenLogprob(token, chosen_Bk[row][j],
                                               list(zip(ids_Bkt[row][j][:k], values_Bkt[row][j][:k])))
                                  for j, token in enumerate(event.token_ids)]
            if event.finish_reason is not None:
                seq.finished = any_finished = True  # the rest of the block is dropped
            if id(request) in events:
                events[id(request)][1].append(event)
            else:
                events[id(request)] = (request, [event])
        self.metrics.tokens(produced)
        for request, evs in events.values():
            self._emit(request, evs)
        if any_finished:
            for request, evs in events.values():
                if all(s.finished for s in self.running if s.request is request):
                    request.done = True
                    reasons = [e.finish_reason for e in evs if e.finish_reason]
                    self.metrics.finished(reasons[-1] if reasons else "stop")
                    self._log(request, ",".join(sorted(set(reasons))))
            self._compact()

    def _limit(self, seq: _Seq) -> int:
        """How many more tokens `seq` may take before max_tokens or the model length ends it."""
        request = seq.request
        return min(request.max_tokens, self.max_model_len - len(request.prompt_ids)) - len(seq.tokens)

    def _row_at_once(self, seq: _Seq, row_tokens: list[int]) -> Event:
        """A row's tokens of one block as one event (no stop sequences): cut at EOS or at its length limit."""
        request = seq.request
        limit = max(self._limit(seq), 1)  # a row takes at least one token, as token by token does
        take = row_tokens[:limit]
        reason = "length" if len(take) == limit else None
        if not request.ignore_eos and self.eos_id in take:
            take = take[:take.index(self.eos_id) + 1]
            reason = "stop"
        seq.tokens += take
        if not self.detokenize:  # the reader makes the text: `detokenize_event` (the same calls, elsewhere)
            return Event(seq.index, "", take, finish_reason=reason)
        return Event(seq.index, detokenize_event(seq.text, take, reason), take, finish_reason=reason)

    def _row_by_token(self, seq: _Seq, row_tokens: list[int]) -> Event:
        """A row's tokens of one block as one event, token by token: a stop sequence can end it at any token."""
        request = seq.request
        event = Event(seq.index)
        for token in row_tokens:
            seq.tokens.append(token)
            event.token_ids.append(token)
            if token == self.eos_id and not request.ignore_eos:
                event.text += seq.text.finish()
                event.finish_reason = "stop"
            else:
                text, hit = seq.text.push(token)
                event.text += text
                if hit:
                    event.finish_reason = "stop"
                elif len(seq.tokens) >= request.max_tokens or \
                        len(request.prompt_ids) + len(seq.tokens) >= self.max_model_len:
                    event.text += seq.text.finish()
                    event.finish_reason = "length"
            if event.finish_reason is not None:
                break
        return event
