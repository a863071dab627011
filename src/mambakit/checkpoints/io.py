"""Checkpoint directories in mambakit's own format: config.json + model.safetensors.

The state-dict keys are mamba_ssm's (backbone.embedding.weight, backbone.layers.i.mixer.*, ...),
so the same loader also reads a reference `pytorch_model.bin`. A tied LM head is stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models import MambaConfig, MambaLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


def checkpoint_dir(path) -> Path:
    """The local directory `path`; anything else (e.g. a hub id) is a clear error: nothing is downloaded."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{str(path)!r} is not a local directory; mambakit never downloads from a hub: "
                         "download the checkpoint yourself and pass its directory")
    return p


def save_pretrained(model: MambaLM, save_directory, format: str = "mambakit") -> Path:
    """Write config.json and model.safetensors into save_directory (created if missing)."""
    if format != "mambakit":
        raise ValueError(f"save_pretrained: format must be 'mambakit', got {format!r}")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding: safetensors stores it once
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "library": "mambakit"})
    return out


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors or pytorch_model.bin, on CPU."""
    if (directory / WEIGHTS_NAME).exists():
        return load_file(str(directory / WEIGHTS_NAME))
    if (directory / TORCH_WEIGHTS_NAME).exists():
        return torch.load(directory / TORCH_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise ValueError(f"{directory}: no {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAME} found")


def load_state_dict_strict(model: MambaLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, naming every missing or unexpected key and every shape mismatch."""
    expected = model.state_dict()
    optional = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: state dict does not match the config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the config needs "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)


def load_pretrained(path, dtype: torch.dtype | None = None, device=None) -> MambaLM:
    """Load a local checkpoint directory (config.json + model.safetensors or pytorch_model.bin)."""
    directory = checkpoint_dir(path)
    if not (directory / CONFIG_NAME).exists():
        raise ValueError(f"{directory}: no {CONFIG_NAME} found")
    config = MambaConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    model = MambaLM(config)
    load_state_dict_strict(model, read_state_dict(directory), str(directory))
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
