"""`ops.mamba1_step`: Mamba-1's decode step after the norm, before out_proj (in_proj, conv update, x_proj, dt_proj,
state update, gate), on its two Triton kernels (through the interpreter on CPU) against the public ops composed in
float64: y, the conv window and the SSM state, in float32 and bfloat16, at row counts of one and two row blocks
(20, 70), with and without biases, and with d_inner not a multiple of the kernel's 32-channel blocks."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import mamba1_step, record_backends
from mambakit.ops.mamba_inner import triton_mamba1_step

from ..conftest import DEVICE
from ..helpers import assert_close, low_precision_tolerance


def _inputs(rows, d_model=32, dim=64, width=4, rank=4, dstate=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE)

    return dict(
        h=r(rows, d_model), in_proj_weight=r(2 * dim, d_model, scale=d_model ** -0.5),
        in_proj_bias=r(2 * dim, scale=0.1) if bias else None, conv_state=r(rows, dim, width - 1),
        conv_weight=r(dim, width, scale=0.5), conv_bias=r(dim, scale=0.1) if bias else None,
        x_proj_weight=r(rank + 2 * dstate, dim, scale=dim ** -0.5),
        x_proj_bias=r(rank + 2 * dstate, scale=0.1) if bias else None,
        dt_proj_weight=r(dim, rank, scale=rank ** -0.5), dt_proj_bias=r(dim, scale=0.5),
        A=-(0.5 + torch.rand(dim, dstate, generator=g)).to(DEVICE), D=r(dim), ssm_state=r(rows, dim, dstate),
    )


_LOW = ("h", "in_proj_weight", "in_proj_bias", "conv_state", "conv_weight", "conv_bias", "x_proj_weight",
        "x_proj_bias", "dt_proj_weight")  # the tensors a low-precision model holds in its dtype


def _run(inputs, dtype, backend, state_dtype=torch.float32):
    """One call on copies of `inputs` (the states advance in place): (y, conv_state, ssm_state) in float64."""
    args = {k: (v.to(dtype) if k in _LOW else v).clone() if v is not None else None for k, v in inputs.items()}
    args["ssm_state"] = args["ssm_state"].to(state_dtype)
    y = mamba1_step(**args, backend=backend)
    return y.double(), args["conv_state"].double(), args["ssm_state"].double()


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("rows, dim, bias", [(20, 64, True), (70, 96, False), (9, 40, True)],
                         ids=["20rows", "70rows-two-blocks-no-bias", "9rows-dim40"])
def test_mamba1_step_triton_matches_the_composed_ops(dtype, rows, dim, bias):
    inputs = _inputs(rows, dim=dim, bias=bias)
    ref = _run({k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()},
               torch.float64, "torch", torch.float64)
    with record_backends() as seen:
        got = _run(inputs, dtype, "triton")
    assert seen[("mamba1_step", "triton")] == 1
    if dtype == torch.float32:
        atols = [1e-4 * float(t.abs().max()) for t in ref]
    else:  # twice PyTorch's own error: the composed torch ops on the bf16 inputs against float64
        lowp = _run(inputs, dtype, "torch")
        atols = [low_precision_tolerance(lp, t) for lp, t in zip(lowp, ref)]
    for name, r, gt, atol in zip(("y", "conv_state", "ssm_state"), ref, got, atols):
        assert_close(gt, r, name=name, rel=0.0, atol=atol)


def test_mamba1_step_partials_and_tiles():
    """Kernel 1 writes one x_proj partial sum per 32 x channels (the last block straddling x and z when d_inner is
    not a multiple of 32) and kernel 2 reads them; the tiles."""
    inputs = _inputs(20, dim=40)
    seen = []
    real = triton_mamba1_step.selective_state_update_triton
    try:
        triton_mamba1_step.selective_state_update_triton = lambda *a, **k: seen.append(k["xdbl_partials"].shape) or real(*a, **k)
        y, _, state = _run(inputs, torch.float32, "triton")
    finally:
        triton_mamba1_step.selective_state_update_triton = real
    assert seen == [(2, 20, 4 + 2 * 8)]  # 40 x channels in blocks of 32
    assert triton_mamba1_step.mamba1_step_tiles(64, 3072, 768) == (16, 32, 128)
    assert triton_mamba1_step.mamba1_step_tiles(9, 80, 32) == (16, 32, 32)
    assert triton_mamba1_step.mamba1_step_tiles(64, 3072, 768, block_n=64, block_m=64) == (64, 64, 128)
    ref = _run(inputs, torch.float32, "torch")
    assert_close(state, ref[2], name="ssm_state", rel=0.0, atol=1e-4 * float(ref[2].abs().max()))
    assert_close(y, ref[0], name="y", rel=0.0, atol=1e-4 * float(ref[0].abs().max()))


def test_mamba1_step_checks_its_arguments():
    inputs = _inputs(3)
    with pytest.raises(ValueError, match="x_proj_weight"):
        mamba1_step(**{**inputs, "x_proj_weight": inputs["x_proj_weight"][:-1]})
    with pytest.raises(ValueError, match="conv_state"):
        mamba1_step(**{**inputs, "conv_state": inputs["conv_state"][:, :, :1]})
    with pytest.raises(ValueError, match="in_proj_weight's dtype"):
        mamba1_step(**{**inputs, "h": inputs["h"].double()})
    with pytest.raises(ValueError, match="ssm_state"):
        mamba1_step(**{**inputs, "ssm_state": inputs["ssm_state"][:2]})
    with pytest.raises(ValueError, match="ssm_state must have dtype"):
        mamba1_step(**{**inputs, "ssm_state": inputs["ssm_state"].int()})


def test_mamba1_step_on_a_bf16_state():
    """A bf16 SSM state (mamba_ssm's Mamba-1 cache dtype) is updated in float32 and rounded back in place: the
    kernels against the composed torch ops on the same bf16 state, within two bf16 ulps of the state's scale (the
    CPU interpreter truncates where the GPU rounds), and against a float32 state within a few."""
    inputs = _inputs(20, dim=40)
    got = _run(inputs, torch.bfloat16, "triton", torch.bfloat16)
    ref = _run(inputs, torch.bfloat16, "torch", torch.bfloat16)
    wide = _run(inputs, torch.bfloat16, "torch", torch.float32)
    for name, gt, r, w in zip(("y", "conv_state", "ssm_state"), got, ref, wide):
        scale = float(w.abs().max())
        assert_close(gt, r, name=name, rel=0.0, atol=2 * 2 ** -8 * scale)
        assert_close(gt, w, name=f"{name} vs float32 state", rel=0.0, atol=4 * 2 ** -8 * scale)
    assert (got[2] - wide[2]).abs().max() > 0  # the state was rounded to bf16


@pytest.mark.parametrize("in_proj_cublas, sub_blocks, block_m", [(False, 3, 16), (True, 2, 32)],
                         ids=["fused-in_proj-3-sub-blocks", "cublas-in_proj-2-sub-blocks"])
def test_mamba1_step_triton_options(in_proj_cublas, sub_blocks, block_m):
    """The launcher's options the GPU sweep compares give the same numbers: in_proj through F.linear with the first
    kernel reduced to conv + x_proj partials, several state-update blocks per program (the partials summed once for
    them, the last program's blocks partly past d_inner), row blocks smaller than the batch."""
    rows, dim = 40, 96
    inputs = _inputs(rows, dim=dim)
    ref = _run(inputs, torch.float32, "torch")
    a = {k: v.clone() if v is not None else None for k, v in inputs.items()}
    y = triton_mamba1_step.mamba1_step_triton(
        *(a[k] for k in ("h", "in_proj_weight", "in_proj_bias", "conv_state", "conv_weight", "conv_bias",
                         "x_proj_weight", "x_proj_bias", "dt_proj_weight", "dt_proj_bias", "A", "D", "ssm_state")),
        tiles=triton_mamba1_step.mamba1_step_tiles(rows, 2 * dim, 32, block_n=32, block_m=block_m),
        block_d=16, sub_blocks=sub_blocks, in_proj_cublas=in_proj_cublas)
    for name, got, r in zip(("y", "conv_state", "ssm_state"), (y, a["conv_state"], a["ssm_state"]), ref):
        assert_close(got.double(), r, name=name, rel=0.0, atol=1e-4 * float(r.abs().max()))
