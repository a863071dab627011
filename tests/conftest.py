"""Test configuration: run Triton kernels through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a
function is decorated), hence here, at conftest import time. Under the interpreter,
mambakit.ops.triton_launch (imported by every kernel module) also lets Triton 3.6's interpreter take
runtime loop bounds with NumPy >= 2.4.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Training runs in tests tokenize into a throwaway cache, not the user's ~/.cache/mambakit/tokens."""
    previous = os.environ.get("MAMBAKIT_TOKEN_CACHE")
    os.environ["MAMBAKIT_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if previous is None:
        os.environ.pop("MAMBAKIT_TOKEN_CACHE", None)
    else:
        os.environ["MAMBAKIT_TOKEN_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
