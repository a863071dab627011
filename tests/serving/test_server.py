"""The server through the real `openai` client (and raw HTTP) on 127.0.0.1, with a tiny trained checkpoint.

What each test shows: greedy output is `generate()`'s; requests batched together equal each request alone;
streaming and non-streaming agree; a vanished client frees its slot; a prefix-cache hit changes nothing
but the metrics; invalid requests get OpenAI-style errors and the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from mambakit.data import ByteTokenizer
from mambakit.generation import generate
from mambakit.serving import parse_metrics

from .conftest import CHAT_TEMPLATE, ServerThread

TOK = ByteTokenizer()


def _expected_greedy(model, ids: list[int], max_tokens: int, chunk: int = 16) -> tuple[str, str]:
    """(text, finish_reason) that generate() gives: greedy, stopping at EOS (not part of the text)."""
    new = generate(model, [ids], max_tokens, eos_token_id=TOK.eos_id, prefill_tokens_per_call=chunk)[0]
    if new and new[-1] == TOK.eos_id:
        return TOK.decode(new[:-1]), "stop"
    return TOK.decode(new), "length"


def _metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics", timeout=10).text)


def _wait_for(server, predicate, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        if predicate(m):
            return m
        assert time.monotonic() < deadline, f"metrics never satisfied the condition: {m}"
        time.sleep(0.05)


def _still_serves(client) -> None:
    out = client.completions.create(model="tiny", prompt="the rest", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


PROMPTS = [
    pytest.param("to be or not", id="short"),
    pytest.param("the rest is silence\nall the world's a stage\nnow is the winter of", id="three-chunks"),
    pytest.param("x", id="one-char"),
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_generate(client, checkpoint, prompt):
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    text, reason = _expected_greedy(checkpoint[1], [TOK.eos_id] + TOK.encode(prompt), 40)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(TOK.encode(prompt)) + 1


def test_token_id_prompts_and_several_prompts_in_one_request(client, checkpoint):
    ids = [TOK.eos_id] + TOK.encode("all the world")
    out = client.completions.create(model="tiny", prompt=[ids, ids[:5]], max_tokens=12, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == _expected_greedy(checkpoint[1], ids, 12)[0]
    assert out.choices[1].text == _expected_greedy(checkpoint[1], ids[:5], 12)[0]


def _mixed_requests() -> list[dict]:
    """32 requests: prompts of 1 to ~90 bytes, 3 to 40 new tokens, greedy and sampled settings, stops, n=2."""
    texts = ["to be", "the rest is silence", "all the world's a stage and all the men and women merely players",
             "now", "is the winter of our discontent made glorious summer by this sun of york and all the clouds",
             "q", "that is the question\nwhether tis nobler", "a stage"]
    settings = [dict(temperature=0), dict(temperature=0.9, seed=11), dict(temperature=0.7, top_p=0.8, seed=3),
                dict(temperature=1.0, seed=5, extra_body={"top_k": 5}),
                dict(temperature=0.8, seed=9, extra_body={"min_p": 0.1, "repetition_penalty": 1.3}),
                dict(temperature=0, frequency_penalty=0.5, presence_penalty=0.3), dict(temperature=0, stop=["e "]),
                dict(temperature=1.2, seed=21, n=2)]
    requests = []
    for i in range(32):
        requests.append(dict(prompt=texts[i % len(texts)][: 5 + 7 * i], max_tokens=3 + (i * 7) % 38,
                             **settings[(i * 3) % len(settings)]))
    return requests


def _run(client, request: dict) -> list[tuple[str, str]]:
    out = client.completions.create(model="tiny", **request)
    return [(c.text, c.finish_reason) for c in sorted(out.choices, key=lambda c: c.index)]


@pytest.mark.slow
def test_concurrent_mixed_requests_each_equal_the_request_alone(client, server):
    requests = _mixed_requests()
    alone = [_run(client, r) for r in requests]
    before = _metrics(server)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: _run(client, r), requests))
    after = _metrics(server)
    assert together == alone
    # they did share decode steps: fewer steps than tokens
    steps = after["mambakit_decode_steps_total"] - before["mambakit_decode_steps_total"]
    tokens = after["mambakit_generation_tokens_total"] - before["mambakit_generation_tokens_total"]
    assert steps < tokens / 2, (steps, tokens)


def test_several_decode_steps_per_round_trip_change_no_output(client, checkpoint):
    """decode_steps=4: tokens after a row's end inside a block are dropped, so every output is the same."""
    srv = ServerThread(checkpoint[1], TOK, max_batch_size=8, max_queue=64, prefill_chunk=16, decode_steps=4,
                       max_model_len=4096)
    try:
        requests = _mixed_requests()[:16]
        alone = [_run(client, r) for r in requests]
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client4:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                together = list(pool.map(lambda r: _run(client4, r), requests))
    finally:
        srv.stop()
    assert together == alone


def test_a_stream_sends_one_chunk_per_decode_block(checkpoint):
    """decode_steps k: a streamed choice of n tokens arrives in at most ceil(n/k) + 1 chunks (the k tokens of a
    block are one SSE delta), which join to the non-streamed text; chat streams the same way."""
    k, n = 8, 61
    srv = ServerThread(checkpoint[1], TOK, chat_template=CHAT_TEMPLATE, max_batch_size=4, prefill_chunk=16,
                       decode_steps=k, max_model_len=4096)
    body = {"model": "tiny", "prompt": "to be or not", "max_tokens": n, "temperature": 0, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as http:
            whole = http.post(srv.url + "/v1/completions", json=body).json()
            streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
            with http.stream("POST", srv.url + "/v1/completions", json=streamed) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "to be"}], "max_tokens": n,
                    "temperature": 0, "ignore_eos": True}
            chat_whole = http.post(srv.url + "/v1/chat/completions", json=chat).json()
            with http.stream("POST", srv.url + "/v1/chat/completions", json={**chat, "stream": True}) as r:
                chat_chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finally:
        srv.stop()
    deltas = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in deltas) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == n == whole["usage"]["completion_tokens"]
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"
    assert 1 <= len(deltas) <= -(-n // k) + 1, len(deltas)
    chat_deltas = chat_chunks[1:]  # after the role chunk
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat_deltas) == \
        chat_whole["choices"][0]["message"]["content"]
    assert 1 <= len(chat_deltas) <= -(-n // k) + 1, len(chat_deltas)


CHUNK_TEXTS = [
    pytest.param("plain", None, id="text"),
    pytest.param('quote " backslash \\ newline \n tab \t é ✓ \u2028', None, id="escapes-and-unicode"),
    pytest.param("", "stop", id="empty-with-finish"),
    pytest.param("end", "length", id="text-with-finish"),
]


@pytest.mark.parametrize("text, finish_reason", CHUNK_TEXTS)
def test_templated_sse_chunks_are_the_bytes_of_the_encoded_dicts(text, finish_reason):
    from mambakit.serving.app import _chat_chunk, _completion_chunk, _completion_head, _sse

    rid, created, model = "cmpl-1a2b", 1700000000, 'my "model" é'
    assert _completion_chunk(_completion_head(rid, created, model), 3, text, finish_reason) == _sse(
        {"id": rid, "object": "text_completion", "created": created, "model": model,
         "choices": [{"index": 3, "text": text, "logprobs": None, "finish_reason": finish_reason}]})
    chat_head = _completion_head(rid, created, model, "chat.completion.chunk")
    assert _chat_chunk(chat_head, 1, text, finish_reason) == _sse(
        {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "choices": [{"index": 1, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish_reason}]})


STREAMED = [
    pytest.param(dict(prompt="to be or not", max_tokens=30, temperature=0), id="greedy"),
    pytest.param(dict(prompt="the rest is", max_tokens=30, temperature=0.9, seed=7, stop=["is", "\n"]),
                 id="sampled-with-stops"),
    pytest.param(dict(prompt="all the", max_tokens=10, temperature=0.8, seed=1, n=3, echo=True), id="n3-echo"),
]


@pytest.mark.parametrize("request_kwargs", STREAMED)
def test_streamed_chunks_join_to_the_non_streamed_text(client, request_kwargs):
    whole = client.completions.create(model="tiny", **request_kwargs)
    pieces: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.completions.create(model="tiny", stream=True, **request_kwargs):
        for c in chunk.choices:
            pieces[c.index] = pieces.get(c.index, "") + c.text
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    assert pieces == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}


def test_chat_completion_uses_the_template_and_streams_the_same_text(client, checkpoint):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "to be"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    rendered = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
    text, reason = _expected_greedy(checkpoint[1], TOK.encode(rendered), 20)
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == reason
    assert out.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == text


def test_logprobs_and_echo(client, checkpoint):
    out = client.completions.create(model="tiny", prompt="to be", max_tokens=5, temperature=0, logprobs=2, echo=True)
    choice = choice = out.choices[0]
    assert choice.text.startswith("to be")
    lp = choice.logprobs
    # the prompt's 5 tokens (after the start token) and 5 new ones, each with its log-probability
    assert len(lp.tokens) == len(lp.token_logprobs) == 10
    assert "".join(lp.tokens) == choice.text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    # greedy picks the most likely token: its logprob is the best of the top ones
    for token, value, top in zip(lp.tokens[5:], lp.token_logprobs[5:], lp.top_logprobs[5:]):
        assert value == pytest.approx(max(top.values()), abs=1e-5)


ECHOES = [pytest.param(False, id="no-echo"), pytest.param(True, id="echo")]


@pytest.mark.parametrize("echo", ECHOES)
def test_streamed_logprobs_equal_the_non_streamed_ones(client, echo):
    kwargs = dict(model="tiny", prompt="all the world", max_tokens=12, temperature=0.7, seed=2, logprobs=3, echo=echo)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        lp = chunk.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens
            values += lp.token_logprobs
            offsets += lp.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert values == pytest.approx(whole.token_logprobs, abs=1e-6)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"model": "tiny", "prompt": "to be", "max_tokens": 12000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = _metrics(server)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert sum(line.startswith("data: ") for line in received) >= 3
            assert _metrics(server)["mambakit_running_sequences"] == 1
        # leaving the block closes the connection mid-stream
    key = 'mambakit_request_finish_total{reason="abort"}'
    after = _wait_for(server, lambda m: m["mambakit_running_sequences"] == 0 and m.get(key, 0) > before.get(key, 0))
    assert after["mambakit_free_slots"] == 8
    assert after["mambakit_generation_tokens_total"] - before["mambakit_generation_tokens_total"] < 12000


def test_a_client_that_drops_a_non_streamed_request_frees_its_slot(server):
    body = {"model": "tiny", "prompt": "to be", "max_tokens": 12000, "temperature": 0, "ignore_eos": True}
    before = _metrics(server)
    with httpx.Client(timeout=1.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post(server.url + "/v1/completions", json=body)  # gives up after 1.5 s: the connection closes
    key = 'mambakit_request_finish_total{reason="abort"}'
    after = _wait_for(server, lambda m: m["mambakit_running_sequences"] == 0 and m.get(key, 0) > before.get(key, 0))
    assert after["mambakit_generation_tokens_total"] - before["mambakit_generation_tokens_total"] < 12000


def test_a_prefix_hit_gives_identical_output_and_is_counted(client, server):
    shared = "the rest is silence\nall the world's a stage\nnow is"  # 1 + 48 tokens: 3 whole chunks of 16
    other = shared + " the winter of our discontent"
    requests = [dict(max_tokens=25, temperature=0), dict(max_tokens=25, temperature=0.9, seed=4)]
    server.clear_prefix_cache()
    cold = [_run(client, dict(prompt=other, **r)) for r in requests]  # the second one hits the first one's states
    server.clear_prefix_cache()
    client.completions.create(model="tiny", prompt=shared + " the summer", max_tokens=1, temperature=0)
    before = _metrics(server)
    warm = _run(client, dict(prompt=other, **requests[0]))
    after = _metrics(server)
    assert warm == cold[0]
    assert after["mambakit_prefix_cache_hits_total"] == before["mambakit_prefix_cache_hits_total"] + 1
    assert after["mambakit_prefix_cache_hit_tokens_total"] == before["mambakit_prefix_cache_hit_tokens_total"] + 48
    # the same prompt again: its whole state (and last logits) is stored, so no prefill at all
    again = _run(client, dict(prompt=other, **requests[1]))
    final = _metrics(server)
    assert again == cold[1]
    assert final["mambakit_prefix_cache_hit_tokens_total"] == after["mambakit_prefix_cache_hit_tokens_total"] \
        + len(TOK.encode(other)) + 1
    assert final["mambakit_prefill_chunks_total"] == after["mambakit_prefill_chunks_total"]


BAD_REQUESTS = [
    pytest.param(b'{"model": "tiny", "prompt": ', 400, None, "not valid JSON", id="malformed-json"),
    pytest.param(b'["model", "tiny"]', 400, None, "must be a JSON object", id="not-an-object"),
    pytest.param({"model": "tiny", "prompt": "x", "temprature": 0.5}, 400, "temprature", "unknown field",
                 id="unknown-field"),
    pytest.param({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0",
                 id="negative-max-tokens"),
    pytest.param({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid value",
                 id="bad-temperature"),
    pytest.param({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4",
                 id="five-stops"),
    pytest.param({"model": "tiny", "prompt": "x" * 17000}, 400, "prompt", "maximum context length is 16384",
                 id="too-long-prompt"),
    pytest.param({"model": "tiny", "prompt": "x" * 16300, "max_tokens": 100}, 400, "prompt", "maximum context length",
                 id="prompt-plus-max-tokens-too-long"),
    pytest.param({"model": "tiny", "prompt": [1, 2, 300]}, 400, "prompt", "token ids must lie in [0, 256)",
                 id="token-id-out-of-vocab"),
    pytest.param({"model": "tiny", "prompt": "x", "n": 9}, 400, "n", "larger than the server's --max-batch-size",
                 id="n-above-slots"),
    pytest.param({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist", id="unknown-model"),
]


@pytest.mark.parametrize("body, status, param, message", BAD_REQUESTS)
def test_invalid_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, param, message):
    with httpx.Client(timeout=30) as http:
        if isinstance(body, bytes):
            response = http.post(server.url + "/v1/completions", content=body,
                                 headers={"Content-Type": "application/json"})
        else:
            response = http.post(server.url + "/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    _still_serves(client)


def test_openai_client_raises_its_error_types(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x" * 17000)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    _still_serves(client)


def test_models_health_and_metrics_endpoints(server):
    with httpx.Client(timeout=10) as http:
        assert http.get(server.url + "/health").json() == {"status": "ok"}
        models = http.get(server.url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
        text = http.get(server.url + "/metrics").text
    for name in ("mambakit_queue_length", "mambakit_running_sequences", "mambakit_tokens_per_second",
                 "mambakit_time_to_first_token_seconds_count", "mambakit_prefix_cache_hits_total",
                 "mambakit_gc_pause_seconds", "mambakit_gc_collections_gen2"):
        assert f"\n{name} " in "\n" + text
    # with an engine process, the HTTP process's own collector pauses follow the engine's figures
    engine = server.scheduler.__class__.__name__ == "EngineClient"
    assert ("\nmambakit_http_gc_pause_seconds " in text) == engine


@pytest.mark.parametrize("engine", [pytest.param(False, id="thread"), pytest.param(True, id="engine-process")])
def test_a_full_queue_gets_429_and_the_server_keeps_serving(checkpoint, engine):
    srv = ServerThread(checkpoint[1], TOK, max_batch_size=1, max_queue=1, prefill_chunk=16, max_model_len=32768,
                       engine_dir=checkpoint[0] if engine else None)
    body = {"model": "tiny", "prompt": "to be", "max_tokens": 30000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.Client(timeout=30) as http, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused",
                                                             max_retries=0) as client:
            with http.stream("POST", srv.url + "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a discarded line iterator closes the response
                assert next(lines).startswith("data: ")
                with httpx.Client(timeout=30) as http2, http2.stream("POST", srv.url + "/v1/completions",
                                                                     json=body) as queued:
                    _wait_for(srv, lambda m: m["mambakit_queue_length"] == 1)
                    with pytest.raises(openai.RateLimitError) as info:
                        client.completions.create(model="tiny", prompt="x", max_tokens=2)
                    assert info.value.status_code == 429
                    assert info.value.body["code"] == "queue_full" and "queue is full" in info.value.body["message"]
                    assert queued.status_code == 200
            _wait_for(srv, lambda m: m["mambakit_running_sequences"] == 0 and m["mambakit_queue_length"] == 0)
            _still_serves(client)
            assert _metrics(srv)["mambakit_requests_rejected_total"] == 1
    finally:
        srv.stop()


def test_chat_without_a_template_is_a_clear_400(checkpoint):
    srv = ServerThread(checkpoint[1], TOK, max_batch_size=2, max_queue=4)
    try:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            assert info.value.body["code"] == "no_chat_template"
            assert "has no chat template" in info.value.body["message"]
            _still_serves(client)
    finally:
        srv.stop()


def test_the_models_own_stop_strings_end_completions_and_chats(checkpoint):
    """A tokenizer's stop_strings (generation_config.json: a model fine-tuned with `--task chat` and the default
    template ends its turns with "<|end|>") end every reply without being asked, as a request's `stop` does."""
    with_stops = ByteTokenizer()
    free = TOK.decode(generate(checkpoint[1], [[TOK.eos_id] + TOK.encode("to be")], 24, temperature=0.0)[0])
    stop = free[3:5]
    with_stops.stop_strings = (stop,)
    srv = ServerThread(checkpoint[1], with_stops, chat_template=CHAT_TEMPLATE, max_batch_size=2, prefill_chunk=16,
                       max_model_len=4096)
    try:
        with httpx.Client(timeout=60) as http:
            text = http.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "to be", "max_tokens": 24,
                                                               "temperature": 0}).json()["choices"][0]
            chat = http.post(srv.url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "to be"}], "max_tokens": 24,
                "temperature": 0}).json()["choices"][0]
    finally:
        srv.stop()
    assert text["text"] == free[:free.index(stop)] and text["finish_reason"] == "stop"
    assert stop not in chat["message"]["content"]
