"""The process boundary of `--engine-process`: the scheduler and the model in an engine process of their own.

What each test shows: an engine that dies ends every open request with a clean 503 (streamed or not) and the
server refuses new ones with 503; `mambakit serve` then exits 1 and leaves no process behind; SIGTERM with
requests in flight finishes them and stops both processes (exit 0, nothing left); a server killed outright
takes its engine with it (no orphan holding the GPU).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mambakit.data import ByteTokenizer

from .conftest import ServerThread, free_port

LONG = {"model": "tiny", "prompt": "to be", "max_tokens": 12000, "temperature": 0, "ignore_eos": True}


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child not reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _engine_pid(pid: int) -> int:
    """The engine process below `pid` (spawned by multiprocessing; the resource tracker is not spawn_main)."""
    for child in _descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    raise AssertionError(f"no engine process below {pid}: {_descendants(pid)}")


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.1)


def test_an_engine_that_dies_ends_open_requests_with_503_and_refuses_new_ones(checkpoint):
    srv = ServerThread(checkpoint[1], ByteTokenizer(), engine_dir=checkpoint[0], max_batch_size=4, prefill_chunk=16,
                       max_model_len=16384)
    try:
        with httpx.Client(timeout=60) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
            whole = pool.submit(http.post, srv.url + "/v1/completions", json=LONG)  # not streamed, in flight
            with http.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True}) as streamed:
                lines = streamed.iter_lines()
                assert next(lines).startswith("data: {")
                deadline = time.monotonic() + 30
                while httpx.get(srv.url + "/metrics").text.count("\nmambakit_running_sequences 2") == 0:
                    assert time.monotonic() < deadline, "both requests never ran together"
                    time.sleep(0.05)
                os.kill(srv.scheduler.pid, signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data: ")]
            # the stream had started (status 200): it ends with the error event, then [DONE]
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2][6:])["error"]
            assert error["code"] == "engine_unavailable" and error["type"] == "server_unavailable"
            response = whole.result(60)
            assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
            assert srv.scheduler.crashed
            again = http.post(srv.url + "/v1/completions", json={**LONG, "max_tokens": 2})
            assert again.status_code == 503 and again.json()["error"]["code"] == "engine_unavailable"
            assert set(again.json()["error"]) == {"message", "type", "param", "code"}
            assert http.get(srv.url + "/metrics").status_code == 503
            assert http.get(srv.url + "/health").status_code == 200  # the HTTP process itself still answers
    finally:
        srv.stop()
    assert not _alive(srv.scheduler.pid)


def _start_serve(checkpoint_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mambakit.cli", "serve", "--model", str(checkpoint_dir), "--port",
                             str(port), "--served-model-name", "tiny", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def _stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list, threading.Event]:
    """Reads a streamed completion on a thread: (thread, the data items so far, set at the first one)."""
    items: list = []
    first = threading.Event()

    def read():
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=90) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        items.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                        first.set()
        except httpx.TransportError:  # a server killed outright cuts the stream: what came before is kept
            items.append("cut")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, items, first


@pytest.mark.slow
def test_serve_exits_1_without_orphans_when_its_engine_dies(checkpoint):
    proc, url = _start_serve(checkpoint[0], "--engine-process")
    try:
        children = _descendants(proc.pid)
        engine = _engine_pid(proc.pid)
        reader, items, first = _stream_in_thread(url, LONG)
        assert first.wait(60)
        os.kill(engine, signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, output
    assert items[-1] == "[DONE]" and items[-2]["error"]["code"] == "engine_unavailable"
    assert "the engine process exited unexpectedly" in output
    _wait_gone(children)


@pytest.mark.slow
def test_a_killed_server_takes_its_engine_with_it(checkpoint):
    proc, url = _start_serve(checkpoint[0], "--engine-process")
    try:
        engine = _engine_pid(proc.pid)
        reader, items, first = _stream_in_thread(url, LONG)
        assert first.wait(60)
        proc.kill()  # no handler, no shutdown: only the engine's own watch (pipe, parent-death signal) is left
        proc.communicate(timeout=30)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert items[-1] == "cut"
    _wait_gone([engine])
