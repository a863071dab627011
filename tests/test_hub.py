"""Checkpoints by Hugging Face Hub id, with no network: a huggingface_hub cache laid out in a temporary directory.

The cache is written as huggingface_hub writes it (`models--org--name/{blobs,refs,snapshots}`, snapshot files
symlinked to content-addressed blobs), holding small checkpoints saved by transformers itself. huggingface_hub
reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported, so the in-process tests set its constants and the
subprocess test sets the environment.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM, PreTrainedTokenizerFast

from mambakit import MambaLM
from mambakit.checkpoints import CheckpointError, convert_checkpoint, load_checkpoint_tokenizer, load_pretrained
from mambakit.cli.__main__ import main

from .helpers import assert_close

REPO = "org/tiny-mamba"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["To be, or not to be: that is the question."] * 50, trainer)
    return tok


def _transformers_checkpoint(directory: Path, seed: int) -> None:
    """A tiny MambaForCausalLM with random weights and its tokenizer, both saved by transformers."""
    torch.manual_seed(seed)
    hf = MambaForCausalLM(HFMambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="<|endoftext|>").save_pretrained(directory)


def _add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> None:
    """Put `source`'s files into `cache` as huggingface_hub stores a downloaded snapshot of `repo_id` at `commit`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache holding REPO at two commits: A (main) and B (tag v1), with other weights.

    Returns (cache, local directory of A, local directory of B). Any network connection fails the test.
    """
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    cache = tmp_path / "hf-cache"
    local_a, local_b = tmp_path / "local-a", tmp_path / "local-b"
    _transformers_checkpoint(local_a, seed=0)
    _transformers_checkpoint(local_b, seed=1)
    _add_snapshot(cache, REPO, COMMIT_A, local_a, refs=("main",))
    _add_snapshot(cache, REPO, COMMIT_B, local_b, refs=("v1",))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)  # "org/tiny-mamba" is no local directory here
    return cache, local_a, local_b


def _assert_same_model(got: MambaLM, expected: MambaLM) -> None:
    assert got.config == expected.config
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        assert_close(got(ids), expected(ids), name="logits", rel=0)


@pytest.mark.slow
@pytest.mark.parametrize("revision, local", [
    pytest.param(None, "a", id="main"),
    pytest.param(COMMIT_A, "a", id="commit-A"),
    pytest.param(COMMIT_B, "b", id="commit-B"),
    pytest.param("v1", "b", id="tag-v1"),
])
def test_from_pretrained_hub_id_matches_the_local_directory(hub_cache, revision, local):
    cache, local_a, local_b = hub_cache
    got = MambaLM.from_pretrained(REPO, revision=revision)
    _assert_same_model(got, MambaLM.from_pretrained(local_a if local == "a" else local_b))
    tok = load_checkpoint_tokenizer(REPO, revision=revision)
    assert tok.encode("To be") == load_checkpoint_tokenizer(local_a).encode("To be") and tok.eos_id == 0
    assert str(tok.path).startswith(str(cache / "models--org--tiny-mamba" / "snapshots"))


def test_two_revisions_differ(hub_cache):
    a = load_pretrained(REPO)
    b = load_pretrained(REPO, revision="v1")
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        assert not torch.allclose(a(ids), b(ids))


def test_generate_cli_with_a_hub_id_matches_the_local_directory(hub_cache, capsys):
    _, local_a, local_b = hub_cache
    args = ["--prompt", "To be", "--max-new-tokens", "8", "--temperature", "0"]
    outputs = {}
    for name, model in (("hub", [REPO]), ("local", [str(local_a)]), ("hub-v1", [REPO, "--revision", "v1"]),
                        ("local-b", [str(local_b)])):
        assert main(["generate", "--model", *model, *args]) == 0
        outputs[name] = capsys.readouterr().out
    assert outputs["hub"] == outputs["local"] and outputs["hub"].startswith("To be")
    assert outputs["hub-v1"] == outputs["local-b"]


def test_convert_reads_a_hub_id(hub_cache, tmp_path):
    _, local_a, _ = hub_cache
    convert_checkpoint(REPO, tmp_path / "converted", to="mambakit")
    _assert_same_model(MambaLM.from_pretrained(tmp_path / "converted"), MambaLM.from_pretrained(local_a))
    assert main(["convert", REPO, str(tmp_path / "converted-v1"), "--to", "hf", "--revision", "v1"]) == 0
    assert (tmp_path / "converted-v1" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name, revision, message", [
    pytest.param("org/missing", None, r"'org/missing' \(revision 'main', Hugging Face cache {cache}\) is not a local "
                 r"directory and is not in the cache, and HF_HUB_OFFLINE=1 forbids downloading it", id="missing-id"),
    pytest.param(REPO, "v2", r"'org/tiny-mamba' \(revision 'v2', Hugging Face cache {cache}\) is not a local",
                 id="missing-revision"),
    pytest.param("./nowhere", None, r"'./nowhere' is not a local directory \(nor a Hugging Face Hub id",
                 id="a-path-not-an-id"),
])
def test_missing_offline_is_one_line_naming_the_id_and_the_cache(hub_cache, name, revision, message):
    cache = hub_cache[0]
    with pytest.raises(CheckpointError, match=message.replace("{cache}", str(cache))) as err:
        load_pretrained(name, revision=revision)
    assert "\n" not in str(err.value)


def test_revision_of_a_local_directory_is_refused(hub_cache):
    with pytest.raises(CheckpointError, match=r"revision='v1' applies to Hub ids, but .* is a local directory"):
        load_pretrained(hub_cache[1], revision="v1")


def test_without_huggingface_hub_the_error_says_how_to_install(hub_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    with pytest.raises(CheckpointError, match=r"'org/tiny-mamba' is not a local directory; to load it as a Hugging "
                                              r"Face Hub id, pip install 'mambakit\[hub\]'"):
        MambaLM.from_pretrained(REPO)


@pytest.mark.slow  # two fresh interpreters importing torch and huggingface_hub
def test_cli_in_a_fresh_process_reads_hf_hub_offline_and_the_cache_from_the_environment(hub_cache, capsys):
    cache, local_a, _ = hub_cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    args = ["generate", "--prompt", "To", "--max-new-tokens", "4", "--temperature", "0", "--model"]
    cmd = [sys.executable, "-m", "mambakit.cli", *args]
    hub = subprocess.run(cmd + [REPO], capture_output=True, text=True, env=env, timeout=300)
    assert hub.returncode == 0, hub.stderr
    assert main(args + [str(local_a)]) == 0
    assert hub.stdout == capsys.readouterr().out
    missing = subprocess.run(cmd + ["org/missing"], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "'org/missing'" in missing.stderr and str(cache) in missing.stderr


def test_save_pretrained_pushes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["exist_ok"], kwargs["private"]))

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _transformers_checkpoint(tmp_path / "src", seed=0)
    model = MambaLM.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", format="hf", tokenizer=load_checkpoint_tokenizer(tmp_path / "src"),
                          push_to_hub=True, repo_id="me/pushed", private=True, token="t0k")
    assert calls[0] == ("token", "t0k") and calls[1] == ("create_repo", "me/pushed", True, True)
    assert calls[2][:2] == ("upload_folder", "me/pushed")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(calls[2][2])
    with pytest.raises(CheckpointError, match="push_to_hub=True needs repo_id"):
        model.save_pretrained(tmp_path / "out2", push_to_hub=True)
