"""Tensor operations the serving scheduler issues per request and per token: a count, not a time.

On a GPU each non-view operation is a kernel launch (or a copy) that the scheduler thread pays on the host,
several microseconds each, and the host's time per token is what bounds the server's throughput when the
model's step takes a millisecond. Counting them needs no GPU and no quiet machine: the count is the same
wherever it runs. The model is serve_load's stub (its forward is one table lookup, so almost every counted
operation is the scheduler's own) with --shape stub24's 24 layers of cache, as many as the 130M models have.

The scheduler runs as in the server (its own thread, requests through `submit`), --rows slots, greedy
requests of --prompt-len + --new-tokens tokens, --arrive requests submitted at a time as slots free up.
One JSON line: aten operations per request and per 1000 new tokens, all and non-view, and the most frequent.

Usage (repository root):
    python benchmarks/serve_ops.py
    python benchmarks/serve_ops.py --shape stub --rows 64 --requests 256 --decode-steps 8
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
    args = p.parse_args()
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
