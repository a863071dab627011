"""Where the serving scheduler's host time goes, without HTTP: the scheduler alone, profiled.

The scheduler runs in its own thread as in the server, on serve_load's model shapes (real random weights, or
the stub whose forward costs nothing), and takes --requests greedy requests of --prompt-len + --new-tokens
tokens in waves of --arrive submitted together as slots free up (--arrive = --rows: the 64 synchronised clients
of serve_load's 64-client level, which all finish in the same decode block). It prints one JSON line: new tokens
per second, prefill calls per wave, the scheduler's phases per token (its /metrics counters) and, with
--profile, cProfile's costliest functions of the scheduler thread (by own time and by cumulative time). On a GPU
a host-device synchronisation shows up as time inside the function that caused it.

Usage (repository root):
    python benchmarks/serve_profile.py --device cuda --shape 130m --profile
    python benchmarks/serve_profile.py --device cpu --shape stub24 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (the model shapes, the stub model and the stand-in tokenizer)

from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.models import preset  # noqa: E402
from mambakit.serving import GenerationRequest, RowParams, Scheduler  # noqa: E402


class _ProfiledScheduler(Scheduler):
    """A Scheduler whose thread runs under cProfile after the warm-up (profilers are per thread: enabled there)."""

    profiling = False  # set after the warm-up wave: the next step enables the profiler in the scheduler thread

    def _step(self) -> None:
        if self.profiling and self.profiler is None:
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        super()._step()

    def _run(self) -> None:
        self.profiler = None
        try:
            super()._run()
        finally:
            if self.profiler is not None:
                self.profiler.disable()


def _top(profiler: cProfile.Profile, key: str, n: int) -> list[str]:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(n)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return [line.strip() for line in lines[start + 1:] if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="stub24", choices=sorted(serve_load.SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=64, help="slots (max batch size)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--arrive", type=int, default=64, help="requests submitted together (default 64: one wave)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=0, help="0: the server's default for the device")
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--prefix-cache-mb", type=int, default=512)
    p.add_argument("--profile", action="store_true", help="cProfile the scheduler thread")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    if args.arrive < 1 or args.arrive > args.rows:
        p.error("--arrive must be in 1 .. --rows")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = serve_load.SHAPES[args.shape]
    config = preset(spec) if isinstance(spec, str) else MambaConfig(**spec)
    torch.manual_seed(0)
    model_cls = serve_load._stub_class() if args.shape.startswith("stub") else MambaLM
    model = model_cls(config, device=device, dtype=dtype).eval()
    sched = _ProfiledScheduler(model, serve_load.IdTokenizer(config.vocab_size), max_batch_size=args.rows,
                               max_queue=args.requests, prefill_chunk=args.prefill_chunk,
                               prefix_cache_bytes=args.prefix_cache_mb << 20,
                               max_model_len=args.prompt_len + args.new_tokens + 1,
                               **({"decode_steps": args.decode_steps} if args.decode_steps else {}))
    prompts = serve_load._prompts(args.requests + args.arrive, args.prompt_len, config.vocab_size, seed=0)
    finished = threading.Semaphore(0)

    def sink(events) -> None:
        for e in events:
            if e.finish_reason is not None:
                finished.release()

    def run(batch: list[list[int]]) -> None:
        done = 0
        for start in range(0, len(batch), args.arrive):
            while start - done > args.rows - args.arrive:
                if not finished.acquire(timeout=600):
                    raise RuntimeError("a request did not finish in 10 minutes")
                done += 1
            sched.submit([GenerationRequest(q, args.new_tokens, [RowParams()], sink, ignore_eos=True)
                          for q in batch[start:start + args.arrive]])
        while done < len(batch):
            if not finished.acquire(timeout=600):
                raise RuntimeError("a request did not finish in 10 minutes")
            done += 1

    sched.start()
    run(prompts[:args.arrive])  # warm-up wave: kernel compiles, CUDA graph captures
    counters, phases = dict(sched.metrics.counters), dict(sched.metrics.phase_seconds)
    sched.profiling = args.profile
    t0 = time.perf_counter()
    run(prompts[args.arrive:])
    wall = time.perf_counter() - t0
    sched.stop()
    tokens = args.requests * args.new_tokens
    waves = args.requests / args.arrive
    result = {"benchmark": "serve_profile", **vars(args), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "wall_s": round(wall, 3),
              "tok_s": round(tokens / wall, 1),
              "prefill_calls_per_wave": round((sched.metrics.counters["prefill_chunks_total"]
                                               - counters["prefill_chunks_total"]) / waves, 2),
              "scheduler_us_per_token": {k: round(1e6 * (v - phases[k]) / tokens, 2)
                                         for k, v in sched.metrics.phase_seconds.items()}}
    if args.profile:
        result["top_tottime"] = _top(sched.profiler, "tottime", args.top)
        result["top_cumulative"] = _top(sched.profiler, "cumulative", args.top)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
