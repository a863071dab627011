"""`mambakit serve`: an OpenAI-compatible HTTP server for a checkpoint (continuous batching, prefix-state reuse)."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from pathlib import Path

from .errors import Parser, UsageError, int_at_least
from .loading import checkpoint_dir, load_model

SUMMARY = "serve a checkpoint over HTTP with OpenAI's completions and chat completions APIs"

EXAMPLES = """\
examples:
  mambakit serve --model runs/shakespeare
      http://127.0.0.1:8000/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
  mambakit serve --model runs/shakespeare --port 8080 --max-batch-size 64 --max-queue 512
  mambakit serve --model mamba-130m-hf --device cuda --dtype bfloat16 --served-model-name mamba-130m
      (on CUDA the model runs in an engine process of its own, apart from HTTP: --no-engine-process keeps one)
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 50, "temperature": 0}'

The directory must hold config.json, model.safetensors and the tokenizer, as `mambakit train` writes them
(or a converted / Hugging Face checkpoint). Text prompts start with the tokenizer's end-of-document token,
as in `mambakit generate`. /v1/chat/completions needs a chat template in the checkpoint's
tokenizer_config.json ("chat_template") or chat_template.jinja. SIGTERM or Ctrl-C stops accepting
connections, lets running requests finish for up to --shutdown-timeout seconds, then exits 0 (the engine
process too). If the engine process dies, open requests end with HTTP 503 and the server exits 1.
Needs the serve extra: pip install 'mambakit[serve]'."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser(prog: str = "mambakit serve") -> Parser:
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (e.g. runs/shakespeare)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: the directory's name)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-batch-size", type=int_at_least(1), default=32, metavar="N",
                   help="cache slots: sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int_at_least(0), default=256, metavar="N",
                   help="requests waiting for a slot; more get HTTP 429 (default 256)")
    p.add_argument("--max-model-len", type=int_at_least(2), default=16384, metavar="N",
                   help="prompt + new tokens allowed per sequence (default 16384)")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=128, metavar="K",
                   help="prompt tokens per prefill call, interleaved with decode steps; prefix states are kept "
                        "every K tokens (default 128)")
    p.add_argument("--prefix-cache-mb", type=int_at_least(0), default=512, metavar="MB",
                   help="memory for stored prefix states, least recently used evicted first; 0 disables (default 512)")
    p.add_argument("--decode-steps", type=int_at_least(1), default=None, metavar="k",
                   help="decode steps per host round trip: the host reads tokens once per k steps, a finished "
                        "sequence may compute up to k-1 tokens for nothing (default: 8 on CUDA, 1 on CPU)")
    p.add_argument("--max-prefill-tokens", type=int_at_least(1), default=8192, metavar="N",
                   help="prompt tokens of several requests prefilled in one call (default 8192)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay the decode step from CUDA graphs at batch sizes 1, 2, 4, ..., and prefill calls of full "
                        "--prefill-chunk chunks at as many rows (CUDA only; default on)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: decode with the step compiled by torch.compile at batch sizes 1, 2, 4, ... (faster "
                        "tokens; each size compiles at start-up, seconds to a minute each)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the scheduler and the model in a process of their own, apart from HTTP, tokenization, "
                        "detokenization and SSE (two cores instead of one GIL; default: on for CUDA, off on CPU, "
                        "where the model's own threads use the cores)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests may take to finish before they are cancelled (default 30)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="request logs are at info (default info)")
    return p


def main(model: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
         device: str = "auto", dtype: str = "auto", max_batch_size: int = 32, max_queue: int = 256,
         max_model_len: int = 16384, prefill_chunk: int = 128, prefix_cache_mb: int = 512,
         decode_steps: int | None = None, max_prefill_tokens: int = 8192, cuda_graph: bool = True,
         engine_process: bool | None = None, shutdown_timeout: float = 30.0, log_level: str = "info",
         compile: bool = False) -> int:
    """Serve the checkpoint in `model` until SIGTERM or Ctrl-C; returns the exit status (0 after a graceful stop).

    Examples:
        mambakit serve --model runs/shakespeare
        mambakit serve --model runs/shakespeare --port 8080 --max-batch-size 64
        mambakit serve --model runs/shakespeare --device cpu --compile
    """
    try:
        import uvicorn
    except ImportError:
        raise UsageError("mambakit serve needs FastAPI and uvicorn: pip install 'mambakit[serve]'") from None
    from ..serving import Scheduler, create_app
    from ..serving.chat import load_chat_template
    from ..serving.heap import freeze_heap

    directory = checkpoint_dir(model)
    # the scheduler thread and the HTTP event loop share the GIL: at the default 5 ms switch interval one
    # waits up to 5 ms whenever the other runs Python, longer than a decode step
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine_process is None:
        engine_process = _device_type(device) == "cuda"
    if compile and _device_type(device) != "cpu":
        raise UsageError("--compile compiles CPU decoding; on CUDA the CUDA graphs (--cuda-graph) do that job")
    scheduler_kwargs = dict(max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk=prefill_chunk,
                            prefix_cache_bytes=prefix_cache_mb << 20, cuda_graph=cuda_graph,
                            max_model_len=max_model_len, max_prefill_tokens=max_prefill_tokens, compile=compile)
    server: uvicorn.Server | None = None

    def engine_exited() -> None:  # the engine process died: open requests got 503s; stop serving, exit 1
        if server is not None:
            server.should_exit = True

    if engine_process:
        from ..checkpoints import load_checkpoint_tokenizer
        from ..serving.engine import EngineClient, EngineStartError

        tokenizer = load_checkpoint_tokenizer(directory)  # the model itself loads in the engine process only
        try:
            scheduler = EngineClient(functools.partial(_engine_build, str(directory), device, dtype, decode_steps),
                                     tokenizer, scheduler_kwargs, log_level=log_level, on_exit=engine_exited)
        except EngineStartError as err:
            message = str(err)
            if message.startswith("UsageError: "):
                raise UsageError(message[len("UsageError: "):]) from None
            raise
    else:
        loaded = load_model(directory, device, dtype)
        lm, tokenizer, dev = loaded.lm.eval(), loaded.tokenizer, loaded.device
        _check_servable(lm)
        scheduler = Scheduler(lm, tokenizer, **scheduler_kwargs,
                              decode_steps=decode_steps or (8 if dev.type == "cuda" else 1)).start()
    freeze_heap()  # start-up is done: later garbage collections scan only what serving allocates
    name = served_model_name or directory.resolve().name
    app = create_app(scheduler, tokenizer, name, chat_template=load_chat_template(directory))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    if getattr(scheduler, "crashed", False):  # the engine died before there was a server to stop
        server.should_exit = True
    # uvicorn re-raises the signal that stopped it once it has restored the previous handlers; these make
    # that a no-op, so a graceful stop exits 0 instead of dying of SIGTERM
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        scheduler.stop()
    if getattr(scheduler, "crashed", False):
        logging.getLogger("mambakit.serving").error("exiting: the engine process exited unexpectedly")
        return 1
    return 0 if server.started else 1


def _device_type(device: str) -> str:
    """"cuda" or "cpu" for --device (auto: cuda when available), without touching the GPU."""
    from ..training import resolve_device

    try:
        return resolve_device(device).type
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_servable(lm) -> None:
    """A UsageError (one line, exit 2) for a model the server does not decode (attention layers)."""
    from ..serving.scheduler import check_servable

    try:
        check_servable(lm)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _engine_build(directory: str, device: str, dtype: str, decode_steps: int | None):
    """In the engine process: (model, tokenizer) of the checkpoint (`load_model`'s checks), and the decode steps
    per round trip for its device. Module-level, so that the spawned process can unpickle it."""
    loaded = load_model(Path(directory), device, dtype)
    _check_servable(loaded.lm)
    steps = decode_steps or (8 if loaded.device.type == "cuda" else 1)
    return loaded.lm.eval(), loaded.tokenizer, {"decode_steps": steps}
