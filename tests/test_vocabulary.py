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
