"""The HTTP routes (FastAPI): OpenAI's /v1/completions and /v1/chat/completions, /v1/models, /health, /metrics.

Handlers run on uvicorn's event loop and never touch the model: they validate the body, tokenize, submit
`GenerationRequest`s to the `Scheduler` (its own thread, or an engine process behind an `EngineClient`) and
relay its events, either as one JSON response or as server-sent events (`data: {...}` lines, then
`data: [DONE]`). Events cross threads (the scheduler's, or the engine client's reader) through one
`loop.call_soon_threadsafe` per scheduler iteration into a channel per HTTP request. A client
that goes away (a closed stream, or a dropped connection while waiting) cancels its requests, which frees
their slots at the scheduler's next step.

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a malformed body,
an unknown field, an invalid parameter or a prompt longer than the model allows; 404 for another model
name; 429 when the waiting queue is full; 503 while shutting down or once the engine process has exited
(code "engine_unavailable").
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatTemplate, ChatTemplateError
from .engine import EngineClient, EngineUnavailableError
from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .sampler import RowParams, request_key
from .scheduler import Event, GenerationRequest, QueueFullError, Scheduler, ShuttingDownError, TokenLogprob


# seeds of requests that send none: a generator seeded once from the OS (secrets.randbits reads os.urandom
# per request, a system call that hands the GIL to the scheduler thread and waits up to a switch interval)
_SEEDS = random.Random(os.urandom(16))


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


@dataclass
class _Prompt:
    ids: list[int]
    echo_text: str  # the prompt as echo returns it ("" for token ids sent without echo: never decoded)
    skip: int  # leading ids added by the server (the end-of-document start token), not echoed


class _Dispatcher:
    """Hands items from the scheduler thread to `_Channel`s on one event loop, waking the loop once per burst.

    The scheduler's sinks only `post` (a deque append); once an iteration of its loop has delivered events
    for every request, it calls `wake` (the requests' `flush`): one `call_soon_threadsafe` per iteration
    instead of one per request spares the loop (and the GIL) a wake-up per request. The flag is cleared
    before the drain empties the deque, so an item appended meanwhile is either drained now or schedules a
    new drain.

    It also keeps one timer for all channels: once a second it wakes the readers that are waiting, so that
    they look whether their client is still there (a timer armed and cancelled per wait would cost every
    chunk of every stream a heap push and pop).
    """

    tick = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.scheduled = False
        self.waiting: set["_Channel"] = set()
        self.timer: asyncio.TimerHandle | None = None

    def waits(self, channel: "_Channel") -> None:
        """On the event loop: `channel` waits for items; woken empty-handed within a tick if none come."""
        self.waiting.add(channel)
        if self.timer is None:
            self.timer = self.loop.call_later(self.tick, self._tick)

    def _tick(self) -> None:
        for channel in list(self.waiting):
            channel.wake()
        self.timer = self.loop.call_later(self.tick, self._tick) if self.waiting else None

    def post(self, channel: "_Channel", item) -> None:
        self.items.append((channel, item))

    def wake(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass  # the event loop has closed: nobody is waiting any more

    def _drain(self) -> None:
        self.scheduled = False
        while self.items:
            channel, item = self.items.popleft()
            channel.put(item)


class _Channel:
    """Events from the scheduler thread for one HTTP request: (prompt index, events) items.

    Not an asyncio.Queue: the reader takes everything that arrived at once, and waits on one future (an
    `asyncio.wait_for` around `Queue.get` costs a task per item).
    """

    def __init__(self, dispatcher: _Dispatcher):
        self.dispatcher = dispatcher
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def sink(self, prompt_index: int):
        def put(events: list[Event]) -> None:
            self.dispatcher.post(self, (prompt_index, events))

        return put

    def put(self, item) -> None:
        """On the event loop (the dispatcher's drain)."""
        self.items.append(item)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list:
        """Every item that arrived, waiting for one ([] if none came by the dispatcher's next tick)."""
        if not self.items:
            self.waiter = self.dispatcher.loop.create_future()
            self.dispatcher.waits(self)
            try:
                await self.waiter
            finally:
                self.waiter = None
                self.dispatcher.waiting.discard(self)
        items, self.items = self.items, []
        return items


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return f"unknown field {param!r}: this server does not support it", param
    return f"invalid value for {param!r}: {first['msg']}", param


class _Server:
    """The state the routes share: the scheduler (or engine client), tokenizer, names and limits."""

    def __init__(self, scheduler: Scheduler | EngineClient, tokenizer, model_name: str, chat_template: str | None):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        eos = tokenizer.eos_id
        eos_text = tokenizer.decode([eos]) if eos is not None else ""
        special = getattr(tokenizer, "special_tokens", None) or {"bos_token": "", "eos_token": eos_text}
        self.chat = ChatTemplate(chat_template, special) if chat_template else None
        self.created = int(time.time())
        self.dispatcher: _Dispatcher | None = None

    def channel(self) -> _Channel:
        if self.dispatcher is None:  # created on the serving event loop, at its first request
            self.dispatcher = _Dispatcher(asyncio.get_running_loop())
        return _Channel(self.dispatcher)

    # ---- request -> GenerationRequests ----

    async def parse(self, request: Request, model_cls):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise APIError(400, message, param=param) from None
        if req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if req.n > self.scheduler.max_batch_size:
            raise APIError(400, f"n ({req.n}) is larger than the server's --max-batch-size "
                                f"({self.scheduler.max_batch_size})", param="n")
        return req

    def text_prompt(self, text: str) -> _Prompt:
        start = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        ids = start + self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "the prompt is empty and the tokenizer has no end-of-document token to start from",
                           param="prompt")
        return _Prompt(ids, text, len(start))

    def id_prompt(self, ids: list[int], echo: bool) -> _Prompt:
        vocab = self.scheduler.real_vocab
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        # the prompt's text only serves echo: no tokenizer work per request otherwise
        return _Prompt(list(ids), self.tokenizer.decode(ids) if echo else "", 0)

    def build(self, req, prompts: list[_Prompt], max_tokens: int | None, logprobs: int | None,
              prompt_logprobs: bool, channel: _Channel) -> list[GenerationRequest]:
        limit = self.scheduler.max_model_len
        seed = req.seed if req.seed is not None else _SEEDS.getrandbits(63)
        # the request's stop sequences and the model's own (generation_config.json's stop_strings: e.g. the end of
        # turn of a model fine-tuned on conversations with mambakit's default template)
        stops = list(dict.fromkeys(req.stop_list() + list(getattr(self.tokenizer, "stop_strings", ()) or ())))
        out = []
        for p_index, prompt in enumerate(prompts):
            n_tokens = len(prompt.ids)
            budget = limit - n_tokens if max_tokens is None else max_tokens
            if n_tokens >= limit or n_tokens + budget > limit:
                raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                                    f"{n_tokens} tokens and {budget} more were asked for", param="prompt",
                               code="context_length_exceeded")
            choices = [RowParams(temperature=req.temperature if req.temperature is not None else 1.0,
                                 top_k=max(req.top_k, 0), top_p=req.top_p if req.top_p is not None else 1.0,
                                 min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                 frequency_penalty=req.frequency_penalty or 0.0,
                                 presence_penalty=req.presence_penalty or 0.0,
                                 key=request_key(seed, p_index * req.n + c)) for c in range(req.n)]
            out.append(GenerationRequest(prompt.ids, budget, choices, channel.sink(p_index), stops=stops,
                                         flush=channel.dispatcher.wake, logprobs=logprobs,
                                         prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos))
        return out

    async def submit(self, requests: list[GenerationRequest]) -> None:
        try:
            await self.scheduler.submit_async(requests)
        except QueueFullError as err:
            raise APIError(429, str(err), type="rate_limit_exceeded", code="queue_full") from None
        except EngineUnavailableError as err:
            raise APIError(503, str(err), type="server_unavailable", code="engine_unavailable") from None
        except ShuttingDownError as err:
            raise APIError(503, str(err), type="server_unavailable", code="shutting_down") from None

    # ---- logprobs in OpenAI's two shapes ----

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for entry in entries:
            text = self.token_text(entry.token_id)
            tokens.append(text)
            lps.append(entry.logprob)
            tops.append(None if entry.logprob is None else {self.token_text(t): lp for t, lp in entry.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, lp: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}


async def _events(server: _Server, http: Request, channel: _Channel,
                  requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
    """(prompt index, event) pairs until every choice has finished; cancels the requests if the client leaves.

    Whatever has queued up since the last look is merged per choice (one event, its texts and tokens
    joined), so a handler that falls behind the scheduler sends fewer, larger chunks instead of a backlog.
    """
    open_choices = {(p, c) for p, r in enumerate(requests) for c in range(r.n)}
    checked = time.monotonic()
    try:
        while open_choices:
            items = await channel.take()
            if not items or time.monotonic() - checked > 1.0:
                # about once a second, events or not: a client waiting for a whole (non-streamed) answer
                # that went away frees its slots within a second, not when its last token is made
                checked = time.monotonic()
                if await http.is_disconnected():
                    return
                if not items:
                    continue
            merged: dict[tuple[int, int], Event] = {}
            copies: set[tuple[int, int]] = set()  # keys whose merged event is ours to extend (a copy)
            for p_index, events in items:
                for event in events:
                    if event.error_code == "engine_unavailable":
                        raise APIError(503, f"generation failed: {event.error}", type="server_unavailable",
                                       code="engine_unavailable")
                    if event.error is not None:
                        raise APIError(500, f"generation failed: {event.error}", type="server_error")
                    key = (p_index, event.index)
                    if key not in open_choices:
                        continue
                    if event.finish_reason is not None:
                        open_choices.discard(key)
                    if key not in merged:
                        # the scheduler's event itself (it never touches an event once delivered): a copy is
                        # made only when a second event comes to be merged into it
                        merged[key] = event
                    else:
                        if key not in copies:
                            m = merged[key]
                            merged[key] = Event(m.index, m.text, list(m.token_ids), list(m.logprobs), m.finish_reason)
                            copies.add(key)
                        m = merged[key]
                        m.text += event.text
                        m.token_ids += event.token_ids
                        m.logprobs += event.logprobs
                        m.finish_reason = event.finish_reason or m.finish_reason
            for (p_index, _), event in merged.items():
                yield p_index, event
    finally:
        if open_choices:
            server.scheduler.cancel(requests)


def _usage(requests: list[GenerationRequest]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(r.completion_tokens for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_JSON = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps with arguments builds one per call


def _sse(payload: dict) -> str:
    return f"data: {_JSON.encode(payload)}\n\n"


def _completion_chunk(head: str, index: int, text: str, finish_reason: str | None) -> str:
    """`_sse` of a text completion chunk without logprobs, from `head` (`_completion_head`): the same bytes,
    a template instead of a dict to encode for every chunk."""
    reason = "null" if finish_reason is None else _JSON.encode(finish_reason)
    return f'{head}{index}, "text": {_JSON.encode(text)}, "logprobs": null, "finish_reason": {reason}}}]}}\n\n'


def _completion_head(rid: str, created: int, model: str, kind: str = "text_completion") -> str:
    """The bytes of a stream's chunks up to the choice's index (`kind`: the "object" field)."""
    return (f'data: {{"id": {_JSON.encode(rid)}, "object": "{kind}", "created": {created}, '
            f'"model": {_JSON.encode(model)}, "choices": [{{"index": ')


def _chat_chunk(head: str, index: int, text: str, finish_reason: str | None) -> str:
    """`_sse` of a chat completion chunk without logprobs (head: `_completion_head(..., "chat.completion.chunk")`)."""
    reason = "null" if finish_reason is None else _JSON.encode(finish_reason)
    delta = f'{{"content": {_JSON.encode(text)}}}' if text else "{}"
    return f'{head}{index}, "delta": {delta}, "logprobs": null, "finish_reason": {reason}}}]}}\n\n'


def create_app(scheduler: Scheduler | EngineClient, tokenizer, model_name: str,
               chat_template: str | None = None) -> FastAPI:
    """The FastAPI app over a started `Scheduler` (same process) or an `EngineClient` (the scheduler in an engine
    process of its own); the app's shutdown stops it.

    Example:
        >>> app = create_app(Scheduler(model, tokenizer).start(), tokenizer, "shakespeare")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    server = _Server(scheduler, tokenizer, model_name, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="mambakit serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), code=str(err.status_code)), status_code=err.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "mambakit", "max_model_len": scheduler.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        try:
            text = await scheduler.metrics_text()
        except ShuttingDownError as err:  # the engine process has exited or is stopping
            raise APIError(503, str(err), type="server_unavailable", code="engine_unavailable") from None
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(http: Request):
        req: CompletionRequest = await server.parse(http, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [server.text_prompt(prompt)]
        elif isinstance(prompt[0], str):
            prompts = [server.text_prompt(p) for p in prompt]
        elif isinstance(prompt[0], int):
            prompts = [server.id_prompt(prompt, req.echo)]
        else:
            prompts = [server.id_prompt(p, req.echo) for p in prompt]
        channel = server.channel()
        requests = server.build(req, prompts, 16 if req.max_tokens is None else req.max_tokens, req.logprobs,
                                req.echo and req.logprobs is not None, channel)
        await server.submit(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = req.n

        def echo_part(p_index: int) -> tuple[str, dict | None]:
            """The echoed prompt text and, with logprobs, its tokens' logprobs (the first one's is None)."""
            prompt_ = prompts[p_index]
            if req.logprobs is None:
                return prompt_.echo_text, None
            return prompt_.echo_text, server.completion_logprobs(requests[p_index].prompt_logprob_list[prompt_.skip:], 0)

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            async def stream():
                head = _completion_head(rid, created, model_name)
                offsets = {}  # (prompt, choice) -> text offset after that choice's last token
                echoed = set()
                left, last = len(prompts) * n, ""  # choices not finished; the chunk that finished the last one
                async for p_index, ev in _events(server, http, channel, requests):
                    key = (p_index, ev.index)
                    # the echo goes with a choice's first event: by then the scheduler has computed the
                    # prompt's logprobs (it does so before any event of the request)
                    echo_text, echo_lp = echo_part(p_index) if req.echo and key not in echoed else ("", None)
                    echoed.add(key)
                    if not (echo_text or ev.text) and ev.finish_reason is None and not ev.logprobs:
                        continue
                    if req.logprobs is None:  # the common chunk: a template
                        chunk = _completion_chunk(head, p_index * n + ev.index, echo_text + ev.text, ev.finish_reason)
                    else:
                        # offsets count token texts, as in the non-streamed response (not the text sent so far,
                        # which holds back a possible stop sequence)
                        offset = offsets.get(key, len(prompts[p_index].echo_text) if req.echo else 0)
                        lp = server.completion_logprobs(ev.logprobs, offset)
                        if lp["tokens"]:
                            offsets[key] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                        if echo_lp is not None:
                            lp = {k: echo_lp[k] + lp[k] for k in lp}
                        chunk = _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                      "choices": [{"index": p_index * n + ev.index, "text": echo_text + ev.text,
                                                   "logprobs": lp, "finish_reason": ev.finish_reason}]})
                    left -= ev.finish_reason is not None
                    if left:
                        yield chunk
                    else:  # the last chunk goes out with the usage and [DONE]: one write instead of three
                        last = chunk
                usage = _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                              "choices": [], "usage": _usage(requests)}) if include_usage else ""
                yield last + usage + "data: [DONE]\n\n"

            return StreamingResponse(_guard(stream()), media_type="text/event-stream")

        texts = {(p, c): "" for p in range(len(prompts)) for c in range(n)}
        lps: dict[tuple[int, int], list] = {key: [] for key in texts}
        reasons: dict[tuple[int, int], str | None] = {}
        async for p_index, ev in _events(server, http, channel, requests):
            texts[p_index, ev.index] += ev.text
            lps[p_index, ev.index] += ev.logprobs
            if ev.finish_reason is not None:
                reasons[p_index, ev.index] = ev.finish_reason
        choices = []
        for (p_index, c), text in texts.items():
            logprobs = None
            if req.logprobs is not None:
                prefix, offset = "", 0
                logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if req.echo:
                    prefix, echo_lp = echo_part(p_index)
                    logprobs = echo_lp
                    offset = len(prefix)
                gen = server.completion_logprobs(lps[p_index, c], offset)
                logprobs = {k: logprobs[k] + gen[k] for k in gen}
            text = (prompts[p_index].echo_text if req.echo else "") + text
            choices.append({"index": p_index * n + c, "text": text, "logprobs": logprobs,
                            "finish_reason": reasons.get((p_index, c))})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": _usage(requests)}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        req: ChatCompletionRequest = await server.parse(http, ChatCompletionRequest)
        if server.chat is None:
            raise APIError(400, f"the model {model_name!r} has no chat template (no \"chat_template\" in its "
                                "tokenizer_config.json and no chat_template.jinja): use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            text = server.chat.render([{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                                       for m in req.messages])
        except ChatTemplateError as err:
            raise APIError(400, str(err), param="messages") from None
        ids = server.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "the chat template rendered an empty prompt", param="messages")
        prompt = _Prompt(ids, text, 0)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        channel = server.channel()
        requests = server.build(req, [prompt], max_tokens, top, False, channel)
        await server.submit(requests)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            async def stream():
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
                for c in range(req.n):
                    yield _sse({**head, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                template = _completion_head(rid, created, model_name, "chat.completion.chunk")
                left, last = req.n, ""  # as in completions: the last chunk, the usage and [DONE] in one write
                async for _, ev in _events(server, http, channel, requests):
                    if not ev.text and ev.finish_reason is None and not ev.logprobs:
                        continue
                    if not req.logprobs:  # the common chunk: a template
                        chunk = _chat_chunk(template, ev.index, ev.text, ev.finish_reason)
                    else:
                        lp = server.chat_logprobs(ev.logprobs)
                        delta = {"content": ev.text} if ev.text else {}
                        chunk = _sse({**head, "choices": [{"index": ev.index, "delta": delta, "logprobs": lp,
                                                           "finish_reason": ev.finish_reason}]})
                    left -= ev.finish_reason is not None
                    if left:
                        yield chunk
                    else:
                        last = chunk
                usage = _sse({**head, "choices": [], "usage": _usage(requests)}) if include_usage else ""
                yield last + usage + "data: [DONE]\n\n"

            return StreamingResponse(_guard(stream()), media_type="text/event-stream")

        texts, entries, reasons = [""] * req.n, [[] for _ in range(req.n)], [None] * req.n
        async for _, ev in _events(server, http, channel, requests):
            texts[ev.index] += ev.text
            entries[ev.index] += ev.logprobs
            if ev.finish_reason is not None:
                reasons[ev.index] = ev.finish_reason
        choices = [{"index": c, "message": {"role": "assistant", "content": texts[c]},
                    "logprobs": server.chat_logprobs(entries[c]) if req.logprobs else None,
                    "finish_reason": reasons[c]} for c in range(req.n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name, "choices": choices,
                "usage": _usage(requests)}

    return app


async def _guard(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that fails after it started can no longer change its status: it ends with an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as err:
        yield _sse(err.body)
        yield "data: [DONE]\n\n"
