"""Backend selection (ops/dispatch.py) and the shared input checker (ops/checks.py)."""

import pytest
import torch

from mambakit.ops import selective_scan, ssd
from mambakit.ops.checks import ShapeChecker
from mambakit.ops.dispatch import select_backend, triton_available
from tests.conftest import DEVICE


def test_default_backend_is_torch_on_cpu():
    assert select_backend("op", None, torch.device("cpu")) == "torch"


def test_explicit_backends_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend("op", "reference", cpu) == "reference"
    with pytest.raises(ValueError, match="backend must be None or one of"):
        select_backend("op", "cuda", cpu)
    with pytest.raises(ValueError, match="not implemented for this op"):
        select_backend("op", "triton", cpu, supported=("reference", "torch"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        select_backend("op", "triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("op", "triton", cpu) == "triton"


def test_shape_checker_binds_names_and_reports_expected_shape():
    chk = ShapeChecker("myop")
    chk.tensor("x", torch.zeros(2, 5, 3), ("batch", "seqlen", "dim"))
    with pytest.raises(ValueError, match=r"myop: y must have shape \(batch=2, seqlen=5, dim=3\), got \(2, 4, 3\)"):
        chk.tensor("y", torch.zeros(2, 4, 3), ("batch", "seqlen", "dim"))
    with pytest.raises(ValueError, match=r"myop: w must be 2-D with shape \(dim=3, dstate\), got 1-D shape \(3,\)"):
        chk.tensor("w", torch.zeros(3), ("dim", "dstate"))
    with pytest.raises(ValueError, match=r"myop: i must have dtype in \(float64, float32, bfloat16, float16\)"):
        chk.tensor("i", torch.zeros(2, 5, dtype=torch.long), ("batch", "seqlen"))
    with pytest.raises(ValueError, match="myop: z is required"):
        chk.tensor("z", None, ("batch",))
    assert chk.tensor("opt", None, ("batch",), optional=True) is None


def test_seq_idx_must_be_integer_and_nondecreasing():
    x, dt = torch.randn(2, 6, 4), torch.rand(2, 6, 4)
    A, B, C = -torch.rand(4, 3), torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    bad = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_idx must be nondecreasing along each row.*row 1"):
        selective_scan(x, dt, A, B, C, seq_idx=bad, backend="reference")
    with pytest.raises(ValueError, match="seq_idx must have dtype in"):
        selective_scan(x, dt, A, B, C, seq_idx=bad.float(), backend="reference")


def test_ops_check_device_consistency():
    """Every tensor must live where x lives (checked through the meta device, available everywhere)."""
    x = torch.randn(1, 4, 2, 8)
    dt, A = torch.rand(1, 4, 2), -torch.rand(2)
    B = C = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="ssd: A must be on cpu"):
        ssd(x, dt, A.to("meta"), B, C, backend="reference")


def test_use_backend_sets_the_automatic_choice_only():
    from mambakit.ops import use_backend
    from mambakit.ops.dispatch import select_backend

    cpu = torch.device("cpu")
    assert select_backend("op", None, cpu) == "torch"
    with use_backend("reference"):
        assert select_backend("op", None, cpu) == "reference"
        assert select_backend("op", "torch", cpu) == "torch"  # an explicit argument wins
        # an op without the backend keeps its automatic choice
        assert select_backend("op", None, cpu, supported=("torch", "triton")) == "torch"
        with use_backend(None):
            assert select_backend("op", None, cpu) == "torch"
        assert select_backend("op", None, cpu) == "reference"
    assert select_backend("op", None, cpu) == "torch"
    with pytest.raises(ValueError, match="use_backend: backend must be None or one of"):
        with use_backend("cuda"):
            pass


def test_use_backend_reaches_the_ops(monkeypatch):
    """Inside use_backend("triton") an op on CPU tensors (interpreter off) asks for CUDA: the choice reached it."""
    from mambakit.ops import use_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, dt = torch.randn(1, 5, 3), torch.rand(1, 5, 3)
    A, B, C = -torch.rand(3, 2), torch.randn(1, 5, 2), torch.randn(1, 5, 2)
    selective_scan(x, dt, A, B, C)  # automatic: torch on CPU
    with use_backend("triton"), pytest.raises(ValueError, match="selective_scan: backend 'triton' needs CUDA tensors"):
        selective_scan(x, dt, A, B, C)


def test_backend_table_loads_every_cpu_implementation():
    """Every op's reference / torch entries import and are callable (the Triton ones are loaded by the kernel
    tests); each row names only known backends."""
    from mambakit.ops.dispatch import BACKEND_TABLE, BACKENDS

    for op, row in BACKEND_TABLE.items():
        assert set(row) <= set(BACKENDS), op
        for name, impl in row.items():
            if name != "triton":
                assert callable(impl.load()), (op, name)


def test_backend_table_enforces_declared_limits():
    from mambakit.ops.dispatch import implementation

    cpu = torch.device("cpu")
    name, _ = implementation("selective_scan", None, cpu, complex_A=True)
    assert name == "torch"
    # the Triton backend runs where Triton does: CUDA, or the CPU through the interpreter (CI)
    tdev = torch.device(DEVICE)
    with pytest.raises(ValueError, match=r"selective_scan: complex A is supported by the backends \('reference', "
                                         r"'torch'\), not 'triton'"):
        implementation("selective_scan", "triton", tdev, complex_A=True)
    with pytest.raises(ValueError, match="mamba2_inner: backend 'triton' needs seqlen >= 1"):
        implementation("mamba2_inner", "triton", tdev, empty=True)
    # the decode step's fused norm + projection has no backward: a call that needs gradients runs the torch path
    assert implementation("add_rms_norm_linear", "triton", tdev, needs_grad=True)[0] == "torch"
    assert implementation("add_rms_norm_linear", "triton", tdev, needs_grad=False)[0] == "triton"
    assert implementation("add_rms_norm", "triton", tdev, needs_grad=True)[0] == "triton"
    cuda = torch.device("cuda")
    if triton_available():
        assert implementation("add_rms_norm", None, cuda, needs_grad=True)[0] == "triton"


def test_a_backward_not_automatic_runs_only_when_named(monkeypatch):
    """Implementation.grad_automatic=False (a backward tested but not timed): the automatic choice falls back for a
    call that needs gradients; named, or in a use_backend block, the backend runs."""
    import dataclasses

    from mambakit.ops import dispatch, use_backend
    from mambakit.ops.dispatch import implementation

    row = dict(dispatch.BACKEND_TABLE["add_rms_norm"])
    row["triton"] = dataclasses.replace(row["triton"], grad_automatic=False, grad_fallback="torch")
    monkeypatch.setitem(dispatch.BACKEND_TABLE, "add_rms_norm", row)
    cuda = torch.device("cuda")
    if triton_available():
        assert implementation("add_rms_norm", None, cuda, needs_grad=False)[0] == "triton"
        assert implementation("add_rms_norm", None, cuda, needs_grad=True)[0] == "torch"
    tdev = torch.device(DEVICE)  # where the Triton backend runs: CUDA, or the CPU through the interpreter
    assert implementation("add_rms_norm", "triton", tdev, needs_grad=True)[0] == "triton"
    with use_backend("triton"):
        assert implementation("add_rms_norm", None, tdev, needs_grad=True)[0] == "triton"
    with pytest.raises(ValueError, match="not implemented for this op"):
        implementation("add_rms_norm", "reference", tdev)


def test_ssd_torch_block_is_the_backends_choice():
    """Off CUDA the torch SSD caps its block at 64 itself (a module passes its config's chunk_size): 256 and 64
    run the same blocks, so the results are bitwise equal."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 150, 2, 4, generator=gen)
    dt, A = torch.rand(1, 150, 2, generator=gen), -torch.rand(2, generator=gen)
    B, C = torch.randn(2, 1, 150, 1, 8, generator=gen)
    y64 = ssd(x, dt, A, B, C, chunk_size=64, backend="torch")
    y256 = ssd(x, dt, A, B, C, chunk_size=256, backend="torch")
    assert torch.equal(y64, y256)


def test_mixer_paths_are_constructor_arguments():
    """`fused` and `recompute` come from the config's ssm_cfg (the mixers no longer tune the SSD block)."""
    from mambakit import MambaConfig, MambaLM

    for layer in ("Mamba1", "Mamba2"):
        cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=8,
                          ssm_cfg={"layer": layer, "fused": False, "recompute": True, "d_state": 4, "headdim": 8}
                          if layer == "Mamba2" else {"layer": layer, "fused": False, "recompute": True, "d_state": 4})
        mixer = MambaLM(cfg).backbone.layers[0].mixer
        assert (mixer.fused, mixer.recompute) == (False, True)
        assert not hasattr(mixer, "_chunk_size")


def test_a_backend_not_yet_timed_runs_only_when_named():
    """linear_cross_entropy's Triton backend is `automatic=False`: on CUDA the automatic choice stays "torch" (the
    other ops' Triton backends are picked), while backend="triton" and use_backend("triton") still run it."""
    from mambakit.ops import dispatch

    cuda = torch.device("cuda")
    assert not dispatch.BACKEND_TABLE["linear_cross_entropy"]["triton"].automatic
    assert dispatch.implementation("linear_cross_entropy", None, cuda)[0] == "torch"
    assert dispatch.implementation("ssd", None, cuda)[0] == "triton"
    assert dispatch.implementation("linear_cross_entropy", "triton", cuda)[0] == "triton"
    with dispatch.use_backend("triton"):
        assert dispatch.implementation("linear_cross_entropy", None, cuda)[0] == "triton"
