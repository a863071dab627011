"""Backpropagation through a mixer forward that fills a cache (truncated backprop through time needs it).

With a cache, Mamba1 / Mamba2 pass the cache's states to the ops as `initial_state` and then overwrite
them in place with the final states (`copy_`), so an op that saved the caller's state for its backward
would fail ("modified by an inplace operation") or differentiate the overwritten values. For each mixer
and each backend (torch; triton through TRITON_INTERPRET=1 on CPU; the float64 reference ops):

* zero cache: the cached forward's output and every gradient equal the uncached forward's;
* non-zero cache: output, the cache's new contents and every gradient (the starting states included,
  with an upstream gradient on the new cache contents too) equal a composition of the same ops that is
  given `initial_state` directly and never writes into it;
* two cached segments backpropagated together equal one uncached forward over the whole sequence.

Segments are longer than one token: a one-token forward with a cache takes the decode step path.
"""

from __future__ import annotations

import pytest
import torch

from mambakit.modules import Mamba1, Mamba2
from mambakit.modules.state import MixerState
from mambakit.ops import causal_conv1d, selective_scan, ssd, use_backend
from tests.helpers import assert_close

BATCH, SEQLEN, D_MODEL = 2, 7, 32


def _mamba1():
    return Mamba1(d_model=D_MODEL, expand=1, d_state=16)


def _mamba2():
    # headdim = dstate = 16: the Triton SSD's tl.dot needs block dims >= 16 under the interpreter
    return Mamba2(d_model=D_MODEL, expand=2, d_state=16, headdim=16, chunk_size=16)


MIXERS = [pytest.param(_mamba1, id="mamba1"), pytest.param(_mamba2, id="mamba2")]
# the Triton cases take tens of seconds under the interpreter: CI runs them, the fast lane does not
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.slow),
            pytest.param("reference", id="reference")]


def _mamba1_direct(layer: Mamba1, u, conv0, ssm0):
    """Mamba1's cached forward written with the ops, the states given as initial_state and returned, not stored."""
    x, z = layer.in_proj(u).chunk(2, dim=-1)
    x, conv_final = causal_conv1d(x, layer.conv1d.weight.squeeze(1), layer.conv1d.bias, activation="silu",
                                  initial_state=conv0, return_final_state=True)
    dt, B, C, dt_bias = layer._ssm_params(x)
    y, ssm_final = selective_scan(x, dt, -torch.exp(layer.A_log.float()), B, C, D=layer.D.float(), z=z,
                                  dt_bias=dt_bias.float(), dt_softplus=True, initial_state=ssm0,
                                  return_final_state=True)
    return layer.out_proj(y), conv_final, ssm_final


def _mamba2_direct(layer: Mamba2, u, conv0, ssm0):
    """Mamba2's cached forward written with the ops (as `_mamba1_direct`)."""
    batch, seqlen, _ = u.shape
    z0, x0, z, xBC, dt = layer._split_in_proj(layer.in_proj(u))
    xBC, conv_final = causal_conv1d(xBC, layer.conv1d.weight.squeeze(1), layer.conv1d.bias, activation="silu",
                                    initial_state=conv0, return_final_state=True)
    gn = layer.ngroups * layer.d_state
    x, B, C = torch.split(xBC, [layer.d_ssm, gn, gn], dim=-1)
    y, ssm_final = ssd(x.reshape(batch, seqlen, layer.nheads, layer.headdim), dt, -torch.exp(layer.A_log.float()),
                       B.reshape(batch, seqlen, layer.ngroups, layer.d_state),
                       C.reshape(batch, seqlen, layer.ngroups, layer.d_state), D=layer._D(),
                       z=None if layer.rmsnorm else z.reshape(batch, seqlen, layer.nheads, layer.headdim),
                       dt_bias=layer.dt_bias.float(), dt_softplus=True, dt_limit=layer.dt_limit,
                       chunk_size=layer.chunk_size, initial_state=ssm0, return_final_state=True)
    return layer._output(y.reshape(batch, seqlen, layer.d_ssm), z, z0, x0), conv_final, ssm_final


def _grads(layer, leaves):
    """Gradients of every parameter and of `leaves` (name -> tensor); a missing gradient counts as zeros."""
    named = dict(layer.named_parameters()) | leaves
    return {k: v.grad.clone() if v.grad is not None else torch.zeros_like(v) for k, v in named.items()}


def _assert_grads_equal(got, expected, what):
    assert got.keys() == expected.keys()
    for k in expected:
        assert_close(got[k], expected[k], name=f"{what}: grad {k}")
    # a dropped gradient would compare zeros with zeros above: the input's must be there
    assert float(expected["u"].abs().max()) > 0, f"{what}: no gradient reached the input"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", MIXERS)
def test_cached_forward_backprops_like_the_uncached_one(make, backend):
    layer = make()
    u0 = torch.randn(BATCH, SEQLEN, D_MODEL)
    g = torch.randn(BATCH, SEQLEN, D_MODEL)
    with use_backend(backend):
        u = u0.clone().requires_grad_(True)
        out_ref = layer(u)
        (out_ref * g).sum().backward()
        expected = _grads(layer, {"u": u})
        layer.zero_grad()

        u = u0.clone().requires_grad_(True)
        cache = layer.allocate_state(BATCH)
        out = layer(u, cache=cache)
        (out * g).sum().backward()
        got = _grads(layer, {"u": u})
    assert_close(out, out_ref, name="output")
    _assert_grads_equal(got, expected, "zero cache")
    assert float(cache.ssm_state.detach().abs().max()) > 0, "the cache was not filled"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", MIXERS)
def test_cached_forward_from_a_nonzero_state_backprops_like_the_ops_given_initial_state(make, backend):
    layer = make()
    direct = _mamba1_direct if isinstance(layer, Mamba1) else _mamba2_direct
    shapes = layer.allocate_state(BATCH)
    u0 = torch.randn(BATCH, SEQLEN, D_MODEL)
    conv00 = torch.randn_like(shapes.conv_state)
    ssm00 = torch.randn_like(shapes.ssm_state) * 0.5
    g_out = torch.randn(BATCH, SEQLEN, D_MODEL)
    g_conv, g_ssm = torch.randn_like(conv00), torch.randn_like(ssm00)

    def leaves():
        return {"u": u0.clone().requires_grad_(True), "conv0": conv00.clone().requires_grad_(True),
                "ssm0": ssm00.clone().requires_grad_(True)}

    with use_backend(backend):
        ref = leaves()
        out_ref, conv_ref, ssm_ref = direct(layer, ref["u"], ref["conv0"], ref["ssm0"])
        ((out_ref * g_out).sum() + (conv_ref * g_conv).sum() + (ssm_ref * g_ssm).sum()).backward()
        expected = _grads(layer, ref)
        layer.zero_grad()

        # the cache holds non-leaf copies of the starting states: after the mixer's copy_ the gradient
        # must still reach the values the ops read (the leaves), and the new contents carry the final states
        got_leaves = leaves()
        cache = MixerState(conv_state=got_leaves["conv0"].clone(), ssm_state=got_leaves["ssm0"].clone())
        out = layer(got_leaves["u"], cache=cache)
        ((out * g_out).sum() + (cache.conv_state * g_conv).sum() + (cache.ssm_state * g_ssm).sum()).backward()
        got = _grads(layer, got_leaves)
    assert_close(out, out_ref, name="output")
    assert_close(cache.conv_state, conv_ref, name="cache conv_state")
    assert_close(cache.ssm_state, ssm_ref, name="cache ssm_state")
    _assert_grads_equal(got, expected, "non-zero cache")
    assert float(expected["conv0"].abs().max()) > 0 and float(expected["ssm0"].abs().max()) > 0


@pytest.mark.parametrize("make, backend", [
    pytest.param(_mamba1, "torch", id="mamba1-torch"),
    # ~20 s: the interpreter runs the scan kernels over 14 tokens three times (uncached, two segments)
    pytest.param(_mamba1, "triton", id="mamba1-triton", marks=pytest.mark.slow),
    pytest.param(_mamba1, "reference", id="mamba1-reference"),
    pytest.param(_mamba2, "torch", id="mamba2-torch"),
    pytest.param(_mamba2, "triton", id="mamba2-triton", marks=pytest.mark.slow),
    pytest.param(_mamba2, "reference", id="mamba2-reference"),
])
def test_two_cached_segments_backprop_like_one_uncached_forward(make, backend):
    layer = make()
    u0 = torch.randn(BATCH, 2 * SEQLEN, D_MODEL)
    g = torch.randn(BATCH, 2 * SEQLEN, D_MODEL)
    with use_backend(backend):
        u = u0.clone().requires_grad_(True)
        (layer(u) * g).sum().backward()
        expected = _grads(layer, {"u": u})
        layer.zero_grad()

        # the second segment starts from the states the first one wrote into the cache; backprop through
        # both reaches the first segment through the cache (uneven split: 5 then 9 tokens)
        u = u0.clone().requires_grad_(True)
        cache = layer.allocate_state(BATCH)
        out = torch.cat([layer(u[:, :5], cache=cache), layer(u[:, 5:], cache=cache)], dim=1)
        (out * g).sum().backward()
        got = _grads(layer, {"u": u})
    _assert_grads_equal(got, expected, "two segments")
