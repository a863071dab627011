"""`cli/loading.py`: generate, serve and eval load a model through one helper, so they answer the same mistakes
with the same one-line errors (exit 2): a device that does not exist, and a tokenizer larger than the model."""

from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.cli.__main__ import main
from mambakit.cli.errors import UsageError
from mambakit.cli.loading import checkpoint_dir, load_model
from mambakit.data import ByteTokenizer


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A model with a 16-token vocabulary saved beside the 256-token byte tokenizer: they do not fit."""
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    config = MambaConfig(d_model=16, n_layer=1, vocab_size=16, pad_vocab_size_multiple=8,
                         ssm_cfg={"layer": "Mamba1", "d_state": 4})
    torch.manual_seed(0)
    MambaLM(config).save_pretrained(directory, tokenizer=ByteTokenizer())
    (directory.parent / "held.txt").write_text("some text to score\n")
    return directory


COMMANDS = [
    pytest.param(["generate", "--prompt", "x"], id="generate"),
    pytest.param(["serve"], id="serve"),
    pytest.param(["eval", "--data", "{data}"], id="eval"),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_vocabulary_mismatch_is_one_line_in_every_command(small_vocab_model, capsys, command):
    argv = [a.replace("{data}", str(small_vocab_model.parent / "held.txt")) for a in command]
    assert main([argv[0], "--model", str(small_vocab_model), "--device", "cpu", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mambakit {argv[0]}: error: the tokenizer's vocabulary (256) is larger than the model's (16)")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_device_is_one_line_in_every_command(small_vocab_model, capsys, command):
    argv = [a.replace("{data}", str(small_vocab_model.parent / "held.txt")) for a in command]
    assert main([argv[0], "--model", str(small_vocab_model), "--device", "tpu", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mambakit {argv[0]}: error: ") and "tpu" in err and err.count("\n") == 1


def test_load_model_picks_the_dtype_and_keeps_the_checkpoints_with_none(tmp_path):
    config = MambaConfig(d_model=16, n_layer=1, vocab_size=264, pad_vocab_size_multiple=8,
                         ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8})
    MambaLM(config).save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    directory = checkpoint_dir(str(tmp_path / "m"))
    assert directory == tmp_path / "m"
    auto = load_model(directory, device="cpu")  # auto: float32 on CPU
    assert auto.device == torch.device("cpu") and auto.lm.lm_head.weight.dtype == torch.float32
    assert auto.tokenizer.vocab_size == 256
    assert load_model(directory, device="cpu", dtype="bfloat16").lm.lm_head.weight.dtype == torch.bfloat16
    assert load_model(directory, device="cpu", dtype=None).lm.lm_head.weight.dtype == torch.float32
    with pytest.raises(UsageError, match="no config.json in"):
        checkpoint_dir(str(tmp_path))
