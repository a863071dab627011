"""Mamba1 / Mamba2 modules: parameter names and shapes as mamba_ssm, the papers' initialisation, input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM
from mambakit.modules import Mamba1, Mamba2

from .helpers import assert_close, saved_bytes


def test_mamba1_parameter_names_and_shapes_match_reference():
    m = Mamba1(d_model=64)  # d_inner 128, dt_rank ceil(64/16) = 4, d_state 16, d_conv 4
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,),
        "x_proj.weight": (4 + 2 * 16, 128),
        "dt_proj.weight": (128, 4),
        "dt_proj.bias": (128,),
        "A_log": (128, 16),
        "D": (128,),
        "out_proj.weight": (64, 128),
    }


def test_mamba2_parameter_names_and_shapes_match_reference():
    m = Mamba2(d_model=64, d_state=32, headdim=16, ngroups=2)  # d_inner 128, 8 heads
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    d_in_proj = 2 * 128 + 2 * 2 * 32 + 8
    assert shapes == {
        "in_proj.weight": (d_in_proj, 64),
        "conv1d.weight": (128 + 2 * 2 * 32, 1, 4),
        "conv1d.bias": (128 + 2 * 2 * 32,),
        "dt_bias": (8,),
        "A_log": (8,),
        "D": (8,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    assert tuple(Mamba2(64, headdim=16, D_has_hdim=True).D.shape) == (128,)


def _check_dt(dt: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """dt must be log-uniform in [dt_min, dt_max], then floored."""
    assert float(dt.min()) >= max(dt_min, floor) * (1 - 1e-5)
    assert float(dt.max()) <= dt_max * (1 + 1e-5)
    log_dt = dt.log()
    lo, hi = math.log(dt_min), math.log(dt_max)
    # mean and spread of a uniform on [lo, hi]: a log-uniform draw, not a uniform one
    assert abs(float(log_dt.mean()) - (lo + hi) / 2) < 0.12
    assert abs(float(log_dt.std()) - (hi - lo) / math.sqrt(12)) < 0.12


def test_mamba1_initialisation_follows_the_paper():
    m = Mamba1(d_model=1024, dt_min=1e-3, dt_max=1e-1)  # 2048 channels: enough for distribution checks
    n = torch.arange(1, 17, dtype=torch.float32)
    assert_close(m.A_log, n.log().expand(2048, 16), name="A_log (S4D-Real: log(n+1))", rel=0)
    assert torch.equal(m.D.detach(), torch.ones(2048))
    _check_dt(F.softplus(m.dt_proj.bias.detach()), 1e-3, 1e-1, 1e-4)
    bound = m.dt_rank ** -0.5
    w = m.dt_proj.weight.detach().abs()
    assert float(w.max()) <= bound
    assert float(w.max()) > 0.9 * bound  # uniform over the whole range, not a constant
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_mamba1_dt_floor_applies():
    m = Mamba1(d_model=512, dt_min=1e-5, dt_max=1e-3, dt_init_floor=1e-4)
    dt = F.softplus(m.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-4 * (1 - 1e-4)
    assert (dt < 1.0001e-4).any()  # half of the log-uniform draws fall under the floor (1e-4 is the geometric midpoint)


@pytest.mark.slow
def test_mamba2_initialisation_follows_the_paper():
    m = Mamba2(d_model=4096, headdim=4, dt_min=1e-3, dt_max=1e-1, A_init_range=(1, 16))  # 2048 heads
    A = m.A_log.detach().exp()
    assert float(A.min()) >= 1 and float(A.max()) <= 16
    assert abs(float(A.mean()) - 8.5) < 0.5  # uniform on [1, 16]
    _check_dt(F.softplus(m.dt_bias.detach()), 1e-3, 1e-1, 1e-4)
    assert torch.equal(m.D.detach(), torch.ones(2048))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_bias._no_weight_decay


@pytest.mark.parametrize("cls", [pytest.param(Mamba1, id="mamba1"), pytest.param(Mamba2, id="mamba2")])
def test_modules_reject_wrong_input_shape(cls):
    m = cls(d_model=32, **({"headdim": 16, "d_state": 16} if cls is Mamba2 else {}))
    with pytest.raises(ValueError, match=r"hidden_states must be \(batch, seqlen, d_model=32\)"):
        m(torch.randn(2, 10, 31))
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(10, 32))


def test_mamba2_rejects_bad_config():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(d_model=48, headdim=64)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(d_model=64, headdim=32, ngroups=3)


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    pytest.param(lambda: Mamba1(32, d_state=8, dtype=torch.float64), id="mamba1"),
    pytest.param(lambda: Mamba2(32, d_state=16, headdim=16, chunk_size=16, dtype=torch.float64), id="mamba2"),
    pytest.param(lambda: Mamba2(32, d_state=16, headdim=16, chunk_size=16, ngroups=2, d_ssm=32,
                                dtype=torch.float64), id="mamba2-mlp-half-groups2"),
])
def test_recompute_gives_the_same_gradients_and_keeps_less(make):
    """mixer.recompute = True keeps only in_proj's output for the backward and recomputes conv, projections
    and the scan there: identical output and gradients (input and every parameter), far fewer saved bytes."""
    torch.manual_seed(0)
    mixer = make()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 15 + [1] * 25, [0] * 40], dtype=torch.int32)
    params = [p for p in mixer.parameters()]
    results = {}
    for recompute in (False, True):
        mixer.recompute = recompute
        y, saved = saved_bytes(lambda: mixer(x, seq_idx=seq_idx))
        grads = torch.autograd.grad((y * y).sum(), [x, *params])
        results[recompute] = (y, grads, saved)
    (y0, g0, s0), (y1, g1, s1) = results[False], results[True]
    assert torch.equal(y0, y1)
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert_close(b, a, name=f"grad {i}", rel=1e-12)
    assert s1 < 0.5 * s0, (s1, s0)


# ---- the block's norm writes the dtype autocast would cast the mixer's input to -------------------------------


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_block_norm_output_under_autocast_is_the_cast_in_proj_would_make(layer, monkeypatch):
    """Under autocast the block's add + norm writes its output in the autocast dtype when the mixer's first op is a
    plain in_proj (`fusion.autocast_input_dtype`): the block's output and every gradient are bitwise those of the
    float32 norm output cast by autocast at in_proj."""
    from mambakit.modules import block as block_mod
    from mambakit.modules import fusion

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, pad_vocab_size_multiple=8,
                      ssm_cfg={"layer": layer, **({"headdim": 16, "d_state": 16, "chunk_size": 16}
                                                  if layer == "Mamba2" else {})})
    model = MambaLM(cfg)
    ids = torch.randint(0, 64, (2, 12))
    mixer = model.backbone.layers[0].mixer
    x = torch.randn(2, 12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusion.autocast_input_dtype(mixer, x, torch.float32) == torch.bfloat16
        assert fusion.autocast_input_dtype(mixer, x, torch.float64) is None  # autocast leaves float64 alone
    assert fusion.autocast_input_dtype(mixer, x, torch.float32) is None  # autocast off

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run()
    monkeypatch.setattr(block_mod, "autocast_input_dtype", lambda *args: None)
    logits_ref, grads_ref = run()
    assert torch.equal(logits, logits_ref)
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


def test_autocast_input_dtype_refuses_what_it_cannot_vouch_for():
    """A hooked mixer, an adapted (non-plain) in_proj or a mixer that does not start with in_proj keeps the norm's
    own dtype: autocast's cast at the first op is left to happen as it would."""
    from mambakit.modules import fusion

    x = torch.randn(1, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer = Mamba1(d_model=16)
        assert fusion.autocast_input_dtype(mixer, x, torch.float32) == torch.bfloat16
        handle = mixer.register_forward_pre_hook(lambda module, args: None)
        assert fusion.autocast_input_dtype(mixer, x, torch.float32) is None
        handle.remove()
        mixer.in_proj = torch.nn.Sequential(mixer.in_proj)  # anything but a plain nn.Linear
        assert fusion.autocast_input_dtype(mixer, x, torch.float32) is None
        assert fusion.autocast_input_dtype(torch.nn.Linear(16, 16), x, torch.float32) is None
