"""Load, save and convert checkpoint directories in the three formats.

    "mambakit"   config.json (MambaConfig) + model.safetensors                        (the default)
    "mamba_ssm"  config.json (mamba_ssm's fields) + pytorch_model.bin                 (state-spaces/mamba-*)
    "hf"         transformers config.json + model.safetensors (or shards + index)     (state-spaces/*-hf)

Reading tells the formats apart by config.json (a transformers config names its model_type) and accepts
any of the weight layouts listed in io.py. Checkpoint names go through the format's declarative key map
(native.KEY_MAP, huggingface.KEY_MAP), and the weights are checked against the config before any
tensor is read: every missing and unexpected key is listed by its name in the file, every shape
mismatch names the key and both shapes. A name that is not a local directory is a Hugging Face Hub id,
resolved through huggingface_hub's cache (hub.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import MambaConfig, MambaLM, TransformerConfig, build_model
from ..models.transformer import is_transformer_config
from . import huggingface, native
from .errors import CheckpointError
from .hub import push_to_hub as _hub_push
from .hub import resolve_checkpoint
from .io import CONFIG_NAME, WeightFiles, floating_dtype, read_json, staged_directory
from .keymap import KeyMap
from .tokenizer_files import copy_tokenizer, has_tokenizer, load_checkpoint_tokenizer, save_tokenizer

__all__ = ["FORMATS", "load_pretrained", "load_config", "save_pretrained", "convert_checkpoint", "load_weights"]

FORMATS = ("mambakit", "mamba_ssm", "hf")


def load_weights(model: MambaLM, weights: WeightFiles, key_map: KeyMap) -> None:
    """Copy the checkpoint's tensors into `model` (cast to each parameter's dtype and device).

    Raises CheckpointError, before copying anything, naming every missing and unexpected key (in the
    checkpoint's own names) and every shape mismatch; a tied head stored in the file must equal the embedding.
    """
    source = weights.description
    expected = model.state_dict()
    optional = {"lm_head.weight"} if model.config.tie_embeddings else set()
    ours_of: dict[str, str] = {}
    unexpected = []
    for name in weights.infos:
        ours = key_map.to_ours(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
        elif ours in ours_of.values():
            other = next(k for k, v in ours_of.items() if v == ours)
            raise CheckpointError(f"{source}: {other!r} and {name!r} are both the weight {ours!r}; keep one")
        else:
            ours_of[name] = ours
    covered = set(ours_of.values())
    missing = [key_map.to_theirs(k) or k for k in expected if k not in covered and k not in optional]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not match config.json: missing keys {missing}, "
                              f"unexpected keys {sorted(unexpected)}")
    bad = []
    for name, ours in ours_of.items():
        shape, dtype = weights.infos[name]
        need = tuple(expected[ours].shape)
        if shape != need:
            bad.append(f"{name} has shape {shape}, config.json needs {need}")
        elif dtype is None or not (dtype.is_floating_point or dtype.is_complex):
            bad.append(f"{name} has dtype {dtype}, expected a floating-point tensor")
    if bad:
        raise CheckpointError(f"{source}: " + "; ".join(bad))
    head = next((n for n, o in ours_of.items() if o == "lm_head.weight"), None) if optional else None
    with torch.no_grad():
        for name, ours in ours_of.items():
            if name != head:
                expected[ours].copy_(weights.load(name))
        if head is not None:
            embedding = expected["backbone.embedding.weight"]
            if not torch.equal(weights.load(head).to(device=embedding.device, dtype=embedding.dtype), embedding):
                raise CheckpointError(f"{source}: config.json ties the LM head to the embedding, but {head} holds "
                                      "different values: set tie_embeddings (tie_word_embeddings) to false")


def load_pretrained(path, dtype: torch.dtype | None = None, device=None, revision: str | None = None) -> MambaLM:
    """Load a checkpoint in any of FORMATS, in eval mode, from a local directory or a Hugging Face Hub id.

    Args:
        path: a local directory, or a Hub id ("state-spaces/mamba-130m-hf") resolved through huggingface_hub's
            cache (the `hub` extra; HF_HUB_OFFLINE=1 reads the cache only). See checkpoints.hub.
        dtype: parameter dtype; None keeps the checkpoint's (its most common floating dtype). mambakit's
            modules keep some parameters in float32 whatever the dtype (Mamba-1's A_log and D), as mamba_ssm.
        device: where to build the model (default CPU).
        revision: the Hub repository's branch, tag or commit hash (Hub ids only; default "main").

    Example:
        >>> model = load_pretrained("state-spaces/mamba-130m-hf", dtype=torch.bfloat16, device="cuda")
        >>> model = MambaLM.from_pretrained("runs/shakespeare")      # the same, as a classmethod
    """
    directory = resolve_checkpoint(path, revision)
    config, key_map = _read_config(directory)
    weights = WeightFiles(directory)
    dtype = dtype or floating_dtype(weights.infos.values()) or torch.float32
    try:
        model = build_model(config, device=device, dtype=dtype)
    except ValueError as err:  # e.g. an attn_cfg argument MHA does not take
        raise CheckpointError(f"{directory}: {err}") from err
    load_weights(model, weights, key_map)
    return model.eval()


def load_config(path, revision: str | None = None) -> MambaConfig | TransformerConfig:
    """The model config of a checkpoint in any of FORMATS (a local directory or a Hub id), without its weights.

    Example:
        >>> load_config("runs/shakespeare").d_model
        128
    """
    return _read_config(resolve_checkpoint(path, revision))[0]


def _read_config(directory: Path):
    """(config, key map) of the checkpoint in `directory`: Hugging Face, mambakit Transformer, or mamba_ssm/mambakit."""
    raw = read_json(directory / CONFIG_NAME)
    if huggingface.is_hf_config(raw):
        config = huggingface.config_from_hf(raw, str(directory),
                                            generation=huggingface.read_generation_config(directory))
        key_map = huggingface.KEY_MAP
    elif is_transformer_config(raw):  # mambakit's Transformer baselines (models/transformer.py)
        try:
            config = TransformerConfig.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {err}") from err
        key_map = native.KEY_MAP
    elif "d_model" in raw:
        config = native.config_from_dict(raw, str(directory))
        key_map = native.KEY_MAP
    else:
        raise CheckpointError(f"{directory / CONFIG_NAME}: neither a mamba_ssm/mambakit config (d_model, n_layer, "
                              "ssm_cfg, ...) nor a Hugging Face one (model_type 'mamba' or 'mamba2')")
    return config, key_map


def _parse_format(format: str) -> str:
    if format not in FORMATS:
        raise CheckpointError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def save_pretrained(model: MambaLM, save_directory, format: str = "mambakit", tokenizer=None,
                    max_shard_size: int | None = None, push_to_hub: bool = False, repo_id: str | None = None,
                    private: bool | None = None, token: str | None = None) -> Path:
    """Write `model` (and its tokenizer) as a checkpoint directory that `load_pretrained` reads back exactly.

    Args:
        format: "mambakit", "mamba_ssm" or "hf" (see the module docstring). A config the format cannot
            express (e.g. a gated MLP for "hf") is refused, naming what is missing, before anything is written.
        tokenizer: a mambakit.data tokenizer saved beside the weights; its end-of-document id becomes the
            "hf" config's eos/bos/pad token id.
        max_shard_size: bytes per safetensors shard ("mambakit", "hf"); None writes one file.
        push_to_hub: then upload the directory to the Hub repository `repo_id` (created if missing; `private`,
            `token` as huggingface_hub takes them). Needs the `hub` extra.
    Returns:
        the directory. Weight files of an earlier save in it are replaced; other files are left alone.

    Example:
        >>> save_pretrained(model, "out/mamba-hf", format="hf", tokenizer=tok)
        >>> AutoModelForCausalLM.from_pretrained("out/mamba-hf")     # transformers reads it as it is
    """
    format = _parse_format(format)
    if push_to_hub and not repo_id:
        raise CheckpointError("push_to_hub=True needs repo_id (e.g. 'me/my-mamba')")

    def add_tokenizer(directory: Path) -> None:
        if tokenizer is not None:
            save_tokenizer(tokenizer, directory, format)

    out = _save_model(model, save_directory, format, None if tokenizer is None else tokenizer.eos_id, max_shard_size,
                      add_tokenizer)
    if push_to_hub:
        _hub_push(out, repo_id, private=private, token=token)
    return out


def _save_model(model: MambaLM, save_directory, format: str, eos_id: int | None, max_shard_size: int | None,
                add_files=None) -> Path:
    """Write the checkpoint into a staging directory beside `save_directory`, then publish it (io.staged_directory):
    an earlier checkpoint there stays whole until the new one is complete. add_files(staging_dir) adds the rest."""
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if max_shard_size is not None and (not isinstance(max_shard_size, int) or max_shard_size < 1):
        raise CheckpointError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    if isinstance(model.config, TransformerConfig) and format != "mambakit":
        raise CheckpointError(f"a {model.config.arch} TransformerLM is saved in the mambakit format only (mamba_ssm and "
                              f"transformers' Mamba classes cannot read it), got format={format!r}")
    with staged_directory(out) as stage:
        if format == "hf":
            huggingface.save_hf(model, stage, eos_id=eos_id, max_shard_size=max_shard_size)
        else:
            native.save_native(model, stage, format, max_shard_size=max_shard_size)
        if add_files is not None:
            add_files(stage)
    return out


def convert_checkpoint(src, dst, to: str, dtype: torch.dtype | None = None,
                       max_shard_size: int | None = None, revision: str | None = None) -> Path:
    """Read checkpoint `src` (any format; a directory or a Hub id at `revision`) and write it to `dst` in format
    `to`, tokenizer files included.

    The weights are copied exactly (or cast to `dtype`); transformers' tokenizer files travel as they are.

    Example:
        >>> convert_checkpoint("state-spaces/mamba-130m-hf", "mamba-130m-kit", to="mambakit")
    """
    to = _parse_format(to)
    src_dir = resolve_checkpoint(src, revision)
    dst = Path(dst)
    if dst.exists() and dst.resolve() == src_dir.resolve():
        raise CheckpointError(f"the destination {dst} is the source directory: write the conversion elsewhere")
    tokenizer = load_checkpoint_tokenizer(src_dir) if has_tokenizer(src_dir) else None
    model = load_pretrained(src_dir, dtype=dtype)

    def add_tokenizer(directory: Path) -> None:
        if tokenizer is not None:
            copy_tokenizer(src_dir, directory, to)

    return _save_model(model, dst, to, None if tokenizer is None else tokenizer.eos_id, max_shard_size, add_tokenizer)
