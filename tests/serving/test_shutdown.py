"""`mambakit serve` as a user runs it: a fresh process on 127.0.0.1 that SIGTERM stops gracefully (exit 0), with the
scheduler in a thread of it or in an engine process of its own (which exits too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mambakit.serving.metrics import parse_metrics

from .conftest import free_port


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param("--no-engine-process", id="thread"),
                                  pytest.param("--engine-process", id="engine-process")])
def test_sigterm_finishes_the_running_request_and_exits_0(checkpoint, mode):
    from .test_engine import _descendants, _wait_gone

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mambakit.cli", "serve", "--model", str(checkpoint[0]), "--port",
                             str(port), "--served-model-name", "tiny", "--shutdown-timeout", "60", mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        # start-up froze the heap of each process out of the garbage collector's scans
        metrics = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
        assert metrics["mambakit_gc_frozen_objects"] > 1000
        if mode == "--engine-process":
            assert metrics["mambakit_http_gc_frozen_objects"] > 1000

        chunks: list[dict] = []
        first = threading.Event()

        def read_stream():
            body = {"model": "tiny", "prompt": "to be", "max_tokens": 2000, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert first.wait(60)
        children = _descendants(proc.pid)  # with --engine-process: the engine (and multiprocessing's tracker)
        assert (len(children) > 0) == (mode == "--engine-process")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    # the request that was running when SIGTERM came was finished, not cut off
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 1
    assert "Shutting down" in output and "request " in output
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    _wait_gone(children, timeout=10)  # both processes exit: nothing left behind


SERVE_ERRORS = [
    pytest.param(["serve"], "mambakit serve: error: the following arguments are required: --model", id="no-model"),
    pytest.param(["serve", "--model", "{tmp}/missing"], "mambakit serve: error: model directory not found",
                 id="missing-model"),
    pytest.param(["serve", "--model", "{tmp}"], "mambakit serve: error: no config.json in", id="not-a-model"),
    pytest.param(["serve", "--model", "{tmp}", "--max-batch-size", "0"],
                 "mambakit serve: error: argument --max-batch-size: expected an integer >= 1", id="zero-slots"),
    pytest.param(["serve", "--model", "{tmp}", "--shutdown-timeout", "soon"],
                 "mambakit serve: error: argument --shutdown-timeout", id="bad-timeout"),
]


@pytest.mark.parametrize("argv, message", SERVE_ERRORS)
def test_serve_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    from mambakit.cli.__main__ import main

    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1


@pytest.mark.parametrize("engine", ["--engine-process", "--no-engine-process"])
def test_serve_refuses_a_model_with_attention_layers_in_one_line(tmp_path, capsys, engine):
    """A hybrid's (or a Transformer's) KV cache grows with each sequence, which the server's slots do not keep: the
    command says so and exits 2, in the engine process as in this one (it died of an AttributeError, session 23)."""
    from mambakit.cli.__main__ import main
    from mambakit.data import ByteTokenizer
    from mambakit.models import MambaConfig, MambaLM
    from mambakit.serving import Scheduler

    hybrid = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=256, attn_layer_idx=[0],
                                 attn_cfg={"num_heads": 2}))
    with pytest.raises(ValueError, match=r"attention at layers \[0\]"):
        Scheduler(hybrid.eval(), ByteTokenizer(), max_batch_size=2)
    hybrid.save_pretrained(tmp_path / "hybrid", tokenizer=ByteTokenizer())
    assert main(["serve", "--model", str(tmp_path / "hybrid"), "--device", "cpu", engine]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambakit serve: error: the server decodes Mamba models without attention layers")
    assert err.count("\n") == 1
