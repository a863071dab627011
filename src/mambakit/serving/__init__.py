"""mambakit.serving: an OpenAI-compatible HTTP server with continuous batching and exact prefix-state reuse.

    >>> from mambakit.serving import Scheduler, create_app
    >>> scheduler = Scheduler(model, tokenizer, max_batch_size=32).start()
    >>> app = create_app(scheduler, tokenizer, model_name="shakespeare")    # serve with uvicorn

The command line is `mambakit serve --model DIR` (needs the `serve` extra: fastapi, uvicorn).
`app` imports FastAPI; the scheduler, sampler and prefix cache do not.
"""

from .metrics import Metrics, parse_metrics
from .prefix_cache import PrefixCache
from .sampler import BatchSampler, RowParams, request_key
from .scheduler import Event, GenerationRequest, QueueFullError, Scheduler, ShuttingDownError

__all__ = ["Scheduler", "GenerationRequest", "Event", "QueueFullError", "ShuttingDownError", "PrefixCache",
           "BatchSampler", "RowParams", "request_key", "Metrics", "parse_metrics", "create_app"]


def create_app(*args, **kwargs):
    """See `mambakit.serving.app.create_app` (imported on first use: FastAPI is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
