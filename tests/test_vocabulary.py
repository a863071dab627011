"""One spelling of each mixer name across the model config, the training config, the CLI and checkpoints
("Mamba1", "Mamba2", as mamba_ssm's config.json writes them); any other case or '-' / '_' is accepted on input."""

import pytest
import yaml

from mambakit import MambaConfig
from mambakit.cli.__main__ import main
from mambakit.models.mixers import canonical_mixer_name
from mambakit.training.config import TrainConfig, model_config

SPELLINGS = [
    pytest.param("mamba1", "Mamba1", id="lower-1"),
    pytest.param("MAMBA-2", "Mamba2", id="upper-dash-2"),
    pytest.param("Mamba2", "Mamba2", id="canonical-2"),
]


@pytest.mark.parametrize("spelling, canonical", SPELLINGS)
def test_train_config_stores_the_one_spelling_and_builds_that_mixer(spelling, canonical):
    cfg = TrainConfig(layer=spelling, d_model=32, n_layer=1, d_state=8, headdim=16)
    assert cfg.layer == canonical
    assert model_config(cfg, vocab_size=16).layer == canonical == canonical_mixer_name(spelling)


@pytest.mark.parametrize("spelling, canonical", SPELLINGS)
def test_cli_layer_flag_accepts_any_spelling_and_prints_the_one(spelling, canonical, capsys):
    assert main(["train", "--recipe", "tiny", "--layer", spelling, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["layer"] == canonical


def test_unknown_names_are_refused_everywhere():
    with pytest.raises(ValueError, match="layer must be one of"):
        TrainConfig(layer="mamba3")
    with pytest.raises(ValueError, match="mixer name must be one of"):
        canonical_mixer_name("mamba3")
    with pytest.raises(ValueError, match=r"ssm_cfg\['layer'\] must be one of"):
        MambaConfig(d_model=32, n_layer=1, vocab_size=16, ssm_cfg={"layer": "mamba3"})


@pytest.mark.parametrize("run_layer", ["Mamba1", "Mamba2"])
def test_ssm_cfg_naming_another_mixer_takes_the_run_sizes_it_has(run_layer):
    """`mambakit train --model.ssm-cfg '{layer: s4d}'`: the S4D mixer gets the run's d_state and expand, and none of
    Mamba-2's headdim / chunk_size (which once reached its constructor as a TypeError); naming Mamba2 from a Mamba1
    run brings them."""
    cfg = TrainConfig(layer=run_layer, d_model=32, n_layer=1, d_state=8, expand=2, headdim=16, chunk_size=32,
                      model={"ssm_cfg": {"layer": "s4d", "A_init": "S4D-Real"}})
    config = model_config(cfg, vocab_size=16)
    assert config.layer == "S4D"
    assert config.mixer_kwargs == {"d_state": 8, "expand": 2, "A_init": "S4D-Real"}
    cfg = TrainConfig(layer="Mamba1", d_model=32, n_layer=1, d_state=8, headdim=16, chunk_size=32,
                      model={"ssm_cfg": {"layer": "Mamba2"}})
    assert model_config(cfg, vocab_size=16).mixer_kwargs == {"d_state": 8, "expand": 2, "headdim": 16, "chunk_size": 32}
