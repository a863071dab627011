"""The README's Python examples run as written (in a scratch directory: they write out/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    """Every python block but the server's client example, which talks to a running `mambakit serve` on port 8000
    (tests/serving runs the same openai-client calls against a live server on a free port)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [b for b in blocks if 'base_url="http://127.0.0.1:8000' not in b]


def test_the_readme_has_python_examples():
    assert len(_python_blocks()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("index", [pytest.param(i, id=f"block{i}") for i in range(len(_python_blocks()))])
def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys, index):
    import torch

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding on a shared 2-core machine: one thread does not stall
    try:
        exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(threads)
    assert len(namespace) > 1  # it defined something
    # what the example promises: the names it defines exist with the shapes its comments give
    if "tokens" in namespace:
        assert len(namespace["tokens"]) == 1 and len(namespace["tokens"][0]) <= 64
        assert namespace["y"].shape == (2, 64, 32) and namespace["final_state"].shape == (2, 32, 16)
        assert (tmp_path / "out" / "config.json").is_file()
        assert len(capsys.readouterr().out.splitlines()) == 200  # the streamed tokens, one a line
