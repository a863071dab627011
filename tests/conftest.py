"""Test configuration: run Triton kernels through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a
function is decorated), hence here, at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_index_fix() -> None:
    """Let Triton 3.6's interpreter use runtime ints as loop bounds under NumPy >= 2.4.

    The interpreter holds every scalar as a 1-element array and converts it with int(array), which
    NumPy 2.4 rejects for ndim-1 arrays, so `for c in range(nchunks)` fails on CPU although it compiles
    fine for the GPU. Reading the element instead is exact. Applied once, only when interpreting.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_index_fix()

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
