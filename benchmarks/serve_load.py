"""Load test of `mambakit serve` on 127.0.0.1: throughput and time to first token at several client counts,
against offline `generate()` at the same batch size and lengths.

The server runs in a child process (so the load generator does not share its interpreter), built from a
checkpoint (--model DIR) or from random weights of a named shape (--model-shape), on 127.0.0.1 only. Each
of C clients (each with its own HTTP connection; a small HTTP/1.1 client on asyncio streams, or httpx with
--client httpx) sends streamed completion requests back to back (random token-id prompts of --prompt-len
tokens, --new-tokens new tokens each, EOS ignored so every request has the same length); a level ends
after --requests-per-client requests per client or --time-limit seconds, whichever comes first. Reported
per level:

    throughput_tok_s      new tokens received / wall time of the level (first request sent -> last answer)
    ttft_p50_s, ttft_p99_s  request sent -> first streamed token, over the level's requests
    offline_tok_s         generate() on the same weights: batch C (capped by --offline-max-batch), the same
                          prompt and new-token counts, prefill included, best of --offline-repeats runs,
                          measured in this process right before the level (the server idles meanwhile)
    ratio                 throughput_tok_s / offline_tok_s
    server_cpu_us_per_token  the server process's CPU time (all its threads) over the level / new tokens
                          (Linux); with `--model-shape stub` this is the host path's cost per token
                          and, with --engine-process, of the engine process below it
    server_http_cpu_us_per_token  the part of it spent by the main thread (uvicorn's event loop: HTTP, SSE)
    http_process_cpu_us_per_token, engine_cpu_us_per_token  with --engine-process: the HTTP process (event loop
                          and the reader thread that detokenizes) and the engine process (scheduler, model)
    device_mallocs        CUDA: the server's cudaMalloc calls during the level (its caching allocator growing:
                          each call synchronises the device)
    gc                    the garbage collector's pauses in the scheduler's process during the level (ms, all
                          generations; full collections) and, with --engine-process, in the HTTP process (http_)
    scheduler_us_per_token  the scheduler thread's wall time per phase (idle, admit, prefill, launch, wait for
                          the device, process the tokens, flush events) / new tokens, from /metrics
    client_cpu_us_per_token, client_cpu_busy  the load generator's CPU time per token, and per second of the
                          level (near 1.0: the client, one process, is the limit, not the server)
Before each level, every client sends one short request (8 new tokens), not counted: the device kernels
compile for that level's batch shapes off the clock, as the baseline's warm-up run does for generate().

One JSON object goes to stdout (progress to stderr): the settings, the device, versions, the date, the
machine's load average before and after, and one row per level.

Usage (repository root; needs the serve extra and httpx):
    python benchmarks/serve_load.py --device cpu --model-shape small --clients 1,8,64,256
    python benchmarks/serve_load.py --device cuda --model-shape 130m --clients 1,8,64,256 \\
        --prompt-len 128 --new-tokens 256          # GPU machine: the 130M acceptance (64 clients >= 80%)
    python benchmarks/serve_load.py --device cpu --model runs/shakespeare --clients 1,8
    python benchmarks/serve_load.py --device cpu --model-shape stub --clients 64,256 --decode-steps 8 --no-offline
                                                   # the server's host cost per token: a model that costs nothing
    python benchmarks/serve_load.py --device cpu --model-shape stub --clients 64 --decode-steps 8 --no-offline \\
        --engine-process                           # the same with the scheduler in an engine process
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import socket
import ssl
import statistics
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (preset or explicit config kwargs)
    "tiny": dict(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 32}),
    "small": "bytes-mamba2-small",
    "130m": "mamba-130m",
    "mamba-130m": "mamba-130m",
    "mamba2-130m": "mamba2-130m",
    # not a model: `_StubLM`, whose forward is a table lookup, so that the server's host path is all there is
    "stub": dict(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16}),
    # the same with 24 layers of (tiny) cache, as many as the 130M models have: the scheduler's per-layer slot
    # copies and prefix-state copies per request run as often as they would there (each a kernel launch on a GPU)
    "stub24": dict(d_model=16, n_layer=24, vocab_size=256, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16}),
}


def _stub_class():
    """`_StubLM` (built on first use: torch and mambakit are imported inside the child process)."""
    import torch

    from mambakit import MambaLM

    class _StubLM(MambaLM):
        """Benchmark-only: a MambaLM whose forward costs next to nothing (the logits of token t are row t of a
        fixed table, the greedy successor of t is (t * 5 + 3) % vocab), with a real one-layer cache so the
        scheduler's slot copies run as usual. Measures the server's per-token host cost (scheduling, sampling
        readback, detokenization, JSON, HTTP) with the model's time taken out; its output means nothing."""

        def __init__(self, config, device=None, dtype=None):
            super().__init__(config, device=device, dtype=dtype)
            V = config.padded_vocab_size
            table = torch.zeros(V, V, device=device, dtype=dtype)
            table[torch.arange(V), (torch.arange(V) * 5 + 3) % config.vocab_size] = 1.0
            self.register_buffer("table", table)

        def forward(self, input_ids, cache=None, seq_idx=None, logits_to_keep=0):
            if cache is not None:
                cache.advance(input_ids.shape[1])
            ids = input_ids[:, -logits_to_keep:] if logits_to_keep > 0 else input_ids
            return self.table[ids]

    return _StubLM


class IdTokenizer:
    """A stand-in tokenizer for random-weight models: token i reads as " i" (no real vocabulary exists offline)."""

    eos_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(t) % self.vocab_size for t in text.split()]

    def decode(self, ids) -> str:
        return "".join([" " + str(i) for i in ids])


def _log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _build(args):
    """(model, tokenizer) on args.device in args.dtype."""
    import torch

    from mambakit import MambaConfig, MambaLM
    from mambakit.models import preset

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else ("bfloat16" if args.device.startswith("cuda")
                                                                      else "float32"))
    if args.model:
        from mambakit.checkpoints import load_checkpoint_tokenizer

        model = MambaLM.from_pretrained(args.model, dtype=dtype, device=torch.device(args.device)).eval()
        return model, load_checkpoint_tokenizer(args.model)
    spec = SHAPES[args.model_shape]
    config = preset(spec) if isinstance(spec, str) else MambaConfig(**spec)
    torch.manual_seed(0)
    model_cls = _stub_class() if args.model_shape.startswith("stub") else MambaLM
    model = model_cls(config, device=torch.device(args.device), dtype=dtype).eval()
    return model, IdTokenizer(config.vocab_size)


def _tokenizer(args):
    """The tokenizer of the run's model, without building the model (the HTTP process of --engine-process)."""
    if args.model:
        from mambakit.checkpoints import load_checkpoint_tokenizer

        return load_checkpoint_tokenizer(args.model)
    return IdTokenizer(_build_vocab(args))


def _engine_process(args) -> bool:
    """--engine-process as `mambakit serve` defaults it: on for CUDA, off on CPU."""
    return args.device.startswith("cuda") if args.engine_process is None else args.engine_process


def _serve(args, port: int, ready) -> None:
    """Child process: the server on 127.0.0.1:port until SIGTERM (with --engine-process, the model and the
    scheduler in a grandchild, the engine process, as `mambakit serve` runs them)."""
    import functools
    import signal

    import uvicorn

    from mambakit.serving import Scheduler, create_app
    from mambakit.serving.engine import EngineClient
    from mambakit.serving.heap import freeze_heap

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    kwargs = dict(max_batch_size=args.max_batch_size, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                  prefix_cache_bytes=args.prefix_cache_mb << 20, cuda_graph=args.cuda_graph,
                  max_model_len=args.prompt_len + args.new_tokens + 1,
                  decode_steps=args.decode_steps or (8 if args.device.startswith("cuda") else 1),
                  max_prefill_tokens=args.max_prefill_tokens, compile=args.compile,
                  prefill_graphs=args.prefill_graphs)
    if _engine_process(args):
        tokenizer = _tokenizer(args)
        scheduler = EngineClient(functools.partial(_build, args), tokenizer, kwargs, log_level="warning",
                                 freeze_heap=args.freeze_heap)
    else:
        model, tokenizer = _build(args)
        scheduler = Scheduler(model, tokenizer, **kwargs).start()
    if args.freeze_heap:
        freeze_heap()
    app = create_app(scheduler, tokenizer, "bench")
    if args.server_log:
        import logging

        logging.basicConfig(filename=args.server_log, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # keep-alive longer than any level: at uvicorn's 5 s a client can pick an idle pooled connection just as
    # the server closes it (a read error that is the benchmark's, not the server's)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5, timeout_keep_alive=3600))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    ready.set()
    server.run()


def _descendants(pid: int) -> list[int]:
    """The process ids below `pid` ([] when it is gone): the engine process of --engine-process."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_cpu_seconds(pid: int) -> tuple[float | None, float | None]:
    """(CPU seconds of `pid`, of its descendants together) so far."""
    own = _cpu_seconds(pid)
    below = [_cpu_seconds(child) for child in _descendants(pid)]
    return own, sum(c for c in below if c is not None)


def _cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU time of process `pid` (or of its thread `thread`) so far (Linux /proc; None elsewhere)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phases(url: str) -> dict[str, float]:
    """The server's `mambakit_scheduler_seconds_total` per phase (seconds so far)."""
    import httpx

    from mambakit.serving.metrics import parse_metrics

    metrics = parse_metrics(httpx.get(url + "/metrics", timeout=30).text)
    prefix = 'mambakit_scheduler_seconds_total{phase="'
    phases = {name[len(prefix):-2]: value for name, value in metrics.items() if name.startswith(prefix)}
    return phases | {"prefill_calls": metrics.get("mambakit_prefill_chunks_total", 0.0),
                     "prefill_graph_calls": metrics.get("mambakit_prefill_graph_calls_total", 0.0),
                     "device_mallocs": metrics.get("mambakit_device_mallocs"),  # None off CUDA
                     # garbage-collector pauses of the scheduler's process and (engine process) of the HTTP one
                     "gc": {name: metrics.get(f"mambakit_{name}") for name in (
                         "gc_pause_seconds", "gc_collections_gen2", "http_gc_pause_seconds",
                         "http_gc_collections_gen2")}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


async def _one_request(http, url: str, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, new tokens) of one streamed request."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else float("nan")), time.perf_counter() - t0, tokens


class _RawClient:
    """One client on one keep-alive HTTP/1.1 connection, written on asyncio streams: the same requests as the
    httpx client, at a fraction of its CPU per request and per chunk.

    Why: the load generator is one process playing C clients. With identical request lengths, all C finish in
    the same decode block and send their next requests together, so the client's per-request cost times C is
    time in which the server's slots are empty; httpx (with h11) cost about as much CPU per token as the
    server itself. Only the first token's chunk and the usage chunk are parsed as JSON.
    """

    def __init__(self, url: str, timeout: float):
        host_port = url.split("://", 1)[1]
        self.host, self.port = host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, body: dict) -> tuple[float, float, int]:
        return await asyncio.wait_for(self._request(body), self.timeout)

    async def _request(self, body: dict) -> tuple[float, float, int]:
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        reader = self.reader
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        ttft, tokens, pending = None, 0, b""
        if headers.get("transfer-encoding") == "chunked":
            while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                pending += (await reader.readexactly(size + 2))[:-2]  # the chunk without its CRLF
                *lines, pending = pending.split(b"\n")  # SSE lines; a line cut by a chunk end waits
                for line in lines:
                    if b'"usage": {' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                    elif ttft is None and line.startswith(b"data: {"):
                        choices = json.loads(line[6:])["choices"]
                        if choices and choices[0]["text"]:
                            ttft = time.perf_counter() - t0
            await reader.readline()  # the CRLF after the last chunk
        else:
            pending = await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            await self.close()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {pending[:300]!r}")
        return (ttft if ttft is not None else float("nan")), time.perf_counter() - t0, tokens

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def _level(url: str, clients: int, args, vocab: int) -> dict:
    import httpx

    deadline = time.perf_counter() + args.time_limit
    prompts = _prompts(clients * args.requests_per_client, args.prompt_len, vocab, seed=clients)
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []

    async def client(i: int, http) -> None:
        for r in range(args.requests_per_client):
            if time.perf_counter() > deadline:
                return
            prompt = prompts[i * args.requests_per_client + r]
            try:
                if isinstance(http, _RawClient):
                    body = {"model": "bench", "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0,
                            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
                    results.append(await http.request(body))
                else:
                    results.append(await _one_request(http, url, prompt, args.new_tokens))
            except (httpx.HTTPError, RuntimeError, OSError, asyncio.IncompleteReadError,
                    asyncio.TimeoutError, ValueError) as err:  # counted and reported, the level goes on
                errors.append(f"{type(err).__name__}: {err}")
                if isinstance(http, _RawClient):
                    await http.close()

    if args.client == "raw":
        https = [_RawClient(url, args.time_limit + 600) for _ in range(clients)]
    else:
        # one connection pool per client, as C separate clients would have: httpcore's pool does work quadratic
        # in its connections at every request start and end (at 256 connections in one shared pool, the load
        # generator spent 72% of its time there and became the bottleneck, not the server)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = ssl.create_default_context()  # unused on http://, but each client would build its own (10 ms each)
        https = [httpx.AsyncClient(timeout=args.time_limit + 600, limits=limits, verify=tls) for _ in range(clients)]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i, http in enumerate(https)))
        wall = time.perf_counter() - t0
    finally:
        for http in https:
            await (http.close() if isinstance(http, _RawClient) else http.aclose())
    ttfts = sorted(r[0] for r in results) or [float("nan")]
    tokens = sum(r[2] for r in results)

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(round(q * (len(ttfts) - 1))))]

    return {"clients": clients, "requests": len(results), "errors": len(errors), "first_errors": errors[:3],
            "new_tokens": tokens, "wall_s": round(wall, 3),
            "throughput_tok_s": round(tokens / wall, 1), "ttft_p50_s": round(pct(0.5), 4),
            "ttft_p99_s": round(pct(0.99), 4), "latency_mean_s": round(statistics.mean(r[1] for r in results), 3) if results else None}


def _offline(args, batch: int, vocab: int) -> float:
    """New tokens/s of generate() at `batch` prompts of the same lengths (prefill included), best of N runs."""
    import torch

    from mambakit.generation import CUDAGraphDecoder, generate

    model, _ = _build(args)
    prompts = torch.tensor(_prompts(batch, args.prompt_len, vocab, seed=1000 + batch), device=args.device)
    # captured once, outside the timing, as the server captures its graphs once at start-up
    graph = CUDAGraphDecoder(model, batch) if args.cuda_graph and args.device.startswith("cuda") else False
    best = float("inf")
    for _ in range(args.offline_repeats + 1):  # the first run warms up (Triton compiles and tunes; --compile)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, prompts, args.new_tokens, cuda_graph=graph, prefill_tokens_per_call=None,
                 compile=args.compile)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del model, graph
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return batch * args.new_tokens / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory (default: random weights of --model-shape)")
    src.add_argument("--model-shape", default="small", choices=sorted(SHAPES), help="random-weight shape (default small)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--clients", default="1,8,64,256", help="comma-separated client counts (default 1,8,64,256)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level after which no request starts")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--prefix-cache-mb", type=int, default=512)
    p.add_argument("--freeze-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the server processes' start-up heaps out of the garbage collector, as `mambakit serve` "
                        "does (default on)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA graphs in the server's decode step and in the generate() baseline (default on)")
    p.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="the server's full prefill chunks replayed from CUDA graphs (default: with --cuda-graph on "
                        "CUDA; --no-prefill-graphs runs them eagerly, to compare)")
    p.add_argument("--decode-steps", type=int, default=0, help="server decode steps per host round trip "
                                                               "(default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--compile", action="store_true",
                   help="CPU: the decode step compiled by torch.compile, in the server and in the generate() baseline")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the server's scheduler and model in an engine process of their own, as `mambakit serve "
                        "--engine-process` (default: as mambakit serve, on for CUDA, off on CPU)")
    p.add_argument("--client", default="raw", choices=("raw", "httpx"),
                   help="the load generator's HTTP client: raw asyncio streams (default, light) or httpx")
    p.add_argument("--server-log", default=None, help="write the server's request log to this file")
    p.add_argument("--switch-interval", type=float, default=0.0005,
                   help="sys.setswitchinterval in the server, as `mambakit serve` sets it (default 0.0005)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in the server and the baseline (default: torch's). On a CPU shared with "
                        "other jobs, 1 avoids OpenMP threads waiting on descheduled peers")
    p.add_argument("--offline-max-batch", type=int, default=64, help="largest batch of the generate() baseline")
    p.add_argument("--offline-repeats", type=int, default=2)
    p.add_argument("--no-offline", action="store_true", help="skip the generate() baseline")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import torch

    import mambakit

    load_before = os.getloadavg()
    vocab = _build_vocab(args)
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    # not a daemon: a daemonic process may not start children, and --engine-process starts the engine process
    proc = ctx.Process(target=_serve, args=(args, port, ready), daemon=False)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        _wait_ready(url, proc, ready)
        for c in clients:
            # the baseline right before its level (the server idles meanwhile), so that both see the same
            # machine: on a shared CPU the load moves between minutes
            base = None
            if not args.no_offline:
                _log(f"offline generate() at batch {min(c, args.offline_max_batch)} ...")
                base = _offline(args, min(c, args.offline_max_batch), vocab)
            # one short request per client first: kernels compile for this level's batch shapes off the clock
            asyncio.run(_level(url, c, argparse.Namespace(**{**vars(args), "requests_per_client": 1,
                                                             "new_tokens": min(8, args.new_tokens)}), vocab))
            _log(f"{c} clients ...")
            (cpu0, engine0), http0 = _tree_cpu_seconds(proc.pid), _cpu_seconds(proc.pid, proc.pid)
            phases0, client0 = _phases(url), time.process_time()
            row = asyncio.run(_level(url, c, args, vocab))
            (cpu1, engine1), http1 = _tree_cpu_seconds(proc.pid), _cpu_seconds(proc.pid, proc.pid)
            phases1, client1 = _phases(url), time.process_time()
            if row["new_tokens"]:
                # the load generator's own CPU time: near 1 s per second, it (not the server) is the limit
                row["client_cpu_us_per_token"] = round(1e6 * (client1 - client0) / row["new_tokens"], 1)
                row["client_cpu_busy"] = round((client1 - client0) / row["wall_s"], 2)
                # the scheduler thread's wall time per phase, per new token (its /metrics counters)
                calls = phases1.pop("prefill_calls") - phases0.pop("prefill_calls")
                graphed = phases1.pop("prefill_graph_calls") - phases0.pop("prefill_graph_calls")
                mallocs0, mallocs1 = phases0.pop("device_mallocs"), phases1.pop("device_mallocs")
                gc0, gc1 = phases0.pop("gc"), phases1.pop("gc")
                # the collector's pauses during the level: ms (all generations) and full collections, per process
                row["gc"] = {name.replace("seconds", "ms"):
                             round((1000 if "seconds" in name else 1) * (gc1[name] - gc0[name]), 1)
                             for name in gc1 if gc1[name] is not None and gc0[name] is not None}
                row["scheduler_us_per_token"] = {
                    k: round(1e6 * (phases1[k] - phases0.get(k, 0.0)) / row["new_tokens"], 2) for k in phases1}
                # model calls that prefilled prompts: one per wave of arrivals at best (each costs the host a
                # whole forward's launches)
                row["prefill_calls_per_request"] = round(calls / max(1, row["requests"]), 3)
                row["prefill_graph_share"] = round(graphed / calls, 3) if calls else None  # of those, replayed
                if mallocs1 is not None:  # CUDA: the caching allocator's cudaMalloc calls during the level
                    row["device_mallocs"] = int(mallocs1 - mallocs0)
            if cpu0 is not None and cpu1 is not None and row["new_tokens"]:
                # the server's CPU time per token (its processes together: with --engine-process, the engine
                # too): on a shared machine a steadier measure than tokens/s
                both = (cpu1 - cpu0) + (engine1 - engine0)
                row["server_cpu_s"] = round(both, 2)
                row["server_cpu_us_per_token"] = round(1e6 * both / row["new_tokens"], 1)
                # of which the main thread's: uvicorn's event loop (HTTP, SSE)
                row["server_http_cpu_us_per_token"] = round(1e6 * (http1 - http0) / row["new_tokens"], 1)
                if _engine_process(args):
                    # the HTTP process (event loop + the engine client's reader: detokenization) and the engine
                    # process (scheduler, model, pipe), each on a core of its own
                    row["http_process_cpu_us_per_token"] = round(1e6 * (cpu1 - cpu0) / row["new_tokens"], 1)
                    row["engine_cpu_us_per_token"] = round(1e6 * (engine1 - engine0) / row["new_tokens"], 1)
            if base is not None:
                row["offline_batch"] = min(c, args.offline_max_batch)
                row["offline_tok_s"] = round(base, 1)
                row["ratio"] = round(row["throughput_tok_s"] / base, 3)
            row["load_avg_1min"] = round(os.getloadavg()[0], 2)
            _log("  " + json.dumps(row))
            rows.append(row)
    finally:
        proc.terminate()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") \
        else platform.processor() or platform.machine()
    out = {"benchmark": "serve_load", "model": args.model or args.model_shape, "device": args.device,
           "device_name": device_name, "cpu_count": os.cpu_count(),
           "torch_threads": args.threads or torch.get_num_threads(),
           "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "requests_per_client": args.requests_per_client, "max_batch_size": args.max_batch_size,
           "prefill_chunk": args.prefill_chunk, "cuda_graph": args.cuda_graph, "compile": args.compile,
           "prefill_graphs": args.prefill_graphs, "decode_steps": args.decode_steps or (8 if args.device.startswith("cuda") else 1),
           "engine_process": _engine_process(args), "levels": rows,
           "load_avg_before": [round(x, 2) for x in load_before],
           "load_avg_after": [round(x, 2) for x in os.getloadavg()],
           "versions": {"mambakit": mambakit.__version__, "torch": torch.__version__, "python": platform.python_version()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    print(json.dumps(out, indent=2))
    return 0


def _build_vocab(args) -> int:
    """The real vocabulary size of the model the run uses (prompt ids are drawn below it)."""
    if args.model:
        return json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    from mambakit import MambaConfig
    from mambakit.models import preset

    spec = SHAPES[args.model_shape]
    return (preset(spec) if isinstance(spec, str) else MambaConfig(**spec)).vocab_size


def _wait_ready(url: str, proc, ready, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if not proc.is_alive():
            raise RuntimeError("the server process died while starting")
        if ready.is_set():
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start in time")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
