"""Fixtures for the server tests: a tiny trained byte-level checkpoint and servers on 127.0.0.1.

The checkpoint is trained once per session (10 steps of a 2-layer d_model 32 Mamba-2 on repeated verse,
about 5 s on 2 cores); its tokenizer_config.json gets a chat template. A server runs uvicorn in a daemon thread
on a free loopback port and is stopped by the fixture (should_exit, then a bounded join).
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time

import pytest
import torch

from mambakit.serving import Scheduler

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(directory, model): a tiny trained byte-level Mamba-2 checkpoint with a chat template, and the model."""
    from mambakit.models import MambaLM
    from mambakit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("serve_ckpt")
    data = root / "data"
    data.mkdir()
    lines = ["to be or not to be that is the question\n", "the rest is silence\n", "all the world's a stage\n",
             "now is the winter of our discontent\n"]
    for i in range(16):
        (data / f"doc{i:02d}.txt").write_text("".join(lines[(i + j) % 4] for j in range(10)))
    torch.manual_seed(0)
    cfg = TrainConfig(recipe="test", data=str(data), layer="mamba2", d_model=32, n_layer=2, d_state=8, expand=2,
                      headdim=16, chunk_size=16, seqlen=32, batch_size=4, lr=1e-2, warmup_steps=2, max_steps=10,
                      eval_every=0, eval_tokens=256, final_eval_tokens=256, eval_batch_size=4, log_every=10,
                      progress=False, sample_tokens=0, val_fraction=0.1, out_dir=str(root / "model"))
    train(cfg)
    out = root / "model"
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return out, MambaLM.from_pretrained(out).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `create_app(...)` in a daemon thread on 127.0.0.1; `stop()` ends it within seconds.

    engine_dir: a checkpoint directory to run the scheduler in an engine process (`EngineClient`, the model
    loaded there from the directory) instead of a thread of this process (`Scheduler` over `model`).
    """

    def __init__(self, model, tokenizer, name: str = "tiny", chat_template: str | None = None,
                 engine_dir=None, **scheduler_kwargs):
        import uvicorn

        from mambakit.serving import Scheduler, create_app
        from mambakit.serving.engine import EngineClient, load_checkpoint

        if engine_dir is None:
            self.scheduler = Scheduler(model, tokenizer, **scheduler_kwargs).start()
        else:
            self.scheduler = EngineClient(functools.partial(load_checkpoint, str(engine_dir)), tokenizer,
                                          scheduler_kwargs, log_level="warning", start_timeout=120)
        self.app = create_app(self.scheduler, tokenizer, name, chat_template=chat_template)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def clear_prefix_cache(self) -> None:
        if isinstance(self.scheduler, Scheduler):
            self.scheduler.prefix_cache.clear()
        else:
            self.scheduler.call("clear_prefix_cache")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.scheduler.stop()


MODES = [pytest.param("thread", id="thread"), pytest.param("engine", id="engine-process")]


@pytest.fixture(scope="module", params=MODES)
def server(checkpoint, request):
    """A server with 8 slots, a queue of 64, 16-token prefill chunks and a prefix cache: the scheduler in a thread
    of this process, then in an engine process of its own (every test that uses it runs in both)."""
    from mambakit.data import ByteTokenizer

    srv = ServerThread(checkpoint[1], ByteTokenizer(), chat_template=CHAT_TEMPLATE,
                       engine_dir=checkpoint[0] if request.param == "engine" else None, max_batch_size=8,
                       max_queue=64, prefill_chunk=16, prefix_cache_bytes=8 << 20, max_model_len=16384)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c
