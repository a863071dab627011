"""The inference cache has one owner and one writer: the model allocates it, `advance(n)` alone moves its
position, and generation / checkpoints read what they need from the config, never from a built mixer."""

import ast
import inspect
import pydoc
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mambakit
from mambakit import MambaConfig, MambaLM
from mambakit.checkpoints import huggingface
from mambakit.generation import CUDAGraphDecoder, allocate_cache, decode_one_token, generate, prefill, stream
from mambakit.modules import InferenceCache, Mamba1, Mamba2

SRC = Path(mambakit.__file__).parent

LAYERS = [
    pytest.param({"layer": "Mamba1", "d_state": 8}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}, id="mamba2"),
]


def _model(ssm_cfg) -> MambaLM:
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=37, ssm_cfg=ssm_cfg)).eval()


# ---- one writer --------------------------------------------------------------------------------------------


def test_seqlen_offset_is_read_only_and_moves_only_through_advance():
    cache = _model({"layer": "Mamba1", "d_state": 8}).allocate_cache(batch_size=2)
    assert cache.seqlen_offset == 0
    with pytest.raises(AttributeError):
        cache.seqlen_offset = 5
    with pytest.raises(AttributeError):  # __slots__: no stray attribute can shadow the position either
        cache.position = 5
    assert cache.advance(3) is cache
    assert cache.advance(0).seqlen_offset == 3
    with pytest.raises(ValueError, match="advance: n must be >= 0, got -1"):
        cache.advance(-1)
    with pytest.raises(TypeError):  # never a tensor: that would be a host sync per decode step
        cache.advance(1.5)
    assert cache.reset().seqlen_offset == 0
    with pytest.raises(ValueError, match="seqlen_offset must be an int >= 0, got -2"):
        InferenceCache(cache.layers, seqlen_offset=-2)
    assert InferenceCache(cache.layers, seqlen_offset=7).index_select(torch.tensor([1])).seqlen_offset == 7


def _writes_to_position(tree: ast.AST) -> list[int]:
    """Lines that assign (=, +=, ...) an attribute named seqlen_offset or _seqlen_offset."""
    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        lines += [node.lineno for t in targets
                  if isinstance(t, ast.Attribute) and t.attr in ("seqlen_offset", "_seqlen_offset")]
    return lines


def test_no_module_but_the_cache_itself_writes_the_position():
    writers = {str(path.relative_to(SRC)): lines for path in sorted(SRC.rglob("*.py"))
               if (lines := _writes_to_position(ast.parse(path.read_text())))}
    assert list(writers) == ["modules/state.py"], writers


@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_each_path_advances_the_cache_exactly_once_per_token(ssm_cfg, monkeypatch):
    """Forward, prefill (plain, ragged, ragged continuation, in pieces), decode and the eager CUDA-graph decoder
    all move the position through advance(), by the number of tokens fed (the longest row of a ragged batch)."""
    calls = []
    real = InferenceCache.advance
    monkeypatch.setattr(InferenceCache, "advance", lambda self, n: (calls.append(n), real(self, n))[1])
    model = _model(ssm_cfg)
    cache = model.allocate_cache(batch_size=2)
    model(torch.randint(0, 37, (2, 5)), cache=cache)
    assert cache.seqlen_offset == 5
    cache, _ = prefill(model, [[1, 2, 3], [4, 5]], tokens_per_call=2)  # ragged, 2 model calls
    assert cache.seqlen_offset == 3
    cache, logits = prefill(model, [[6], [7, 8, 9, 10]], cache)  # ragged continuation: copies, then one advance
    assert cache.seqlen_offset == 7
    decode_one_token(model, logits.argmax(-1), cache)
    assert cache.seqlen_offset == 8
    decoder = CUDAGraphDecoder(model, batch_size=2)  # eager on CPU: the model's forward advances it
    prefill(model, [[1, 2], [3, 4]], cache=decoder.cache.reset())
    decoder(torch.tensor([1, 2]))
    assert decoder.cache.seqlen_offset == 3
    # forward 5; prefill calls of 2 + 1 tokens; continuation: the copies of the 1-token and the 4-token rows, then the
    # cache itself by the longest row; decode 1; the decoder's prefill 2 and its step 1
    assert calls == [5, 2, 1, 1, 4, 4, 1, 2, 1]


# ---- one owner ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ssm_cfg", LAYERS)
def test_the_model_allocates_its_own_cache(ssm_cfg):
    model = _model(ssm_cfg)
    mine = model.allocate_cache(batch_size=3, dtype=torch.bfloat16, device=torch.device("cpu"))
    via_generation = allocate_cache(model, 3, dtype=torch.bfloat16)
    assert isinstance(mine, InferenceCache) and mine.batch_size == 3 and len(mine.layers) == 2
    assert [s.conv_state.shape for s in mine.layers] == [s.conv_state.shape for s in via_generation.layers]
    assert [s.ssm_state.dtype for s in mine.layers] == [torch.float32] * 2
    assert mine.layers[0].conv_state.dtype == torch.bfloat16  # conv windows in dtype, SSM states float32
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        model.allocate_cache(batch_size=0)


def test_allocate_state_takes_state_dtype_and_its_old_name_with_a_warning():
    mixer = Mamba2(32, d_state=16, headdim=16)
    assert mixer.allocate_state(2, state_dtype=torch.bfloat16).ssm_state.dtype == torch.bfloat16
    with pytest.warns(DeprecationWarning, match="'ssm_dtype' is renamed 'state_dtype'"):
        state = mixer.allocate_state(2, ssm_dtype=torch.bfloat16)
    assert state.ssm_state.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="got both state_dtype"):
        Mamba1(32).allocate_state(2, state_dtype=torch.float32, ssm_dtype=torch.float64)


# ---- what the config says ----------------------------------------------------------------------------------


SIZED = [
    pytest.param({"layer": "Mamba1", "d_state": 8, "expand": 1.5}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2}, id="mamba2-groups"),
    pytest.param({"layer": "Mamba2", "d_state": 8, "headdim": 8, "d_ssm": 32, "norm_ngroups": 1, "norm_eps": 1e-6},
                 id="mamba2-mlp-half"),
    pytest.param({"layer": "S4D", "d_state": 4}, id="s4d"),
]


@pytest.mark.parametrize("ssm_cfg", SIZED)
def test_config_mixer_sizes_are_the_built_mixers_sizes(ssm_cfg):
    config = MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg=ssm_cfg)
    mixer = MambaLM(config).backbone.layers[0].mixer
    sizes = config.mixer_sizes
    for name, value in sizes.items():
        if name == "norm_groups":
            assert mixer.d_ssm // mixer.norm.group_size == value
        elif name == "norm_eps":
            assert mixer.norm.eps == value
        else:
            assert getattr(mixer, name) == value, name


@pytest.mark.parametrize("ssm_cfg, message", [
    pytest.param({"headdim": 48}, "d_ssm=64 must be a multiple of headdim=48", id="headdim"),
    pytest.param({"headdim": 16, "ngroups": 3}, "ngroups=3 must divide nheads=4", id="ngroups"),
    pytest.param({"headdim": 16, "norm_ngroups": 5}, "norm_ngroups=5 must be a positive int dividing d_ssm=64",
                 id="norm-groups"),
])
def test_config_mixer_sizes_reject_what_the_mixer_rejects(ssm_cfg, message):
    """One formula for the config and the module: the config's sizes fail where building the mixer fails."""
    config = MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", "d_state": 8, **ssm_cfg})
    with pytest.raises(ValueError, match=re.escape(message)):
        config.mixer_sizes
    with pytest.raises(ValueError, match=re.escape(message)):
        MambaLM(config)


@pytest.mark.parametrize("ssm_cfg", [
    pytest.param({"layer": "Mamba1", "d_state": 8}, id="mamba1"),
    pytest.param({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2}, id="mamba2"),
])
def test_hf_config_is_written_from_the_config_alone(ssm_cfg):
    """Replacing every mixer by a module with no attributes changes nothing in the written config.json."""
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=37, ssm_cfg=ssm_cfg))
    before = huggingface._hf_config(model, eos_id=0)
    for block in model.backbone.layers:
        block.mixer = nn.Identity()
    assert huggingface._hf_config(model, eos_id=0) == before
    assert before["num_hidden_layers"] == 2 and before["state_size"] == ssm_cfg["d_state"]


@pytest.mark.parametrize("package", ["generation", "checkpoints"])
def test_generation_and_checkpoints_never_read_mixer_attributes(package):
    reads = [f"{path.relative_to(SRC)}:{node.lineno}" for path in sorted((SRC / package).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "mixer"]
    assert reads == []


@pytest.mark.parametrize("spelling, canonical", [
    pytest.param("mamba2", "Mamba2", id="lower"),
    pytest.param("Mamba-1", "Mamba1", id="dash"),
    pytest.param("s4d", "S4D", id="s4d"),
    pytest.param("mamba1_ungated", "Mamba1Ungated", id="underscore"),
])
def test_config_stores_one_spelling_of_the_mixer_name(spelling, canonical):
    config = MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg={"layer": spelling})
    assert config.layer == canonical and config.ssm_cfg["layer"] == canonical
    assert MambaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"ssm_cfg\['layer'\] must be one of .*got 'Mamba3'"):
        MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba3"})


@pytest.mark.parametrize("function, name, old_name", [
    pytest.param(prefill, "tokens_per_call", "chunk_size", id="prefill"),
    pytest.param(generate, "prefill_tokens_per_call", "prefill_chunk_size", id="generate"),
    pytest.param(stream, "prefill_tokens_per_call", "prefill_chunk_size", id="stream"),
])
def test_help_shows_the_real_tokens_per_call_default_not_a_sentinel(function, name, old_name):
    params = inspect.signature(function).parameters
    assert params[name].default == 2048
    text = pydoc.render_doc(function, renderer=pydoc.plaintext)
    assert re.search(rf"\b{name}: '?int \| None'? = 2048", text), text
    assert f"{old_name}=<deprecated>" in text and "object at 0x" not in text, text


def test_prefill_and_generate_take_the_former_chunk_size_names_with_a_warning():
    model = _model({"layer": "Mamba1", "d_state": 8})
    want_cache, want = prefill(model, [[1, 2, 3, 4, 5]], tokens_per_call=2)
    with pytest.warns(DeprecationWarning, match="'chunk_size' is renamed 'tokens_per_call'"):
        cache, got = prefill(model, [[1, 2, 3, 4, 5]], chunk_size=2)
    assert torch.equal(got, want) and cache.seqlen_offset == want_cache.seqlen_offset == 5
    with pytest.warns(DeprecationWarning, match="'prefill_chunk_size' is renamed 'prefill_tokens_per_call'"):
        old = generate(model, [[1, 2, 3]], 4, prefill_chunk_size=2)
    assert old == generate(model, [[1, 2, 3]], 4, prefill_tokens_per_call=2)
    with pytest.raises(ValueError, match="got both tokens_per_call=3"):
        prefill(model, [[1, 2]], tokens_per_call=3, chunk_size=2)
    with pytest.raises(ValueError, match="got both tokens_per_call=None"):
        prefill(model, [[1, 2]], tokens_per_call=None, chunk_size=2)
    with pytest.warns(DeprecationWarning, match="'chunk_size' is renamed"):
        whole_cache, whole = prefill(model, [[1, 2, 3, 4, 5]], chunk_size=None)  # None: the whole prompt in one call
    assert torch.allclose(whole, want, atol=1e-5) and whole_cache.seqlen_offset == 5
