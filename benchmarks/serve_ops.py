"""Tensor operations the serving scheduler issues per request and per token: a count, not a time.

On a GPU each non-view operation is a kernel launch (or a copy) that the scheduler thread pays on the host,
several microseconds each, and the host's time per token is what bounds the server's throughput when the
model's step takes a millisecond. Counting them needs no GPU and no quiet machine: the count is the same
wherever it runs. The model is serve_load's stub (its forward is one table lookup, so almost every counted
operation is the scheduler's own) with --shape stub24's 24 layers of cache, as many as the 130M models have.

The scheduler runs as in the server (its own thread, requests through `submit`), --rows slots, greedy
requests of --prompt-len + --new-tokens tokens, --arrive requests submitted at a time as slots free up.
One JSON line: aten operations per request and per 1000 new tokens, all and non-view, and the most frequent.

--boundary measures a time instead: the host cost per token of `--engine-process`'s process boundary alone,
without a model or sockets: the engine's side (one message per scheduler iteration: --rows requests of
--decode-steps tokens each, built from their events and pickled) and the HTTP side (unpickled, the text made
with the stand-in tokenizer's window decoder, events delivered to sinks), best of 5 repeats of --blocks blocks.

Usage (repository root):
    python benchmarks/serve_ops.py
    python benchmarks/serve_ops.py --shape stub --rows 64 --requests 256 --decode-steps 8
    python benchmarks/serve_ops.py --boundary --rows 64 --decode-steps 8
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (the stub model and its stand-in tokenizer)

from mambakit import MambaConfig  # noqa: E402
from mambakit.serving import GenerationRequest, RowParams, Scheduler  # noqa: E402

# aten operations that only make a new view of existing memory: no kernel, no copy
VIEWS = {"view", "slice", "select", "expand", "unsqueeze", "squeeze", "t", "transpose", "as_strided", "alias",
         "detach", "_unsafe_view", "split", "unbind", "permute", "_reshape_alias", "reshape"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _CountingScheduler(Scheduler):
    """Counts what each loop step dispatches (dispatch modes are per thread: entered on the scheduler's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count = _Count()

    def _step(self) -> None:
        with self.count:
            super()._step()


def boundary(rows: int, decode_steps: int, blocks: int, vocab: int = 50277) -> dict:
    """Microseconds per token on each side of the engine process's pipe (see the module docstring)."""
    import pickle
    import time

    from mambakit.serving.engine import EngineClient, _Engine, _Open
    from mambakit.serving.scheduler import Event

    class _Pipe:  # the bytes the engine would write to the pipe
        def __init__(self):
            self.sent: list[bytes] = []

        def send_bytes(self, data: bytes) -> None:
            self.sent.append(data)

    tokenizer = serve_load.IdTokenizer(vocab)
    best_engine = best_http = float("inf")
    for _ in range(5):
        pipe = _Pipe()
        engine = _Engine(pipe, None)
        requests = [GenerationRequest(list(range(128)), 1 << 30, [RowParams()], None) for _ in range(rows)]
        for rid, request in enumerate(requests):
            request.sink = engine.sink(rid, request)
        ids = [[(7 * b + r) % vocab for r in range(decode_steps)] for b in range(blocks)]
        t0 = time.perf_counter()
        for b in range(blocks):
            for request in requests:
                request.sink([Event(0, "", ids[b])])
            engine.flush()
        best_engine = min(best_engine, time.perf_counter() - t0)
        client = EngineClient.__new__(EngineClient)  # the reader's side alone: no process
        client._lock, client.tokenizer = threading.Lock(), tokenizer
        client._open = {rid: _Open(r, tokenizer) for rid, r in enumerate(requests)}
        for request in requests:
            request.sink, request.flush = (lambda events: None), None
        t0 = time.perf_counter()
        for data in pipe.sent:
            client._deliver(pickle.loads(data)[1])
        best_http = min(best_http, time.perf_counter() - t0)
    tokens = blocks * rows * decode_steps
    return {"benchmark": "serve_ops --boundary", "rows": rows, "decode_steps": decode_steps, "blocks": blocks,
            "message_bytes": len(pipe.sent[-1]), "engine_us_per_token": round(1e6 * best_engine / tokens, 3),
            "http_us_per_token": round(1e6 * best_http / tokens, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="stub24", choices=[s for s in serve_load.SHAPES if s.startswith("stub")])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--arrive", type=int, default=8, help="requests submitted together (default 8)")
    p.add_argument("--boundary", action="store_true", help="time the engine process's pipe protocol per token instead")
    p.add_argument("--blocks", type=int, default=500, help="with --boundary: blocks per repeat (default 500)")
    args = p.parse_args()
    if args.boundary:
        print(json.dumps(boundary(args.rows, args.decode_steps, args.blocks)))
        return 0
    torch.set_num_threads(1)
    config = MambaConfig(**serve_load.SHAPES[args.shape])
    model = serve_load._stub_class()(config).eval()
    sched = _CountingScheduler(model, serve_load.IdTokenizer(config.vocab_size), max_batch_size=args.rows,
                               max_queue=args.requests, prefill_chunk=args.prefill_chunk,
                               prefix_cache_bytes=512 << 20, max_model_len=args.prompt_len + args.new_tokens + 1,
                               decode_steps=args.decode_steps).start()
    prompts = serve_load._prompts(args.requests, args.prompt_len, config.vocab_size, seed=0)
    finished = threading.Semaphore(0)

    def sink(events) -> None:
        for e in events:
            if e.finish_reason is not None:
                finished.release()

    done = 0

    def wait_one() -> None:
        if not finished.acquire(timeout=600):
            raise RuntimeError("a request did not finish in 10 minutes")

    for start in range(0, args.requests, args.arrive):
        while start - done > args.rows - args.arrive:  # about --rows requests in the server, as --rows clients
            wait_one()
            done += 1
        sched.submit([GenerationRequest(p, args.new_tokens, [RowParams()], sink, ignore_eos=True)
                      for p in prompts[start:start + args.arrive]])
    while done < args.requests:
        wait_one()
        done += 1
    sched.stop()
    ops = sched.count.ops
    total = sum(ops.values())
    non_view = sum(n for name, n in ops.items() if name not in VIEWS)
    tokens = args.requests * args.new_tokens
    print(json.dumps({"benchmark": "serve_ops", **vars(args),
                      "ops_per_request": round(total / args.requests, 1),
                      "non_view_ops_per_request": round(non_view / args.requests, 1),
                      "ops_per_1000_tokens": round(1000 * total / tokens, 1),
                      "non_view_ops_per_1000_tokens": round(1000 * non_view / tokens, 1),
                      "most_frequent": ops.most_common(10)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
