"""Training checkpoints: a model directory that `mambakit generate` and `MambaLM.from_pretrained` read,
plus the state that `--resume` needs to continue the run exactly.

    out_dir/config.json, model.safetensors   the model (MambaLM.save_pretrained)
    out_dir/tokenizer_config.json (+ tokenizer.json)
    out_dir/train_config.json                the TrainConfig, for people
    out_dir/train_state.pt                   step, optimizer state, data-sampler generator, RNG states, TrainConfig
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import TrainConfig

__all__ = ["TRAIN_STATE", "save_checkpoint", "load_train_state"]

TRAIN_STATE = "train_state.pt"


def save_checkpoint(out_dir: str | Path, *, model, tokenizer, optimizer: torch.optim.Optimizer, sampler_state: dict,
                    step: int, config: TrainConfig, history: dict) -> None:
    """Write everything needed to use the model and to resume training from `step`.

    train_state.pt is written to a temporary name and renamed, so an interrupted save never
    leaves a truncated state next to a newer model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save(out_dir)
    (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "sampler": sampler_state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": config.to_dict(),
        "history": history,
    }
    tmp = out_dir / (TRAIN_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / TRAIN_STATE)


def load_train_state(out_dir: str | Path) -> dict:
    """The dict `save_checkpoint` wrote (tensors on CPU). FileNotFoundError when there is none."""
    path = Path(out_dir) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAIN_STATE} in {out_dir}: nothing to resume")
    return torch.load(path, map_location="cpu", weights_only=True)
