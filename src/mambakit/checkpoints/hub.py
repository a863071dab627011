"""Checkpoints named by a Hugging Face Hub id ("state-spaces/mamba-130m-hf"), through huggingface_hub's cache.

`resolve_checkpoint(name, revision)` returns an existing local directory as it is. Any other name that reads
as a repo id ("org/name" or "name") goes through `huggingface_hub.snapshot_download`, which keeps its files in
the user's cache (HF_HOME / HF_HUB_CACHE, `models--org--name/snapshots/<commit>/`) and, with HF_HUB_OFFLINE=1,
only looks there. Only the files a checkpoint needs are fetched: the configs, the tokenizer's files and the
safetensors weights, or the PyTorch pickles when a repository has no safetensors (mamba_ssm's
`state-spaces/mamba-*`), so a repository holding both is not downloaded twice over.

huggingface_hub is the optional `hub` extra; without it, a name that is not a directory is a one-line
CheckpointError saying how to install it. Every failure (offline and not cached, no such repository or
revision, no network) is a one-line CheckpointError naming the id, the revision and the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError
from .io import CONFIG_NAME, GENERATION_CONFIG, SAFETENSORS_NAME, TORCH_NAME

__all__ = ["HUB_INSTALL", "META_PATTERNS", "SAFETENSORS_PATTERNS", "TORCH_PATTERNS", "looks_like_hub_id",
           "resolve_checkpoint", "push_to_hub"]

HUB_INSTALL = "pip install 'mambakit[hub]'"
# config + tokenizer files (every name transformers' tokenizers and mambakit's loaders read)
META_PATTERNS = [CONFIG_NAME, GENERATION_CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                 "chat_template.json"]
SAFETENSORS_PATTERNS = [SAFETENSORS_NAME, "model-*-of-*.safetensors", SAFETENSORS_NAME + ".index.json"]
TORCH_PATTERNS = [TORCH_NAME, "pytorch_model-*-of-*.bin", TORCH_NAME + ".index.json"]

# "name" or "org/name": what the Hub accepts (huggingface_hub validates the rest: no "--", no "..")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id rather than a path (no leading ./ or /, at most one slash)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith((".git", "."))


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _has_weights(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (SAFETENSORS_NAME, SAFETENSORS_PATTERNS[2], TORCH_NAME,
                                                           TORCH_PATTERNS[2]))


def resolve_checkpoint(name_or_path, revision: str | None = None) -> Path:
    """The local directory of checkpoint `name_or_path`: the directory itself, or a Hub id's cached snapshot.

    Args:
        name_or_path: a local directory, or a Hugging Face Hub model id ("org/name").
        revision: a branch, tag or commit hash of the Hub repository (default "main"); not for directories.
    Returns:
        the directory holding config.json, the weights and the tokenizer files.

    Example:
        >>> resolve_checkpoint("state-spaces/mamba-130m-hf")      # downloads once, then reads the cache
        PosixPath('/home/me/.cache/huggingface/hub/models--state-spaces--mamba-130m-hf/snapshots/...')
        >>> resolve_checkpoint("runs/shakespeare")                 # a local directory: returned as it is
        PosixPath('runs/shakespeare')
    """
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub ids, but {str(name_or_path)!r} is a "
                                  "local directory")
        return path
    if path.is_file():
        raise CheckpointError(f"{str(name_or_path)!r} is a file, not a directory: give the checkpoint's directory "
                              "(config.json, weights, tokenizer files) or a Hugging Face Hub id")
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise CheckpointError(f"{name!r} is not a local directory (nor a Hugging Face Hub id such as "
                              "'state-spaces/mamba-130m-hf')")
    hub = _hub()
    if hub is None:
        raise CheckpointError(f"{name!r} is not a local directory; to load it as a Hugging Face Hub id, "
                              f"{HUB_INSTALL}")
    snapshot = Path(_snapshot(hub, name, revision, META_PATTERNS + SAFETENSORS_PATTERNS))
    if not _has_weights(snapshot):  # no safetensors in the repository: its PyTorch pickles, then
        snapshot = Path(_snapshot(hub, name, revision, META_PATTERNS + TORCH_PATTERNS))
    return snapshot


def _snapshot(hub, repo_id: str, revision: str | None, patterns: list[str]) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from .. import __version__

    offline = bool(constants.HF_HUB_OFFLINE)  # read at call time: tests and users may set it after import
    where = f"{repo_id!r} (revision {revision or 'main'!r}, Hugging Face cache {constants.HF_HUB_CACHE})"
    try:
        return hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline,
                                     library_name="mambakit", library_version=__version__)
    except LocalEntryNotFoundError as err:
        if offline:
            raise CheckpointError(f"{where} is not a local directory and is not in the cache, and HF_HUB_OFFLINE=1 "
                                  "forbids downloading it: unset HF_HUB_OFFLINE to download it once") from err
        raise CheckpointError(f"{where}: the Hub could not be reached and the model is not in the cache "
                              f"({_one_line(err)})") from err
    except GatedRepoError as err:
        raise CheckpointError(f"{where}: a gated repository: accept its terms on the Hub and log in "
                              "(`hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"{where} is neither a local directory nor a model on the Hugging Face Hub "
                              "(for a private one, log in with `hf auth login`)") from err
    except RevisionNotFoundError as err:
        raise CheckpointError(f"{where}: no such revision in that repository") from err
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is not a local directory nor a valid Hub id ({_one_line(err)})") from err
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"{where}: download failed ({type(err).__name__}: {_one_line(err)})") from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def push_to_hub(directory, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload a mambakit checkpoint", revision: str | None = None) -> str:
    """Upload the checkpoint directory `directory` to the Hub repository `repo_id` (created when missing).

    Returns the URL of the commit. Needs the `hub` extra and a token (`hf auth login` or `token=`).

    Example:
        >>> model.save_pretrained("out/my-mamba", format="hf", tokenizer=tok, push_to_hub=True, repo_id="me/my-mamba")
    """
    hub = _hub()
    if hub is None:
        raise CheckpointError(f"push_to_hub needs huggingface_hub: {HUB_INSTALL}")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message,
                             revision=revision, repo_type="model")
    return str(getattr(info, "commit_url", info))
