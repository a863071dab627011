"""The scheduler in a process of its own: `EngineClient` (HTTP process) <-> `_engine_main` (engine process).

Why: in one process the scheduler thread and the HTTP event loop share one GIL, so every microsecond spent
parsing requests, encoding JSON / SSE and writing sockets is a microsecond the scheduler cannot launch the
next decode block (measured on the stub model: the scheduler's wall time per token was about twice its CPU
time; the rest was waiting for the GIL). Here the engine process owns the model, the device and the
`Scheduler`; the HTTP process tokenizes, detokenizes, encodes and serves sockets, on another core.

    HTTP process                                         engine process (spawned; owns model + device)
      app.py handlers                                      main thread: commands from the pipe
      EngineClient.submit_async  --("submit", ...)-->        Scheduler.submit -> ("reply", ok / 429 / 503)
      EngineClient.cancel        --("cancel", rids)-->       Scheduler.cancel
      EngineClient.call          --("call", name)-->         metrics text, prefix-cache clear
      reader thread  <--("events", batch)--                scheduler thread: one message per loop iteration
        text of rows without stop sequences (TextStream),    (token ids, finish reasons, logprobs; the text
        then the requests' sinks and flushes                 only of rows with stop sequences)

Messages are pickled tuples of plain values on one duplex pipe (a Unix socket pair). A request crosses as its
fields (prompt ids, max tokens, RowParams, stops, ...) under an integer id; the engine builds its own
`GenerationRequest` whose sink appends to an outbox, and the scheduler's once-per-iteration `flush` sends
the outbox as one message.

Lifetime: the engine ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group; the HTTP side must
be able to finish its open responses first) and stops when told ("stop": in-flight requests end with
"abort", as `Scheduler.stop`), when the pipe closes (the HTTP process died: no orphan), or with its parent on
Linux (PR_SET_PDEATHSIG). If the engine dies, the reader sees the pipe close: every open request ends with an
error event (HTTP 503, code "engine_unavailable"), new requests get 503, and `on_exit` tells the server to exit.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import ctypes
import faulthandler
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable

from .heap import freeze_heap, gc_pauses
from .metrics import gauge_lines
from .scheduler import (Event, GenerationRequest, QueueFullError, Scheduler, ShuttingDownError, TokenLogprob,
                        detokenize_event)
from .text import TextStream

logger = logging.getLogger("mambakit.serving")

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class EngineUnavailableError(ShuttingDownError):
    """The engine process has exited (HTTP 503, code "engine_unavailable")."""


class EngineStartError(RuntimeError):
    """The engine process failed while loading the model or building the scheduler (its message says why)."""


# ---- the engine process ----


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent thread exits (belt and braces: a closed
    pipe stops the engine too, but only once its scheduler thread answers). The parent *thread*: so only for
    an engine started from the parent's main thread (a worker thread may end long before the server)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


class _Engine:
    """The engine process's side: commands from the pipe to the Scheduler, its events back in one message per
    scheduler iteration."""

    def __init__(self, conn, scheduler: Scheduler):
        self.conn, self.scheduler = conn, scheduler
        self.send_lock = threading.Lock()
        self.requests: dict[int, GenerationRequest] = {}  # id -> the engine's copy, until it is done
        self.outbox: list = []  # (id, request, events) appended by sinks on the scheduler thread

    def send(self, message) -> None:
        data = pickle.dumps(message, _PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)

    def sink(self, rid: int, request: GenerationRequest):
        def put(events: list[Event]) -> None:
            self.outbox.append((rid, request, events))

        return put

    def flush(self) -> None:
        """On the scheduler thread, once per loop iteration: every event of the iteration in one message."""
        outbox, self.outbox = self.outbox, []
        batch, sent_prompt = [], set()
        for rid, request, events in outbox:
            plp = None
            if request.prompt_logprob_list and rid not in sent_prompt:  # computed before the request's first event
                plp = [(e.token_id, e.logprob, e.top) for e in request.prompt_logprob_list]
                request.prompt_logprob_list = []  # sent once
                sent_prompt.add(rid)
            batch.append((rid, request.completion_tokens, plp,
                          [(e.index, e.text, e.token_ids,
                            [(lp.token_id, lp.logprob, lp.top) for lp in e.logprobs] if e.logprobs else None,
                            e.finish_reason, e.error) for e in events]))
            if request.done or request.cancelled:
                self.requests.pop(rid, None)
        try:
            self.send(("events", batch))
        except OSError:
            pass  # the HTTP process has gone; the command loop sees the pipe close and stops

    def submit(self, call_id: int, specs: list[tuple]) -> None:
        requests = []
        for rid, prompt_ids, max_tokens, choices, stops, logprobs, prompt_logprobs, ignore_eos, request_id in specs:
            request = GenerationRequest(prompt_ids, max_tokens, choices, sink=lambda events: None, stops=stops,
                                        flush=self.flush, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                        ignore_eos=ignore_eos, request_id=request_id)
            request.sink = self.sink(rid, request)
            requests.append((rid, request))
        for rid, request in requests:
            self.requests[rid] = request
        try:
            self.scheduler.submit([r for _, r in requests])
        except (QueueFullError, ShuttingDownError) as err:
            for rid, _ in requests:
                self.requests.pop(rid, None)
            kind = "queue_full" if isinstance(err, QueueFullError) else "shutting_down"
            self.send(("reply", call_id, False, (kind, str(err))))
            return
        self.send(("reply", call_id, True, None))

    def call(self, call_id: int, name: str) -> None:
        if name == "metrics":
            value = self.scheduler.metrics.render(self.scheduler.gauges())
        elif name == "clear_prefix_cache":
            value = self.scheduler.prefix_cache.clear()
        else:
            self.send(("reply", call_id, False, ("unknown", f"unknown engine call {name!r}")))
            return
        self.send(("reply", call_id, True, value))

    def serve(self) -> None:
        """The command loop (this process's main thread) until "stop" or the pipe closes."""
        timeout = 10.0
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                logger.warning("the HTTP process closed the engine's pipe: stopping")
                break
            kind = message[0]
            if kind == "submit":
                self.submit(message[1], message[2])
            elif kind == "cancel":
                self.scheduler.cancel([self.requests[rid] for rid in message[1] if rid in self.requests])
            elif kind == "call":
                self.call(message[1], message[2])
            elif kind == "stop":
                timeout = message[1]
                break
        self.scheduler.stop(timeout)  # aborts what is in flight; its last flush sends the "abort" events
        try:
            self.send(("stopped",))
        except OSError:
            pass


def _engine_main(conn, build: Callable[[], tuple], scheduler_kwargs: dict, log_level: str,
                 die_with_parent: bool, freeze: bool = True) -> None:
    """The engine process: build (model, tokenizer), start a Scheduler, serve the pipe, exit. freeze: keep the
    start-up heap out of the garbage collector's scans (`heap.freeze_heap`)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # stopped by the HTTP process through the pipe, after its drain
    if die_with_parent:
        _die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `EngineClient.stop` asks for stacks before a kill
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    # the command thread and the scheduler thread share this process's GIL: a submit waits at most 0.5 ms
    sys.setswitchinterval(0.0005)
    try:
        built = build()
        model, tokenizer = built[:2]
        kwargs = {**scheduler_kwargs, **(built[2] if len(built) > 2 else {})}  # settings that depend on the device
        scheduler = Scheduler(model, tokenizer, detokenize=False, **kwargs)
    except BaseException as err:  # reported to the HTTP process, which fails to start with this message
        conn.send_bytes(pickle.dumps(("failed", f"{type(err).__name__}: {err}"), _PROTOCOL))
        conn.close()
        return
    if freeze:
        freeze_heap()
    engine = _Engine(conn, scheduler)
    scheduler.start()
    engine.send(("ready", {"max_batch_size": scheduler.max_batch_size, "max_model_len": scheduler.max_model_len,
                           "real_vocab": scheduler.real_vocab, "device": str(scheduler.device)}))
    engine.serve()
    conn.close()


def load_checkpoint(directory: str, device: str = "cpu", dtype: str | None = None) -> tuple:
    """(model in eval mode, tokenizer) of a checkpoint directory: a `build` for `EngineClient`, as
    `functools.partial(load_checkpoint, "runs/shakespeare", "cuda", "bfloat16")` (dtype None: the checkpoint's)."""
    import torch

    from ..checkpoints import load_checkpoint_tokenizer
    from ..models import MambaLM

    model = MambaLM.from_pretrained(directory, dtype=None if dtype is None else getattr(torch, dtype),
                                    device=torch.device(device))
    return model.eval(), load_checkpoint_tokenizer(directory)


# ---- the HTTP process ----


class _Open:
    """An open request on the HTTP side: the caller's GenerationRequest and the text streams of its choices."""

    __slots__ = ("request", "texts", "open")

    def __init__(self, request: GenerationRequest, tokenizer):
        self.request = request
        # rows without stop sequences come as token ids: their text is made here (`detokenize_event`)
        self.texts = None if request.stops else [TextStream(tokenizer) for _ in range(request.n)]
        self.open = request.n  # choices without a finish reason yet


class EngineClient:
    """A `Scheduler` in a child process, behind the interface the HTTP app uses.

    Args:
        build: a picklable callable (a module-level function or a functools.partial of one) that returns
            (model, tokenizer) in the engine process: the model is loaded there, on its device, never here; or
            (model, tokenizer, more scheduler kwargs), for settings that depend on the device it found.
        tokenizer: the same tokenizer, for this process (detokenization of the events).
        scheduler_kwargs: `Scheduler` keyword arguments (max_batch_size, prefill_chunk, decode_steps, ...).
        log_level: the engine process's logging level (its request log lines go to the same stderr).
        on_exit: called (from the reader thread) once the engine has exited without being asked to:
            `mambakit serve` stops the HTTP server then.
        start_timeout: seconds for the engine to load the model and start.
        freeze_heap: the engine process freezes its start-up heap out of the garbage collector's scans once the
            scheduler is built (`heap.freeze_heap`: no full collection walks torch and the model mid-serving).

    Raises EngineStartError when the engine fails to start (its exception's message) or exits while starting.

    Example:
        >>> engine = EngineClient(functools.partial(load, "runs/shakespeare"), tokenizer, {"max_batch_size": 32})
        >>> app = create_app(engine, tokenizer, "shakespeare")        # serve with uvicorn; engine.stop() at the end
    """

    def __init__(self, build: Callable[[], tuple], tokenizer, scheduler_kwargs: dict | None = None, *,
                 log_level: str = "info", on_exit: Callable[[], None] | None = None, start_timeout: float = 600.0,
                 freeze_heap: bool = True):
        self.tokenizer = tokenizer
        self.on_exit = on_exit
        ctx = multiprocessing.get_context("spawn")  # never fork: CUDA (and threads) do not survive a fork
        self._conn, child = ctx.Pipe(duplex=True)
        main_thread = threading.current_thread() is threading.main_thread()
        self.process = ctx.Process(target=_engine_main, name="mambakit-engine", daemon=True,
                                   args=(child, build, dict(scheduler_kwargs or {}), log_level, main_thread,
                                         freeze_heap))
        self.process.start()
        child.close()
        self._send_lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._lock = threading.Lock()  # guards _open and _calls between the event loop and the reader thread
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self.crashed = False  # the engine exited without being asked to
        self._gc = gc_pauses()
        info = self._wait_ready(start_timeout)
        self.max_batch_size, self.max_model_len = info["max_batch_size"], info["max_model_len"]
        self.real_vocab, self.device = info["real_vocab"], info["device"]
        self._reader = threading.Thread(target=self._read, name="mambakit-engine-reader", daemon=True)
        self._reader.start()
        # before multiprocessing's own exit handler (atexit runs the last registered first), which would wait
        # without a timeout for an engine that ignores its SIGTERM: a script that never calls stop() still exits
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if not self.process.is_alive():
                raise EngineStartError(f"the engine process exited while starting (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                self.process.kill()
                raise EngineStartError(f"the engine process did not start within {timeout:g} s")
        try:
            message = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.process.join(10)
            raise EngineStartError(f"the engine process exited while starting (exit code {self.process.exitcode})") \
                from None
        if message[0] == "failed":
            self.process.join(10)
            raise EngineStartError(message[1])
        return message[1]

    @property
    def pid(self) -> int:
        return self.process.pid

    # ---- the HTTP side's calls ----

    def _send(self, message) -> None:
        data = pickle.dumps(message, _PROTOCOL)
        with self._send_lock:
            self._conn.send_bytes(data)

    def _unavailable(self) -> EngineUnavailableError:
        return EngineUnavailableError("the engine process has exited" if self.crashed
                                      else "the server is shutting down")

    def _call(self, kind: str, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._ids)
        with self._lock:
            if self.crashed or self._stopping:
                raise self._unavailable()
            self._calls[call_id] = future
        try:
            self._send((kind, call_id, *args))
        except OSError:
            with self._lock:
                self._calls.pop(call_id, None)
            raise self._unavailable() from None
        return future

    async def submit_async(self, requests: list[GenerationRequest]) -> None:
        """Queue requests in the engine (all or none); QueueFullError (429), ShuttingDownError (503)."""
        rids = [next(self._ids) for _ in requests]
        with self._lock:
            for rid, request in zip(rids, requests):
                self._open[rid] = _Open(request, self.tokenizer)
        for rid, request in zip(rids, requests):
            request.engine_id = rid
        specs = [(rid, r.prompt_ids, r.max_tokens, r.choices, r.stops, r.logprobs, r.prompt_logprobs, r.ignore_eos,
                  r.request_id) for rid, r in zip(rids, requests)]
        try:
            ok, value = await asyncio.wrap_future(self._call("submit", specs))
        except BaseException:
            self._forget(rids)
            raise
        if not ok:
            self._forget(rids)
            kind, message = value
            raise QueueFullError(message) if kind == "queue_full" else ShuttingDownError(message)

    def _forget(self, rids: list[int]) -> None:
        with self._lock:
            for rid in rids:
                self._open.pop(rid, None)

    def cancel(self, requests: list[GenerationRequest]) -> None:
        """Stop requests (a client went away); their slots are freed at the engine's next step. Idempotent."""
        rids = [r.engine_id for r in requests if r.engine_id is not None]
        if rids and not self.crashed:
            try:
                self._send(("cancel", rids))
            except OSError:
                pass  # the engine is gone: the reader ends the requests

    def call(self, name: str, timeout: float = 30.0):
        """A blocking call into the engine from any thread but the reader: "metrics" (exposition text),
        "clear_prefix_cache"."""
        ok, value = self._call("call", name).result(timeout)
        if not ok:
            raise RuntimeError(value[1])
        return value

    async def metrics_text(self) -> str:
        """The engine's /metrics text, then this (HTTP) process's garbage-collector pauses (`http_gc_*`)."""
        ok, value = await asyncio.wrap_future(self._call("call", "metrics"))
        if not ok:
            raise RuntimeError(value[1])
        return value + "\n".join(gauge_lines(self._gc.gauges("http_"))) + "\n"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (what is in flight ends with "abort"), wait for it to exit (killed after `timeout`
        more seconds), and end the reader. Idempotent."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
        if first and not self.crashed:
            try:
                self._send(("stop", timeout))
            except OSError:
                pass
        if not self._join(timeout + 5):
            logger.error("the engine process did not stop within %.0f s: its threads' stacks, then killing it",
                         timeout + 5)
            try:
                os.kill(self.process.pid, signal.SIGUSR1)  # faulthandler in the engine: every thread's stack
                time.sleep(1.0)
            except OSError:
                pass
            self.process.kill()
            self._join(5)
        self._reader.join(5)
        self._conn.close()

    def _join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the engine to exit; True once it has. One thread at a time: two threads in
        waitpid on one child race (the loser gets ECHILD, which multiprocessing reads as "still running")."""
        with self._wait_lock:
            self.process.join(timeout)
            return self.process.exitcode is not None

    # ---- the reader thread ----

    def _read(self) -> None:
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self._deliver(message[1])
            elif kind == "reply":
                with self._lock:
                    future = self._calls.pop(message[1], None)
                if future is not None:
                    future.set_result((message[2], message[3]))
            elif kind == "stopped":
                break
        self._gone()

    def _deliver(self, batch: list) -> None:
        """One engine iteration's events: text for rows without stop sequences, then sinks, then each flush once."""
        flushes: dict = {}
        with self._lock:  # once per message, not per request
            entries = [self._open.get(item[0]) for item in batch]
        done = []
        for entry, (rid, completion_tokens, plp, raw_events) in zip(entries, batch):
            if entry is None:
                continue
            request = entry.request
            request.completion_tokens = completion_tokens
            if plp is not None:
                request.prompt_logprob_list = [TokenLogprob(*t) for t in plp]
            events = []
            for index, text, token_ids, logprobs, finish_reason, error in raw_events:
                if entry.texts is not None and index >= 0:
                    text = detokenize_event(entry.texts[index], token_ids, finish_reason)
                events.append(Event(index, text, token_ids,
                                    [TokenLogprob(*lp) for lp in logprobs] if logprobs else [], finish_reason, error))
                if error is not None:
                    entry.open = 0
                elif finish_reason is not None:
                    entry.open -= 1
            if entry.open <= 0:
                request.done = True
                done.append(rid)
            self._emit(request, events, flushes)
        if done:
            self._forget(done)
        for flush in flushes:
            try:
                flush()
            except Exception:
                logger.exception("flushing events failed")

    @staticmethod
    def _emit(request: GenerationRequest, events: list[Event], flushes: dict) -> None:
        try:
            request.sink(events)
        except Exception:  # as in the scheduler: a sink never breaks the reader
            logger.exception("request %s: delivering events failed", request.request_id)
        if request.flush is not None:
            flushes[request.flush] = None

    def _gone(self) -> None:
        """The pipe closed: asked to (stop) or not (the engine died). Ends everything still open."""
        if not self._stopping:
            self._join(10)  # for its exit code (`stop` does the waiting when it was asked to)
        with self._lock:
            crashed = not self._stopping
            self.crashed = crashed
            self._stopping = True
            open_, self._open = list(self._open.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        if crashed:
            logger.error("the engine process exited unexpectedly (exit code %s): failing %d open requests",
                         self.process.exitcode, len(open_))
        error = EngineUnavailableError("the engine process has exited" if crashed else "the server is shutting down")
        for future in calls:
            future.set_exception(error)
        flushes: dict = {}
        for entry in open_:
            entry.request.done = True
            self._emit(entry.request, [Event(index=-1, error=str(error), error_code="engine_unavailable")], flushes)
        for flush in flushes:
            try:
                flush()
            except Exception:
                logger.exception("flushing events failed")
        if crashed and self.on_exit is not None:
            self.on_exit()
