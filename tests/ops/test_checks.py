"""The per-family checks of ops/checks.py: a sequence op and its one-token update validate their shared
arguments through one helper, so the same bad argument fails alike in both (each under its own op name)."""

import math
import re

import pytest
import torch

from mambakit.ops import (add_rms_norm, causal_conv1d, causal_conv1d_update, rms_norm, selective_scan,
                          selective_state_update, ssd, ssd_state_update)
from mambakit.ops.checks import as_grouped, write_back

Bt, L, D, N, H, P, W = 2, 5, 6, 4, 3, 2, 4


def _scan(**bad):
    args = dict(x=torch.randn(Bt, L, D), dt=torch.rand(Bt, L, D), A=-torch.rand(D, N), B=torch.randn(Bt, L, N),
                C=torch.randn(Bt, L, N))
    return selective_scan(**{**args, **bad}, backend="reference")


def _scan_step(**bad):
    args = dict(state=torch.zeros(Bt, D, N), x=torch.randn(Bt, D), dt=torch.rand(Bt, D), A=-torch.rand(D, N),
                B=torch.randn(Bt, N), C=torch.randn(Bt, N))
    return selective_state_update(**{**args, **bad}, backend="torch")


def _ssd(**bad):
    args = dict(x=torch.randn(Bt, L, H, P), dt=torch.rand(Bt, L, H), A=-torch.rand(H), B=torch.randn(Bt, L, N),
                C=torch.randn(Bt, L, N))
    return ssd(**{**args, **bad}, backend="reference")


def _ssd_step(**bad):
    args = dict(state=torch.zeros(Bt, H, P, N), x=torch.randn(Bt, H, P), dt=torch.rand(Bt, H), A=-torch.rand(H),
                B=torch.randn(Bt, N), C=torch.randn(Bt, N))
    return ssd_state_update(**{**args, **bad}, backend="torch")


def _conv(**bad):
    return causal_conv1d(**{"x": torch.randn(Bt, L, D), "weight": torch.randn(D, W), **bad}, backend="reference")


def _conv_step(**bad):
    args = dict(conv_state=torch.zeros(Bt, D, W - 1), x=torch.randn(Bt, D), weight=torch.randn(D, W))
    return causal_conv1d_update(**{**args, **bad}, backend="torch")


def _norm(**bad):
    return rms_norm(**{"x": torch.randn(Bt, D), "weight": torch.ones(D), **bad}, backend="torch")


def _add_norm(**bad):
    return add_rms_norm(**{"x": torch.randn(Bt, D), "residual": None, "weight": torch.ones(D), **bad},
                        backend="torch")


@pytest.mark.parametrize("sequence, update, bad, message", [
    pytest.param(_scan, _scan_step, {"A": -torch.rand(D + 1, N)}, "A must have shape (dim=6, dstate=4)", id="scan-A"),
    pytest.param(_scan, _scan_step, {"D": torch.ones(D + 1)}, "D must have shape (dim=6)", id="scan-D"),
    pytest.param(_ssd, _ssd_step, {"dt_limit": (1.0, 0.0)}, "dt_limit must be (low, high) with 0 <= low <= high",
                 id="ssd-dt-limit"),
    pytest.param(_ssd, _ssd_step, {"D": torch.ones(H, P + 1)}, "D must have shape (nheads=3, headdim=2)",
                 id="ssd-D-per-channel"),
    pytest.param(_conv, _conv_step, {"activation": "relu"}, "activation must be one of", id="conv-activation"),
    pytest.param(_conv, _conv_step, {"weight": torch.randn(D, 1)}, "weight must have width >= 2", id="conv-width"),
    pytest.param(_norm, _add_norm, {"eps": -1.0}, "eps must be >= 0, got -1.0", id="norm-eps"),
    pytest.param(_norm, _add_norm, {"weight": torch.ones(D + 1)}, "weight must have shape (hidden=6)",
                 id="norm-weight"),
])
def test_sequence_op_and_update_reject_the_same_argument_alike(sequence, update, bad, message):
    sequence()  # the good call works: the failure below is the bad argument's
    update()
    for fn in (sequence, update):
        op = fn.__name__
        name = {"_scan": "selective_scan", "_scan_step": "selective_state_update", "_ssd": "ssd",
                "_ssd_step": "ssd_state_update", "_conv": "causal_conv1d", "_conv_step": "causal_conv1d_update",
                "_norm": "rms_norm", "_add_norm": "add_rms_norm"}[op]
        with pytest.raises(ValueError, match=rf"^{re.escape(name)}: {re.escape(message)}"):
            fn(**bad)


@pytest.mark.parametrize("fn, state_name", [
    pytest.param(_scan, "initial_state", id="scan"), pytest.param(_scan_step, "state", id="scan-step"),
    pytest.param(_ssd, "initial_state", id="ssd"), pytest.param(_ssd_step, "state", id="ssd-step"),
    pytest.param(_conv, "initial_state", id="conv"), pytest.param(_conv_step, "conv_state", id="conv-step"),
])
def test_the_state_is_named_as_the_op_names_it(fn, state_name):
    with pytest.raises(ValueError, match=rf": {state_name} must be 3-D|: {state_name} must be 4-D"):
        fn(**{state_name: torch.zeros(Bt, 1)})


def test_as_grouped_adds_the_group_axis_only_where_it_is_missing():
    b3 = torch.randn(Bt, L, N)
    assert as_grouped(b3, 4).shape == (Bt, L, 1, N) and as_grouped(b3, 4).data_ptr() == b3.data_ptr()
    assert as_grouped(torch.randn(Bt, N), 3).shape == (Bt, 1, N)
    b4 = torch.randn(Bt, L, 2, N)
    assert as_grouped(b4, 4) is b4 and as_grouped(None, 4) is None


def test_write_back_copies_a_new_state_and_keeps_one_updated_in_place():
    state, y = torch.zeros(2, 3), torch.ones(2)
    new = torch.full((2, 3), 7.0)
    assert write_back(state, (y, new)) is y and torch.equal(state, new)
    same = torch.zeros(2, 3)
    assert write_back(same, (y, same)) is y and torch.equal(same, torch.zeros(2, 3))
    # the ops themselves: a backend that returns a fresh state still leaves it in the caller's tensor
    state = torch.zeros(Bt, H, P, N)
    _ssd_step(state=state, dt_limit=(0.0, math.inf))
    assert state.abs().sum() > 0
