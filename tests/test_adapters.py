"""Adapters, hooks and subclassed layers are never skipped by the fused paths.

peft's LoRA through `get_peft_model` on MambaLM: the adapters train (their gradients are non-zero, the frozen base
stays unchanged after an optimizer step) and the adapted model computes what the merged model computes. peft
refuses out_proj and conv1d for models whose config says model_type "mamba" / "mamba2" (its own guard, written
for kernels that read those weights directly); mambakit honours an adapter on out_proj all the same, which the
tests show with peft's LoRA layer put there by hand. Runs on the Triton backend (the fused default on CUDA; on
CPU through Triton's interpreter) and on the PyTorch backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft
from peft.tuners.lora import Linear as LoraLinear

from mambakit import MambaConfig, MambaLM
from mambakit.ops import use_backend
from tests.conftest import DEVICE
from tests.helpers import assert_close

BACKENDS = ["triton", "torch"]
TARGETS = {"Mamba1": ["in_proj", "x_proj", "dt_proj"], "Mamba2": ["in_proj"]}


def _model(layer: str) -> MambaLM:
    torch.manual_seed(0)
    ssm = {"layer": layer}
    if layer == "Mamba2":
        ssm.update(headdim=16, d_state=16, chunk_size=16)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg=ssm)).to(DEVICE)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_model_type_for_peft(layer):
    assert _model(layer).config.model_type == {"Mamba1": "mamba", "Mamba2": "mamba2"}[layer]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_peft_lora_trains_and_equals_merged(layer, backend):
    base = _model(layer)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[layer], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)
    ids = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with use_backend(backend):
        for step in range(2):
            opt.zero_grad()
            _loss(model, ids).backward()
            lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
            assert len(lora) == 2 * len(TARGETS[layer]) * 2, sorted(lora)  # A and B per target per layer
            # lora_B starts at zero, so only B moves in the first step; from the second on A's gradients flow too
            moving = [n for n, g in lora.items() if g is not None and g.abs().max() > 0]
            expect = [n for n in lora if "lora_B" in n or step > 0]
            assert sorted(moving) == sorted(expect), f"step {step}: adapters without gradient: {set(expect) - set(moving)}"
            opt.step()
        for name, value in model.get_base_model().state_dict().items():
            key = name.replace(".base_layer", "")
            if "lora_" not in name:
                assert torch.equal(value, frozen[key]), f"frozen base weight {key} changed"
        out = model(ids)
        merged = copy.deepcopy(model).merge_and_unload()
        assert all(type(m) is not LoraLinear for m in merged.modules())
        assert_close(out, merged(ids), name="adapted vs merged logits", rel=1e-4)


def _lora_out_proj(mixer: nn.Module) -> None:
    """peft's LoRA layer on out_proj, put there by hand (peft's get_peft_model refuses out_proj for Mamba)."""
    lora = LoraLinear(mixer.out_proj, adapter_name="default", config=peft.LoraConfig(r=4, lora_alpha=8), r=4,
                      lora_alpha=8)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.1)  # a non-zero adapter: the output must change
    mixer.out_proj = lora.to(DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_out_proj_adapter_is_not_skipped(layer, backend):
    model = _model(layer)
    ids = torch.randint(0, 64, (2, 24), device=DEVICE)
    for block in model.backbone.layers:
        _lora_out_proj(block.mixer)
    with use_backend(backend):
        adapted = model(ids)
        merged = copy.deepcopy(model)
        for block in merged.backbone.layers:
            block.mixer.out_proj.merge()  # the adapter folded into the base weight, which goes back in place
            block.mixer.out_proj = block.mixer.out_proj.base_layer
        assert_close(adapted, merged(ids), name="adapter on out_proj vs merged", rel=1e-4)
        lora_free = copy.deepcopy(model)
        for block in lora_free.backbone.layers:
            block.mixer.out_proj = block.mixer.out_proj.base_layer
        assert (adapted - lora_free(ids)).abs().max() > 1e-3, "the out_proj adapter changed nothing: skipped"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer,target", [("Mamba1", "x_proj"), ("Mamba1", "dt_proj"), ("Mamba1", "out_proj"),
                                          ("Mamba2", "out_proj"), ("Mamba2", "norm")])
def test_forward_hook_is_honoured(layer, target, backend):
    """A forward hook that rescales a submodule's output takes effect: the fused op steps aside for it."""
    model = _model(layer)
    ids = torch.randint(0, 64, (2, 24), device=DEVICE)
    with use_backend(backend):
        plain = model(ids)
        handles = [getattr(b.mixer, target).register_forward_hook(lambda m, args, out: out * 1.5)
                   for b in model.backbone.layers]
        hooked = model(ids)
        for h in handles:
            h.remove()
        for b in model.backbone.layers:  # the same effect written into the weights, on the fused path
            with torch.no_grad():
                module = getattr(b.mixer, target)
                module.weight.mul_(1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.mul_(1.5)
        assert_close(hooked, model(ids), name="hooked vs rescaled weights", rel=1e-4)
    assert (hooked - plain).abs().max() > 1e-3


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_conv1d_adapter_is_refused(layer):
    model = _model(layer)
    model.backbone.layers[0].mixer.conv1d.register_forward_hook(lambda m, args, out: out)
    with pytest.raises(ValueError, match="conv1d must be a plain nn.Conv1d"):
        model(torch.randint(0, 64, (2, 8), device=DEVICE))
