"""Every Triton kernel stays inside the tensors it is given (tests/triton_bounds.py, through the interpreter).

On the GPU a stray address is an illegal memory access that poisons the process, or a silent read of a
neighbouring buffer; the interpreter reads host memory and says nothing. These tests run each family's kernels,
forward, backward and decode, on odd shapes, sliced (non-contiguous) inputs, packed documents and initial states
with every load and store checked.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from mambakit import MambaConfig, MambaLM
from mambakit.ops import causal_conv1d, use_backend
from mambakit.ops.causal_conv1d import triton_conv
from tests.triton_bounds import triton_bounds_checked

# the checker patches Triton's interpreter: on a GPU machine (no TRITON_INTERPRET) there is nothing to check
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


@triton.jit
def _shifted_copy(x_ptr, y_ptr, n, shift, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs + shift, mask=offs < n), mask=offs < n)


@pytest.mark.parametrize("shift", [1, -1])
def test_the_checker_catches_a_stray_load(shift):
    x, y = torch.randn(8), torch.empty(8)
    with pytest.raises(Exception, match="outside every tensor argument"):
        with triton_bounds_checked():
            _shifted_copy[(1,)](x, y, 8, shift, BLOCK=8)
    with triton_bounds_checked():  # and passes the same kernel in bounds
        _shifted_copy[(1,)](x, y, 7, 1 if shift > 0 else 0, BLOCK=8)


@pytest.mark.parametrize("variant", ["stream", "tile"])
def test_conv_kernels_stay_in_bounds_on_a_sliced_input_with_documents_and_states(variant, monkeypatch):
    """The tile kernel's final window read seq_idx one position past the row (BLOCK_W > W - 1 lanes): found here."""
    monkeypatch.setattr(triton_conv, "FWD_VARIANT", variant)
    monkeypatch.setattr(triton_conv, "BWD_VARIANT", variant)
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 23, 67, generator=gen)
    x = wide[..., 5:5 + 40].requires_grad_()  # row stride 67: neither contiguous nor 16-byte rows
    weight = torch.randn(40, 4, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    init = torch.randn(2, 40, 3, generator=gen, requires_grad=True)
    seq_idx = torch.tensor([[0] * 6 + [1] * 17, [0] * 23], dtype=torch.int32)
    with triton_bounds_checked():
        y, final = causal_conv1d(x, weight, bias, activation="silu", seq_idx=seq_idx, initial_state=init,
                                 return_final_state=True, backend="triton")
        (y.square().sum() + final.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(init.grad).all()


def _model(layer: str) -> MambaLM:
    torch.manual_seed(0)
    ssm = {"layer": layer} | ({"headdim": 16, "d_state": 16, "chunk_size": 8} if layer == "Mamba2" else {})
    return MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=64, ssm_cfg=ssm))


@pytest.mark.parametrize("layer, fused", [
    pytest.param("Mamba2", True, id="mamba2-fused", marks=pytest.mark.slow),  # 20-80 s each on 2 cores
    pytest.param("Mamba1", True, id="mamba1-fused", marks=pytest.mark.slow),
    pytest.param("Mamba2", False, id="mamba2-unfused", marks=pytest.mark.slow),
    pytest.param("Mamba1", False, id="mamba1-unfused", marks=pytest.mark.slow),
])
def test_a_model_trains_and_decodes_in_bounds(layer, fused):
    """Forward under bf16 autocast with packed documents, the chunked loss, the backward, then prefill and decode
    steps (the fused decode kernels at batch 2): every Triton launch of the path checked."""
    model = _model(layer)
    for block in model.backbone.layers:
        block.mixer.fused = fused
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    seq_idx = torch.tensor([[0] * 5 + [1] * 13, [0] * 18], dtype=torch.int32)
    with triton_bounds_checked(), use_backend("triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], seq_idx=seq_idx, targets=ids[:, 1:])
        loss.backward()
        with torch.inference_mode():
            cache = model.allocate_cache(2)
            model(ids[:, :9], cache=cache)
            for t in range(9, 11):
                model(ids[:, t:t + 1], cache=cache)
    assert torch.isfinite(loss)
