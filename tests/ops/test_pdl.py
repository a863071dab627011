"""Programmatic dependent launch of the decode kernels: the policy (`ops.common.pdl_launch`, `pdl_mode`), the
kernels' PTX rule (nothing but weights read before `griddepcontrol.wait`, `benchmarks/pdl_ptx.py`), and on a GPU
graphed decoding with PDL on against off, which must agree bit for bit (PDL changes when kernels start, not what
they compute)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.generation import generate
from mambakit.modules import fusion
from mambakit.ops import common
from mambakit.ops.common import pdl_launch, pdl_mode
from mambakit.ops.norm_linear import rows_policy

from ..helpers import run_sass_script


def test_pdl_is_off_the_gpu_and_pdl_mode_switches_it():
    assert not pdl_launch(torch.device("cpu"))
    default = common._PDL.get()
    with pdl_mode(False):
        assert common._PDL.get() is False
        with pdl_mode(True):
            assert common._PDL.get() is True
        assert common._PDL.get() is False
    assert common._PDL.get() is default
    with pytest.raises(TypeError, match="bool"):
        with pdl_mode("off"):
            pass


def test_pdl_launch_needs_sm90_and_the_mode(monkeypatch):
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(common, "_cuda_capability", lambda index: (8, 0))
    assert not pdl_launch(cuda0)  # griddepcontrol is Hopper's
    monkeypatch.setattr(common, "_cuda_capability", lambda index: (9, 0))
    with pdl_mode(True):
        assert pdl_launch(cuda0)
    with pdl_mode(False):
        assert not pdl_launch(cuda0)


def test_the_environment_turns_pdl_off():
    code = "from mambakit.ops import common; print(common._PDL.get())"
    for value, expect in (("0", "False"), ("1", "True")):
        env = dict(os.environ, MAMBAKIT_PDL=value)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == expect


@pytest.mark.parametrize("rows, many, pdl", [(40, 0, False), (40, 128, True), (2, 0, True)],
                         ids=["op-by-op-between-gemms", "many-rows-kernel", "few-rows"])
def test_mamba1_steps_op_by_op_between_gemms_without_pdl(rows, many, pdl, monkeypatch):
    """Past mamba1_step's rows Mamba-1's step alternates cuBLAS GEMMs with its kernels: no kernel follows a PDL one,
    and PDL made that step 1.8% slower (H100, BENCHMARKS.md), so it runs inside pdl_mode(False); with the many-rows
    projection kernel (every kernel ours) and at few rows it keeps the caller's setting."""
    from mambakit.modules import mamba1 as mamba1_module

    monkeypatch.setattr(rows_policy, "ROWS_MATMUL_MAX_ROWS", many)
    seen = []
    real = mamba1_module.causal_conv1d_update
    monkeypatch.setattr(mamba1_module, "causal_conv1d_update",
                        lambda *a, **k: seen.append(common._PDL.get()) or real(*a, **k))
    model = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={"layer": "Mamba1"})).eval()
    mixer = model.backbone.layers[0].mixer
    cache = mixer.allocate_state(rows)
    with torch.inference_mode(), pdl_mode(True):
        mixer.step(torch.randn(rows, 1, 32), cache)
    assert seen == [pdl]


def test_a_weight_copied_right_before_its_kernel_launches_it_without_pdl(monkeypatch):
    """The few-rows projection and the block norm read their weights before the wait: a weight the launcher had to
    copy (not contiguous) was written by the kernel right before, so those launches go without PDL."""
    from mambakit.ops import triton_launch
    from mambakit.ops.norm_linear import triton_gemv
    from mambakit.ops.rms_norm import triton_norm

    seen = []
    monkeypatch.setattr(triton_launch.FastLaunchKernel, "launch",
                        lambda self, grid, args, kwargs: seen.append((self.fn.__name__, kwargs["launch_pdl"])))
    monkeypatch.setattr(triton_gemv, "pdl_launch", lambda device: True)
    monkeypatch.setattr(triton_norm, "pdl_launch", lambda device: True)
    x, w = torch.randn(2, 64), torch.randn(64, 32).t()  # w (32, 64) with strides (1, 32)
    triton_gemv.linear_rows_triton(x, w.contiguous())
    triton_gemv.linear_rows_triton(x, w)
    norm_w = torch.randn(128)
    for weight in (norm_w[:64], norm_w[::2]):
        triton_norm._add_rms_norm_impl(x, None, weight, 1e-5, torch.float32, torch.float32, False)
    assert seen == [("_norm_gemv_kernel", True), ("_norm_gemv_kernel", False),
                    ("_add_rms_norm_fwd_kernel", True), ("_add_rms_norm_fwd_kernel", False)]


@pytest.mark.slow
def test_decode_kernels_read_only_weights_before_their_wait():
    """Every decode kernel compiled for sm_90 with PDL on: one wait, the release after it, no store before it,
    and before it only the reads its rule allows (weights into registers, or L2 prefetches, or nothing)."""
    out = run_sass_script("pdl_ptx.py")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "_kernel" in line]
    kernels = {line.split("|")[2].strip() for line in rows}
    assert kernels == {"_norm_gemv_kernel", "_state_update_kernel", "_in_proj_conv_kernel", "_add_rms_norm_fwd_kernel",
                       "_rows_matmul_kernel", "_causal_conv1d_update_kernel", "_ssd_step_kernel"}, out.stdout
    assert all(line.rstrip(" |").endswith("ok") for line in rows), out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("layer, batch, rows_matmul, fused_rows", [
    pytest.param("Mamba1", 1, 0, None, id="mamba1-batch1"),     # the fused step
    pytest.param("Mamba1", 16, 0, None, id="mamba1-batch16"),   # ops.mamba1_step
    pytest.param("Mamba1", 64, 0, None, id="mamba1-batch64"),   # op by op between cuBLAS GEMMs: PDL off inside
    pytest.param("Mamba1", 64, 128, None, id="mamba1-batch64-rows"),  # op by op, the many-rows projection kernel
    pytest.param("Mamba1", 64, 128, 64, id="mamba1-batch64-fused"),  # the fused step: the tiled norm kernel (no PDL)
    pytest.param("Mamba2", 1, 0, None, id="mamba2-batch1"),
    pytest.param("Mamba2", 64, 0, None, id="mamba2-batch64"),
    pytest.param("Mamba2", 64, 128, 64, id="mamba2-batch64-fused"),
])
def test_gpu_graphed_decoding_with_pdl_equals_without(layer, batch, rows_matmul, fused_rows, monkeypatch):
    monkeypatch.setattr(rows_policy, "ROWS_MATMUL_MAX_ROWS", rows_matmul)
    if fused_rows is not None:  # None: the library's FUSED_STEP_MAX_BATCH
        monkeypatch.setattr(fusion, "FUSED_STEP_MAX_BATCH", fused_rows)
    assert pdl_launch(torch.device("cuda")) == (torch.cuda.get_device_capability() >= (9, 0))
    model = MambaLM(MambaConfig(d_model=256, n_layer=4, vocab_size=512, ssm_cfg={"layer": layer}))
    model = model.to("cuda", torch.bfloat16).eval()
    prompts = torch.randint(0, 512, (batch, 24), generator=torch.Generator().manual_seed(3)).cuda()
    outs = {}
    for on in (False, True):
        with pdl_mode(on):
            outs[on] = generate(model, prompts, 40, cuda_graph=True, return_logprobs=True)
    assert outs[True][0] == outs[False][0]
    assert outs[True][1] == outs[False][1]  # the log-probabilities, bit for bit
