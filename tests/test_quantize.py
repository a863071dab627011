"""CPU bfloat16 and int8 weight-only inference: `Int8Linear`, `quantize_weights`, and
`mambakit generate --dtype bfloat16 / --quantize int8`.

The int8 product rounds activations to bfloat16 on CPU (modules/quantized.py says why), so a quantized layer is
compared with F.linear over its dequantized weight at bfloat16's tolerance, and a quantized model's logits with
the float32 model's at a few percent of their scale (int8 rounding of every weight: about 1/254 of a row's
largest weight per element).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambakit import MambaConfig, MambaLM
from mambakit.cli.__main__ import main
from mambakit.generation import generate
from mambakit.modules import Int8Linear, quantize_weights
from mambakit.modules.quantized import quantize_int8

from .helpers import assert_close


def test_quantize_int8_rounds_each_weight_to_half_a_step():
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert int(q.abs().max()) == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())
    assert bool((q[5] == 0).all())


@pytest.mark.parametrize("in_features, out_features, lead, bias", [
    pytest.param(64, 96, (3,), True, id="packed-kernel-2d-bias"),
    pytest.param(128, 40, (2, 5), False, id="packed-kernel-3d"),
    pytest.param(24, 33, (2, 5), True, id="width-not-multiple-of-16-dequantized"),
    pytest.param(8, 16, (1,), False, id="narrow-dequantized"),
])
def test_int8_linear_equals_its_dequantized_weight(in_features, out_features, lead, bias):
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(*lead, in_features)
    with torch.no_grad():
        got = layer(x)
        # what the layer computes: bf16 activations times the dequantized weight (fp32 accumulation)
        want = F.linear(x.to(torch.bfloat16).float(), layer.weight, linear.bias)
        plain = linear(x)
    assert got.shape == (*lead, out_features) and got.dtype == torch.float32
    assert_close(got, want, name="int8 vs dequantized", rel=1e-2)
    assert_close(got, plain, name="int8 vs float32 layer", rel=3e-2)


def test_int8_linear_rejects_a_wrong_width():
    layer = Int8Linear.from_linear(nn.Linear(32, 16))
    with pytest.raises(ValueError, match=r"Int8Linear: x must be \(\.\.\., 32\), got \(2, 31\)"):
        layer(torch.randn(2, 31))


def _model(layer: str) -> MambaLM:
    cfg = {"Mamba1": {"layer": "Mamba1"}, "Mamba2": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}}
    return MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg=cfg[layer])).eval()


@pytest.mark.parametrize("layer", [pytest.param("Mamba1", id="mamba1"), pytest.param("Mamba2", id="mamba2")])
def test_quantized_model_logits_close_to_float32(layer):
    model = _model(layer)
    ids = torch.randint(0, 256, (2, 24))
    quantized = quantize_weights(copy.deepcopy(model))
    linears = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
    assert linears == [] and isinstance(quantized.lm_head, Int8Linear)
    # the tied embedding keeps its float weight; the head got its own int8 copy
    assert quantized.backbone.embedding.weight.dtype == torch.float32
    with torch.no_grad():
        want = model(ids)
        got = quantized(ids)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids)
    assert_close(got, want, name=f"{layer} int8 logits", rel=3e-2)
    assert_close(bf16.float(), want, name=f"{layer} bf16 logits", rel=3e-2)


@pytest.mark.parametrize("layer", [pytest.param("Mamba1", id="mamba1"), pytest.param("Mamba2", id="mamba2")])
def test_quantized_model_decoding_equals_its_parallel_forward(layer):
    """Prefill then one token at a time through the int8 layers gives the logits of one parallel forward."""
    quantized = quantize_weights(_model(layer))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = quantized(ids)
        cache = quantized.allocate_cache(2)
        steps = [quantized(ids[:, :8], cache=cache)]
        steps += [quantized(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
    assert_close(torch.cat(steps, dim=1), full, name=f"{layer} int8 cached decode", rel=1e-4)


def test_quantize_weights_skip_and_errors():
    model = quantize_weights(_model("Mamba2"), skip=["lm_head"])
    assert type(model.lm_head) is nn.Linear and isinstance(model.backbone.layers[0].mixer.in_proj, Int8Linear)
    with pytest.raises(ValueError, match=r"skip names \['nope'\] are not submodules"):
        quantize_weights(_model("Mamba2"), skip=["nope"])
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_weights(_model("Mamba2"), "int4")


@pytest.fixture
def byte_checkpoint(tmp_path):
    """A random byte-level Mamba-1 LM saved as `mambakit train` saves one (width 64: the packed int8 kernel)."""
    from mambakit.data import ByteTokenizer

    model = _model("Mamba1")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    return tmp_path / "model", model


@pytest.mark.parametrize("flags, convert", [
    pytest.param(["--dtype", "bfloat16"], lambda m: m.to(torch.bfloat16), id="bfloat16"),
    pytest.param(["--quantize", "int8"], quantize_weights, id="int8"),
    pytest.param(["--dtype", "bfloat16", "--quantize", "int8"], lambda m: quantize_weights(m.to(torch.bfloat16)),
                 id="bfloat16-int8"),
])
def test_generate_cli_dtype_and_quantize(capsys, byte_checkpoint, flags, convert):
    """The command's greedy text is the Python API's on the same converted model; the speed line names ms/token."""
    from mambakit.data import ByteTokenizer

    model_dir, model = byte_checkpoint
    argv = ["generate", "--model", str(model_dir), "--prompt", "to be", "--temperature", "0", "--max-new-tokens", "10",
            "--device", "cpu", *flags]
    assert main(argv) == 0
    captured = capsys.readouterr()
    tok = ByteTokenizer()
    new = generate(convert(copy.deepcopy(model)), [[tok.eos_id] + tok.encode("to be")], 10, eos_token_id=tok.eos_id)[0]
    expected = tok.decode(new[:-1] if new and new[-1] == tok.eos_id else new)
    assert captured.out == "to be" + expected + "\n"
    assert "ms/token" in captured.err
