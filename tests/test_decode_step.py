"""The fused decode step (issue 18): fewer kernels per token, the same numbers as the step op by op.

The fused step (`Mamba1/Mamba2.fused_block_step`, called by `Block`) runs on the Triton backend through the
interpreter here; it is compared token by token (logits and every state) with the unfused step on the torch
backend, in float32 (1e-4 of the scale) and bfloat16 (twice PyTorch's own bf16 error against float32), at batch
sizes that take the few-rows kernel (1, 3: `triton_gemv.py`), the tiled kernel's CUDA-core tiles (9) and its
tensor-core tiles (17, 20). A regression in the kernel count per layer fails `test_kernel_count_per_layer`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM
from mambakit.bench.decode_kernels import count_decode_kernels
from mambakit.modules import fusion
from mambakit.ops import (add_rms_norm_linear, decode_linear, gated_rms_norm_linear, record_backends,
                          selective_state_update, use_backend)
from mambakit.ops.norm_linear import rows_policy, triton_gemv
from mambakit.ops.norm_linear.triton_gemv import GEMV_MAX_ROWS, PLAIN_MAX_ROWS, gemv_tiles

triton_gemv_launch = triton_gemv.launch_gemv

from .conftest import DEVICE
from .helpers import assert_close, low_precision_tolerance

LAYERS = [
    pytest.param({"layer": "Mamba1"}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "headdim": 8, "d_state": 16, "ngroups": 2}, id="mamba2"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
VOCAB = 64


def _model(ssm_cfg, dtype=torch.float32, d_model=32, n_layer=2) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=dict(ssm_cfg))).eval()
    with torch.no_grad():  # away from the init's special values (D = 1, A_log = log(n), zero biases)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias", "norm.weight", "conv1d.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=DEVICE, dtype=dtype)


def _set_fused(model: MambaLM, on: bool) -> None:
    for block in model.backbone.layers:
        block.mixer.fused_step = on


def _random_cache(model: MambaLM, batch: int):
    cache = model.allocate_cache(batch)
    g = torch.Generator().manual_seed(1)
    for st in cache.layers:
        st.conv_state.copy_(torch.randn(st.conv_state.shape, generator=g).to(DEVICE))
        st.ssm_state.copy_(0.3 * torch.randn(st.ssm_state.shape, generator=g).to(DEVICE))
    return cache


def _decode(model: MambaLM, ids: torch.Tensor, cache, backend: str, fused: bool):
    """Logits of each step (batch, steps, V) and the final states, one token per call."""
    _set_fused(model, fused)
    out = []
    with torch.inference_mode(), use_backend(backend):
        for t in range(ids.shape[1]):
            out.append(model(ids[:, t:t + 1], cache=cache)[:, 0].float())
    _set_fused(model, True)
    return torch.stack(out, 1), [(s.conv_state.float(), s.ssm_state.float()) for s in cache.layers]


@pytest.mark.parametrize("ssm_cfg", LAYERS)
@pytest.mark.parametrize("dtype, batch", [
    pytest.param(torch.float32, 1, id="fp32-batch1"),
    pytest.param(torch.float32, 17, id="fp32-batch17", marks=pytest.mark.slow),  # the tensor-core tiles of norm_linear
    pytest.param(torch.bfloat16, 1, id="bf16-batch1", marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, 3, id="bf16-batch3", marks=pytest.mark.slow),
])
def test_fused_step_matches_unfused_step(ssm_cfg, dtype, batch, monkeypatch):
    monkeypatch.setattr(fusion, "FUSED_STEP_MAX_BATCH", 64)  # batch 17 reaches the tensor-core tiles
    ids = torch.randint(0, VOCAB, (batch, 3), device=DEVICE)
    ref_model = _model(ssm_cfg)
    ref = _decode(ref_model, ids, _random_cache(ref_model, batch), "torch", fused=False)  # fp32, op by op
    model = _model(ssm_cfg, dtype)
    with record_backends() as seen:
        got = _decode(model, ids, _random_cache(model, batch), "triton", fused=True)
    assert seen[("add_rms_norm_linear", "triton")] == 2 * 3  # the fused step ran, in every layer and step
    if dtype == torch.float32:
        tol = {"logits": (ref[0], got[0], 1e-4 * float(ref[0].abs().max()))}
    else:  # PyTorch's own bf16 error: the unfused torch step of the bf16 model against fp32
        lowp = _decode(model, ids, _random_cache(model, batch), "torch", fused=False)
        tol = {"logits": (ref[0], got[0], low_precision_tolerance(lowp[0], ref[0]))}
    for i, ((c_ref, h_ref), (c_got, h_got)) in enumerate(zip(ref[1], got[1])):
        if dtype == torch.float32:
            tol[f"conv_state {i}"] = (c_ref, c_got, 1e-4 * float(c_ref.abs().max()))
            tol[f"ssm_state {i}"] = (h_ref, h_got, 1e-4 * float(h_ref.abs().max()))
        else:
            tol[f"conv_state {i}"] = (c_ref, c_got, low_precision_tolerance(lowp[1][i][0], c_ref))
            tol[f"ssm_state {i}"] = (h_ref, h_got, low_precision_tolerance(lowp[1][i][1], h_ref))
    for name, (expected, actual, atol) in tol.items():
        assert_close(actual, expected, name=name, rel=0.0, atol=atol)


@pytest.mark.parametrize("ssm_cfg, projections", [(LAYERS[0].values[0], 3), (LAYERS[1].values[0], 2)],
                         ids=["mamba1", "mamba2"])
def test_many_rows_step_matches_the_step_op_by_op(ssm_cfg, projections, monkeypatch):
    """A decode step of 12 rows (past the fused step's 8) with the many-rows route switched on: the plain
    projections through decode_linear (the many-rows kernel: Mamba-1's in_proj, x_proj, out_proj with dt_proj
    inside the state update; Mamba-2's in_proj and out_proj); the logits and every state as the float32 torch step
    op by op. Off (the default), no decode_linear call."""
    batch = 12
    monkeypatch.setattr(fusion, "MAMBA1_STEP_MAX_BATCH", 0)  # Mamba-1's default route past 8 rows: its own test
    ids = torch.randint(0, VOCAB, (batch, 3), device=DEVICE)
    model = _model(ssm_cfg)
    ref = _decode(model, ids, _random_cache(model, batch), "torch", fused=False)
    with record_backends() as seen:
        _decode(model, ids, _random_cache(model, batch), "triton", fused=True)
    assert seen[("decode_linear", "triton")] == 0  # ROWS_MATMUL_MAX_ROWS 0: cuBLAS / the modules, as before
    monkeypatch.setattr(rows_policy, "ROWS_MATMUL_MAX_ROWS", 128)
    with record_backends() as seen:
        got = _decode(model, ids, _random_cache(model, batch), "triton", fused=True)
    assert seen[("decode_linear", "triton")] == projections * 2 * 3  # per layer; 2 layers; 3 steps
    # kernels per layer: Mamba-1's dt_proj GEMM goes into the state update (8 -> 7), Mamba-2 keeps its 7
    with use_backend("triton"):
        on = count_decode_kernels(model, batch_size=batch)
        monkeypatch.setattr(rows_policy, "ROWS_MATMUL_MAX_ROWS", 0)
        off = count_decode_kernels(model, batch_size=batch)
    assert on.max_per_layer == off.max_per_layer - (projections == 3), (on.layer_ops, off.layer_ops)
    kernel = "triton._rows_matmul_kernel"
    assert on.layer_ops[kernel] == projections and kernel not in off.layer_ops
    assert_close(got[0], ref[0], name="logits", rel=0.0, atol=1e-4 * float(ref[0].abs().max()))
    for i, ((c_ref, h_ref), (c_got, h_got)) in enumerate(zip(ref[1], got[1])):
        assert_close(c_got, c_ref, name=f"conv_state {i}", rel=0.0, atol=1e-4 * float(c_ref.abs().max()))
        assert_close(h_got, h_ref, name=f"ssm_state {i}", rel=0.0, atol=1e-4 * float(h_ref.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_fused_triton_step_equals_unfused_triton_step(ssm_cfg):
    """Same backend, fused or not: the fused kernels compute what the kernels op by op compute (fp32)."""
    model = _model(ssm_cfg)
    ids = torch.randint(0, VOCAB, (2, 3), device=DEVICE)
    a = _decode(model, ids, _random_cache(model, 2), "triton", fused=True)
    b = _decode(model, ids, _random_cache(model, 2), "triton", fused=False)
    assert_close(a[0], b[0], name="logits", rel=1e-5)
    for (ca, ha), (cb, hb) in zip(a[1], b[1]):
        assert_close(ca, cb, name="conv_state", rel=1e-6)
        assert_close(ha, hb, name="ssm_state", rel=1e-5)


@pytest.mark.parametrize("ssm_cfg, fused_max, unfused_min", [
    pytest.param({"layer": "Mamba1"}, 4, 7, id="mamba1"),
    pytest.param({"layer": "Mamba2", "headdim": 8, "d_state": 16}, 3, 6, id="mamba2"),
])
def test_kernel_count_per_layer(ssm_cfg, fused_max, unfused_min):
    model = _model(ssm_cfg, torch.bfloat16)
    with use_backend("triton"):
        fused = count_decode_kernels(model, batch_size=1)
        _set_fused(model, False)
        unfused = count_decode_kernels(model, batch_size=1)
    assert fused.max_per_layer <= fused_max, fused.layer_ops
    assert unfused.max_per_layer >= unfused_min, unfused.layer_ops  # the counter sees the unfused ops
    assert fused.per_token < unfused.per_token


def test_hooked_in_proj_leaves_the_fused_step():
    """A forward hook on in_proj must run: the block then takes the step op by op (and the hook's effect shows)."""
    model = _model({"layer": "Mamba2", "headdim": 8, "d_state": 16})
    ids = torch.randint(0, VOCAB, (2, 2), device=DEVICE)
    plain = _decode(model, ids, _random_cache(model, 2), "triton", fused=True)[0]
    calls = []
    handle = model.backbone.layers[1].mixer.in_proj.register_forward_hook(lambda m, a, o: calls.append(1) or o * 1.5)
    try:
        with record_backends() as seen:
            hooked = _decode(model, ids, _random_cache(model, 2), "triton", fused=True)[0]
    finally:
        handle.remove()
    assert len(calls) == 2 and seen[("add_rms_norm_linear", "triton")] == 2  # layer 0 fused, layer 1 not
    assert float((hooked - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 9, 20])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first-block"])
def test_add_rms_norm_linear_matches_the_ops_in_a_row(dtype, batch, residual):
    K, N, C, c0 = 48, 100, 30, 17
    x = torch.randn(batch, K, device=DEVICE).to(dtype)
    r = torch.randn(batch, K, device=DEVICE) if residual else None
    nw = (1 + 0.1 * torch.randn(K, device=DEVICE)).to(dtype)
    W = (torch.randn(N, K, device=DEVICE) / 7).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype)
    cs = torch.randn(batch, C, 3, device=DEVICE).to(dtype)
    cw, cb = torch.randn(C, 4, device=DEVICE).to(dtype), torch.randn(C, device=DEVICE).to(dtype)

    def run(backend, cast):
        st = cs.to(cast, copy=True)
        out, s = add_rms_norm_linear(x.to(cast), r, nw.to(cast), W.to(cast), b.to(cast), residual_dtype=torch.float32,
                                     conv_state=st, conv_weight=cw.to(cast), conv_bias=cb.to(cast), conv_start=c0,
                                     backend=backend)
        return out.float(), s.float(), st.float()

    ref = run("torch", torch.float32)
    got = run("triton", dtype)
    lowp = run("torch", dtype)
    for name, e, a, t in zip(("out", "residual", "conv_state"), ref, got, lowp):
        atol = 1e-5 * float(e.abs().max()) if dtype == torch.float32 else low_precision_tolerance(t, e)
        assert_close(a, e, name=name, rel=0.0, atol=atol)
    assert not torch.equal(got[2], cs.float())  # the window moved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 9, 20])
@pytest.mark.parametrize("group_size, norm_before_gate", [(None, False), (12, False), (12, True)])
def test_gated_rms_norm_linear_matches_the_ops_in_a_row(dtype, batch, group_size, norm_before_gate):
    K, N = 48, 40
    x, z = torch.randn(batch, K, device=DEVICE), torch.randn(batch, K, device=DEVICE)
    nw, W, b = 1 + 0.1 * torch.randn(K, device=DEVICE), torch.randn(N, K, device=DEVICE) / 7, torch.randn(N, device=DEVICE)

    def run(backend, cast):
        return gated_rms_norm_linear(x.to(cast), z.to(cast), nw.to(cast), W.to(cast), b.to(cast),
                                     group_size=group_size, norm_before_gate=norm_before_gate,
                                     backend=backend).float()

    ref = run("torch", torch.float32)
    got = run("triton", dtype)
    atol = 1e-5 * float(ref.abs().max()) if dtype == torch.float32 else low_precision_tolerance(run("torch", dtype), ref)
    assert_close(got, ref, name="out", rel=0.0, atol=atol)


def test_few_rows_kernel_takes_up_to_eight_rows():
    """Which kernel a shape gets: the few-rows one up to GEMV_MAX_ROWS rows of at most 8192 features."""
    assert GEMV_MAX_ROWS == 8 and PLAIN_MAX_ROWS == 4  # decode_linear: cuBLAS from 5 rows
    assert gemv_tiles(1, 3352, 768) == (8, 1024)  # Mamba-2 130M in_proj: 419 programs of 8 outputs
    assert gemv_tiles(1, 768, 1536) == (2, 2048)  # out_proj: halved to >= 256 programs
    assert gemv_tiles(1, 80, 1536) == (1, 2048)  # Mamba-1 x_proj: one output per program
    assert gemv_tiles(8, 100, 48) is not None
    assert gemv_tiles(9, 100, 48) is None and gemv_tiles(1, 100, 8193) is None
    assert gemv_tiles(1, 100, 4096, groups=8) is None  # the group one-hot would not fit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_decode_linear_matches_f_linear(dtype, batch, bias, monkeypatch):
    """`decode_linear` on the Triton backend (the few-rows kernel to 4 rows, F.linear beyond) against F.linear."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 40, generator=g).to(DEVICE)
    W, b = (torch.randn(70, 40, generator=g) / 6).to(DEVICE), torch.randn(70, generator=g).to(DEVICE)
    ref = F.linear(x, W, b if bias else None)
    launches = []
    monkeypatch.setattr(triton_gemv, "launch_gemv", lambda *a, **k: launches.append(triton_gemv_launch(*a, **k)))
    with record_backends() as seen:
        got = decode_linear(x.to(dtype), W.to(dtype), b.to(dtype) if bias else None, backend="triton")
    assert seen[("decode_linear", "triton")] == 1 and got.dtype == dtype and got.shape == (batch, 70)
    assert len(launches) == (batch <= PLAIN_MAX_ROWS)  # the few-rows kernel ran, or F.linear beyond 4 rows
    lowp = F.linear(x.to(dtype), W.to(dtype), b.to(dtype) if bias else None).float()
    atol = 1e-5 * float(ref.abs().max()) if dtype == torch.float32 else low_precision_tolerance(lowp, ref)
    assert_close(got.float(), ref, name="out", rel=0.0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mamba1_many_rows_step_takes_mamba1_step(dtype, monkeypatch):
    """Mamba-1's decode step of 12 rows (past the fused step's 8) runs `ops.mamba1_step` by default: the block's
    norm, the op's two kernels and out_proj, 4 kernels a layer where the step op by op takes 7; logits and every
    state as the float32 torch step op by op (bf16: twice PyTorch's own bf16 error). Under torch.compile,
    gradients or with fused_step off, the step runs op by op."""
    batch = 12
    ssm_cfg = LAYERS[0].values[0]
    ids = torch.randint(0, VOCAB, (batch, 3), device=DEVICE)
    ref_model = _model(ssm_cfg)
    ref = _decode(ref_model, ids, _random_cache(ref_model, batch), "torch", fused=False)
    model = _model(ssm_cfg, dtype)
    with record_backends() as seen:
        got = _decode(model, ids, _random_cache(model, batch), "triton", fused=True)
    assert seen[("mamba1_step", "triton")] == 2 * 3  # every layer and step
    with record_backends() as seen:
        _decode(model, ids[:, :1], _random_cache(model, batch), "triton", fused=False)
    assert seen[("mamba1_step", "triton")] == 0
    if dtype == torch.float32:
        def tol(r, lp):
            return 1e-4 * float(r.abs().max())
        lowp = ref
    else:
        lowp = _decode(model, ids, _random_cache(model, batch), "torch", fused=False)
        tol = low_precision_tolerance
    assert_close(got[0], ref[0], name="logits", rel=0.0, atol=tol(ref[0], lowp[0]))
    for i, ((c_ref, h_ref), (c_got, h_got)) in enumerate(zip(ref[1], got[1])):
        assert_close(c_got, c_ref, name=f"conv_state {i}", rel=0.0, atol=tol(c_ref, lowp[1][i][0]))
        assert_close(h_got, h_ref, name=f"ssm_state {i}", rel=0.0, atol=tol(h_ref, lowp[1][i][1]))
    with use_backend("triton"):
        on = count_decode_kernels(model, batch_size=batch)
        monkeypatch.setattr(fusion, "MAMBA1_STEP_MAX_BATCH", 8)
        off = count_decode_kernels(model, batch_size=batch)
    # (a bf16 model on CPU adds one aten.to a layer, either way: the norm's interpreter-only rounding copy)
    assert on.max_per_layer == off.max_per_layer - 3, (on.layer_ops, off.layer_ops)
    assert {k: v for k, v in on.layer_ops.items() if k != "aten.to"} == {
        "triton._add_rms_norm_fwd_kernel": 1, "triton._in_proj_conv_kernel": 1, "triton._state_update_kernel": 1,
        "aten.linear": 1}, on.layer_ops  # out_proj


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, N, K", [(9, 70, 40), (64, 80, 200), (100, 33, 130)],
                         ids=["9x70x40", "64x80x200", "100x33x130"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_rows_matmul_matches_f_linear(dtype, batch, N, K, bias, monkeypatch):
    """The many-rows kernel (triton_rows_matmul.py; 9-128 rows, off by default until timed) through decode_linear,
    against F.linear: rows past one 64-row block, outputs and features not multiples of its blocks."""
    from mambakit.ops.norm_linear import triton_rows_matmul

    monkeypatch.setattr(rows_policy, "ROWS_MATMUL_MAX_ROWS", 128)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, K, generator=g).to(DEVICE)
    W, b = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    ref = F.linear(x.double(), W.double(), b.double() if bias else None).float()
    calls = []
    real = triton_rows_matmul.rows_matmul
    monkeypatch.setattr(triton_gemv, "rows_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = decode_linear(x.to(dtype), W.to(dtype), b.to(dtype) if bias else None, backend="triton")
    assert calls == [1] and got.dtype == dtype and got.shape == (batch, N)
    lowp = F.linear(x.to(dtype), W.to(dtype), b.to(dtype) if bias else None).float()
    atol = 1e-5 * float(ref.abs().max()) if dtype == torch.float32 else low_precision_tolerance(lowp, ref)
    assert_close(got.float(), ref, name="out", rel=0.0, atol=atol)


def test_a_decode_step_of_many_rows_runs_without_triton():
    """A CPU install may lack Triton: the mixers' decode step past 8 rows asks whether to take the many-rows kernel
    (rows_policy.py, plain Python) and must not import Triton to find out (it did once: ModuleNotFoundError)."""
    import subprocess
    import sys

    code = """
import sys; sys.modules["triton"] = None  # as if not installed
import torch
from mambakit import MambaConfig, MambaLM
for ssm_cfg in ({"layer": "Mamba1"}, {"layer": "Mamba2", "headdim": 8, "d_state": 16}):
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg=ssm_cfg)).eval()
    with torch.inference_mode():
        print(tuple(model(torch.zeros(12, 1, dtype=torch.long), cache=model.allocate_cache(12)).shape))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(12,", "1,", "64)"] * 2


def test_rows_matmul_tiles_and_the_default_route():
    """Tiles: every row in one block up to 64 (at least 16, tl.dot's minimum), outputs halved to >= 128 programs;
    off by default (ROWS_MATMUL_MAX_ROWS 0): 64 rows go to F.linear until a GPU measurement says otherwise."""
    from mambakit.ops.norm_linear.triton_rows_matmul import rows_matmul_tiles

    assert rows_matmul_tiles(64, 3072, 768) == (64, 16, 128)  # Mamba-1 130M in_proj: 192 programs of 16 outputs
    assert rows_matmul_tiles(64, 768, 1536) == (64, 16, 128)  # out_proj: 48 programs (16 is the floor)
    assert rows_matmul_tiles(9, 80, 40) == (16, 16, 64)
    assert rows_matmul_tiles(128, 3072, 768) == (64, 32, 128)  # 2 row blocks x 96
    assert rows_matmul_tiles(64, 3072, 768, block_n=64, block_k=64) == (64, 64, 64)  # the sweep's override
    assert rows_policy.ROWS_MATMUL_MAX_ROWS == 0 and not rows_policy.takes_rows_matmul(64)


def test_decode_linear_checks_its_arguments():
    x, W = torch.randn(2, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight's dtype"):
        decode_linear(x.double(), W)
    with pytest.raises(ValueError, match="features"):
        decode_linear(x, torch.randn(5, 9, device=DEVICE))
    with pytest.raises(ValueError, match="out_features"):
        decode_linear(x, W, torch.randn(4, device=DEVICE))
    W.requires_grad_(True)  # with gradients the torch path runs, and the gradient arrives
    decode_linear(x, W, backend="triton").sum().backward()
    assert_close(W.grad, x.sum(0).expand(5, 8), name="dW")


@pytest.mark.parametrize("batch", [1, 5])
def test_state_update_with_dt_proj_weight(batch):
    """dt_proj inside the kernel: the same step as F.linear first, on every backend."""
    dim, N, R = 40, 16, 6
    x, z = torch.randn(batch, dim, device=DEVICE), torch.randn(batch, dim, device=DEVICE)
    dt_low, W = torch.randn(batch, R, device=DEVICE), torch.randn(dim, R, device=DEVICE) / 3
    A, D = -torch.rand(dim, N, device=DEVICE) - 0.1, torch.randn(dim, device=DEVICE)
    bias = torch.randn(dim, device=DEVICE) - 2
    B, C = torch.randn(batch, 1, N, device=DEVICE), torch.randn(batch, 1, N, device=DEVICE)
    h0 = torch.randn(batch, dim, N, device=DEVICE)
    results = {}
    for name, kwargs in (("reference", dict(dt=F.linear(dt_low, W).double(), backend="reference")),
                         ("torch", dict(dt=dt_low, dt_proj_weight=W, backend="torch")),
                         ("triton", dict(dt=dt_low, dt_proj_weight=W, backend="triton"))):
        h = h0.clone() if name != "reference" else h0.double()
        cast = (lambda t: t.double()) if name == "reference" else (lambda t: t)
        y = selective_state_update(h, cast(x), kwargs.pop("dt"), cast(A), cast(B), cast(C), D=cast(D), z=cast(z),
                                   dt_bias=cast(bias), dt_softplus=True, **kwargs)
        results[name] = (y, h)
    for name in ("torch", "triton"):
        assert_close(results[name][0], results["reference"][0], name=f"{name} y", rel=1e-5)
        assert_close(results[name][1], results["reference"][1], name=f"{name} state", rel=1e-5)
    with pytest.raises(ValueError, match="dt_proj_weight"):
        selective_state_update(h0.clone(), x, dt_low, A, B, C, dt_proj_weight=torch.randn(dim, R + 1, device=DEVICE))


@pytest.mark.parametrize("state_dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("dt_proj", [pytest.param(False, id="dt"), pytest.param(True, id="dt_proj")])
def test_state_update_low_precision_state(state_dtype, dt_proj):
    """Mamba-1's step on a bf16 / fp16 state (mamba_ssm's cache keeps its Mamba-1 state in the weights' dtype): updated
    in float32 and rounded back in place. The Triton steps track the torch steps on the same low-precision state and a
    float32-state run within a few bf16 ulps (the CPU interpreter truncates float32 -> bf16 where the GPU rounds, so the
    two may drift by an ulp a step: 3% of the state's scale is 4 ulps)."""
    dim, N, R, batch, steps = 40, 16, 6, 3, 6
    g = torch.Generator().manual_seed(5)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE)

    W, A = rnd(dim, R, scale=0.3), -torch.rand(dim, N, generator=g).to(DEVICE) - 0.1
    D, bias = rnd(dim), rnd(dim) - 1
    h32 = rnd(batch, dim, N)
    h_triton = h32.to(state_dtype)
    h_torch = h_triton.clone()
    ptr = h_triton.data_ptr()
    for t in range(steps):
        x, z, dt_low = rnd(batch, dim), rnd(batch, dim), rnd(batch, R)
        B, C = rnd(batch, 1, N), rnd(batch, 1, N)
        kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True)
        dt = dict(dt_proj_weight=W) if dt_proj else {}
        dt_in = dt_low if dt_proj else F.linear(dt_low, W)
        y_tr = selective_state_update(h_triton, x, dt_in, A, B, C, **kw, **dt, backend="triton")
        y_to = selective_state_update(h_torch, x, dt_in, A, B, C, **kw, **dt, backend="torch")
        y_32 = selective_state_update(h32, x, dt_in, A, B, C, **kw, **dt, backend="torch")
        assert h_triton.dtype == h_torch.dtype == state_dtype and h_triton.data_ptr() == ptr
        assert_close(h_triton.float(), h_torch.float(), name=f"step {t} state triton vs torch", rel=3e-2)
        assert_close(y_tr, y_to, name=f"step {t} y triton vs torch", rel=3e-2)
        assert_close(y_tr, y_32, name=f"step {t} y vs float32 state", rel=3e-2)
    assert_close(h_triton.float(), h32, name="state vs float32 state", rel=3e-2)
    assert (h_triton.float() - h32).abs().max() > 0  # the state was rounded: a float32 update would be exact


@pytest.mark.slow
@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_batches_above_the_threshold_step_op_by_op(ssm_cfg):
    """At batch 64 the fused step lost to the ops one by one on the H200 (BENCHMARKS.md): above
    FUSED_STEP_MAX_BATCH rows the step must not take it."""
    model = _model(ssm_cfg)
    batch = fusion.FUSED_STEP_MAX_BATCH + 1
    ids = torch.randint(0, VOCAB, (batch, 2), device=DEVICE)
    with record_backends() as seen:
        _decode(model, ids, _random_cache(model, batch), "triton", fused=True)
    assert seen[("add_rms_norm_linear", "triton")] == 0
    with record_backends() as seen:
        _decode(model, ids[:fusion.FUSED_STEP_MAX_BATCH], _random_cache(model, fusion.FUSED_STEP_MAX_BATCH), "triton",
                fused=True)
    assert seen[("add_rms_norm_linear", "triton")] == 2 * 2
