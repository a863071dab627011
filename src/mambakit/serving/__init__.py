"""mambakit.serving: an OpenAI-compatible HTTP server with continuous batching and exact prefix-state reuse.

    >>> from mambakit.serving import Scheduler, create_app
    >>> scheduler = Scheduler(model, tokenizer, max_batch_size=32).start()
    >>> app = create_app(scheduler, tokenizer, model_name="shakespeare")    # serve with uvicorn

The command line is `mambakit serve --model DIR` (needs the `serve` extra: fastapi, uvicorn).
`app` imports FastAPI; the scheduler, the engine client, sampler and prefix cache do not.
`EngineClient(functools.partial(load_checkpoint, DIR, "cuda", "bfloat16"), tokenizer, {...})` runs the
scheduler and the model in an engine process of their own (`mambakit serve --engine-process`).
"""

from .engine import EngineClient, EngineStartError, EngineUnavailableError, load_checkpoint
from .metrics import Metrics, parse_metrics
from .prefix_cache import PrefixCache
from .sampler import BatchSampler, RowParams, request_key
from .scheduler import Event, GenerationRequest, QueueFullError, Scheduler, ShuttingDownError

__all__ = ["Scheduler", "EngineClient", "EngineStartError", "EngineUnavailableError", "load_checkpoint",
           "GenerationRequest", "Event", "QueueFullError", "ShuttingDownError", "PrefixCache", "BatchSampler",
           "RowParams", "request_key", "Metrics", "parse_metrics", "create_app"]


def create_app(*args, **kwargs):
    """See `mambakit.serving.app.create_app` (imported on first use: FastAPI is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
