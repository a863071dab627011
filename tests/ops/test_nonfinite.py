"""Non-finite values stay causal in every sequence op, on every backend (reference, torch, triton).

In the recurrence a NaN or inf entering at token t can only reach outputs at tokens >= t. A chunked
matmul form breaks that unless it takes care (0 * NaN = NaN above the causal mask), so for `ssd`,
`selective_scan` and `causal_conv1d` a single non-finite entry is put into one input at token t and,
for each backend:

* every output before t equals the clean run's exactly (same backend, same inputs otherwise);
* the set of non-finite outputs and of non-finite final-state entries is the sequential reference's;
* every output that stays finite equals the clean run's exactly.

The inputs are made on DEVICE: CUDA where there is one, else the CPU, where Triton runs through
TRITON_INTERPRET=1 (tests/conftest.py); headdim = dstate = 16 because the interpreter's tl.dot needs block
dims >= 16. Gradients with non-finite inputs are not covered.
"""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import causal_conv1d, selective_scan, ssd

# numpy (under Triton's interpreter) warns on every NaN it computes with: here that is the point
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")
BACKENDS = ("reference", "torch", "triton")
# document indices, on the CPU (a parametrize value): .to(DEVICE) where used
SEQ_IDX = torch.tensor([[0] * 10 + [1] * 8 + [2] * 12 + [3] * 10, [0] * 40], dtype=torch.int32)  # (2, 40)
SEQ_IDX_24 = torch.tensor([[0] * 6 + [1] * 5 + [2] * 13, [0] * 24], dtype=torch.int32)  # (2, 24)


def _ssd_inputs(seqlen=40, dtype=torch.float32):
    b, H, P, G, N = 2, 2, 16, 1, 16
    dev = DEVICE
    return {"x": torch.randn(b, seqlen, H, P, device=dev).to(dtype),
            "dt": torch.rand(b, seqlen, H, device=dev) * 0.5 - 0.5, "A": -torch.rand(H, device=dev) - 0.1,
            "B": torch.randn(b, seqlen, G, N, device=dev).to(dtype),
            "C": torch.randn(b, seqlen, G, N, device=dev).to(dtype), "D": torch.randn(H, device=dev),
            "z": torch.randn(b, seqlen, H, P, device=dev).to(dtype), "dt_bias": torch.rand(H, device=dev) * 0.3,
            "initial_state": torch.randn(b, H, P, N, device=dev)}


def _scan_inputs(seqlen=24):
    # small: the interpreter runs the Triton scan about 1 s per call at this size (4 s at 40 tokens x 32)
    b, d, g, n = 2, 16, 2, 16
    dev = DEVICE
    return {"x": torch.randn(b, seqlen, d, device=dev), "dt": torch.rand(b, seqlen, d, device=dev) * 0.5 - 0.5,
            "A": -(torch.rand(d, n, device=dev) + 0.5), "B": torch.randn(b, seqlen, g, n, device=dev),
            "C": torch.randn(b, seqlen, g, n, device=dev), "D": torch.randn(d, device=dev),
            "z": torch.randn(b, seqlen, d, device=dev), "dt_bias": torch.rand(d, device=dev) * 0.3,
            "initial_state": torch.randn(b, d, n, device=dev)}


def _conv_inputs(seqlen=40):
    b, d, w = 2, 32, 4
    dev = DEVICE
    return {"x": torch.randn(b, seqlen, d, device=dev), "weight": torch.randn(d, w, device=dev),
            "bias": torch.randn(d, device=dev), "initial_state": torch.randn(b, d, w - 1, device=dev)}


def _check_causal(op, inputs, options, name, index, value, backends=BACKENDS):
    """Put `value` at inputs[name][index] (index[1] is the token) and check every backend (see module doc)."""
    t = index[1]
    bad_inputs = {k: v.clone() for k, v in inputs.items()}
    bad_inputs[name][index] = value
    runs = {}
    for backend in ("reference",) + tuple(b for b in backends if b != "reference"):
        clean, _ = op(**inputs, **options, return_final_state=True, backend=backend)
        y, state = op(**bad_inputs, **options, return_final_state=True, backend=backend)
        runs[backend] = (clean, y, state)
    _, y_ref, state_ref = runs["reference"]
    bad_ref = ~torch.isfinite(y_ref)
    assert bad_ref.any(), "the reference output stayed finite: the case tests nothing"
    assert not bad_ref[:, :t].any(), "the reference itself is not causal"
    for backend, (clean, y, state) in runs.items():
        assert torch.equal(y[:, :t], clean[:, :t]), f"{backend}: outputs before token {t} differ from the clean run"
        bad = ~torch.isfinite(y)
        assert torch.equal(bad, bad_ref), (
            f"{backend}: {int(bad.sum())} non-finite outputs where the reference has {int(bad_ref.sum())}; "
            f"first non-finite token {int(bad.any(0).flatten(1).any(1).nonzero()[0])}")
        assert torch.equal(~torch.isfinite(state), ~torch.isfinite(state_ref)), f"{backend}: final state pattern"
        assert torch.equal(y[~bad], clean[~bad]), f"{backend}: finite outputs differ from the clean run"


# (input, index with the token second, value): a token inside a chunk, after several clean ones
SSD_CASES = [
    pytest.param("x", (0, 20, 1, 3), NAN, id="x-nan"),
    pytest.param("x", (1, 20, 0, 5), INF, id="x-inf"),
    pytest.param("x", (0, 20, 1, 3), -INF, id="x-neginf"),
    pytest.param("dt", (0, 20, 1), NAN, id="dt-nan"),
    pytest.param("dt", (0, 20, 1), INF, id="dt-inf"),
    pytest.param("B", (0, 20, 0, 2), NAN, id="B-nan"),
    pytest.param("B", (0, 20, 0, 2), INF, id="B-inf"),
    pytest.param("C", (0, 20, 0, 2), NAN, id="C-nan"),
    pytest.param("z", (0, 20, 1, 3), INF, id="z-inf"),
    pytest.param("x", (0, 5, 0, 0), NAN, id="x-nan-first-chunk"),
    pytest.param("x", (1, 37, 1, 15), NAN, id="x-nan-last-partial-chunk"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, index, value", SSD_CASES)
def test_ssd_nonfinite_stays_causal(name, index, value):
    _check_causal(ssd, _ssd_inputs(), {"chunk_size": 16, "dt_softplus": True}, name, index, value)


@pytest.mark.slow
@pytest.mark.parametrize("name, index, value", [
    pytest.param("x", (0, 12, 1, 3), NAN, id="x-nan"),
    pytest.param("dt", (0, 12, 1), INF, id="dt-inf"),
    pytest.param("B", (0, 12, 0, 2), NAN, id="B-nan"),
    pytest.param("x", (0, 22, 1, 3), INF, id="x-inf-third-document"),
])
def test_ssd_nonfinite_stays_causal_with_seq_idx(name, index, value):
    # the reference's document reset is h * 0, which keeps a NaN: the chunked paths match that pattern too
    _check_causal(ssd, _ssd_inputs(), {"chunk_size": 16, "dt_softplus": True, "seq_idx": SEQ_IDX.to(DEVICE)}, name,
                  index, value)


@pytest.mark.slow
@pytest.mark.parametrize("token", [
    # chunk 128 is two 64-row tiles in the Triton kernel: token 30 reaches rows 64..127 through the tile
    # sum left of the diagonal and rows 30..63 through the diagonal tile's cumulative sum
    pytest.param(30, id="first-row-block"),
    pytest.param(100, id="second-row-block"),
])
def test_ssd_nonfinite_stays_causal_across_row_blocks(token):
    _check_causal(ssd, _ssd_inputs(seqlen=150), {"chunk_size": 128}, "x", (0, token, 1, 3), NAN)


@pytest.mark.slow
def test_ssd_triton_bf16_nonfinite_stays_causal():
    _check_causal(ssd, _ssd_inputs(dtype=torch.bfloat16), {"chunk_size": 16}, "x", (0, 20, 1, 3), NAN,
                  backends=("reference", "triton"))


SCAN_CASES = [
    pytest.param("x", (0, 12, 3), NAN, id="x-nan"),
    pytest.param("x", (0, 12, 3), INF, id="x-inf"),
    pytest.param("dt", (0, 12, 3), NAN, id="dt-nan"),
    pytest.param("dt", (1, 12, 3), INF, id="dt-inf"),
    pytest.param("B", (0, 12, 1, 2), NAN, id="B-nan"),
    pytest.param("B", (0, 12, 1, 2), -INF, id="B-neginf"),
    pytest.param("C", (0, 12, 1, 2), INF, id="C-inf"),
    pytest.param("z", (0, 12, 3), NAN, id="z-nan"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, index, value", SCAN_CASES)
def test_selective_scan_nonfinite_stays_causal(name, index, value):
    _check_causal(selective_scan, _scan_inputs(), {"dt_softplus": True}, name, index, value)


@pytest.mark.slow
def test_selective_scan_nonfinite_stays_causal_with_seq_idx():
    _check_causal(selective_scan, _scan_inputs(), {"dt_softplus": True, "seq_idx": SEQ_IDX_24.to(DEVICE)}, "x",
                  (0, 14, 3), NAN)


@pytest.mark.parametrize("value", [pytest.param(NAN, id="nan"), pytest.param(INF, id="inf")])
@pytest.mark.parametrize("seq_idx", [pytest.param(None, id="one-document"), pytest.param(SEQ_IDX, id="seq_idx")])
def test_causal_conv1d_nonfinite_stays_causal(value, seq_idx):
    seq_idx = seq_idx.to(DEVICE) if seq_idx is not None else None
    _check_causal(causal_conv1d, _conv_inputs(), {"activation": "silu", "seq_idx": seq_idx}, "x", (0, 12, 3), value)
