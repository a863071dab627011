"""Fine-tuning: a run that starts from a trained model (`TrainConfig.init_from`), whole or through LoRA adapters.

    init_from       a model directory (a `mambakit train` run, a mamba_ssm or Hugging Face folder) or a Hub id
                    (the `hub` extra); its weights are the starting point, in float32, and its tokenizer is the
                    run's (TrainConfig.tokenizer "init")
    lora_rank > 0   peft LoRA adapters on `lora_targets` (Linear layers; peft refuses out_proj and conv1d for
                    Mamba models): only the adapters train, the base stays as loaded

A LoRA run's checkpoint holds the merged model (base + adapters, a plain model every command loads), the
adapter in peft's layout (adapter_config.json, adapter_model.safetensors: `peft.PeftModel.from_pretrained(base,
run_dir)` reads it) and, in train_state.pt, the base's fingerprint. Resuming rebuilds the base from init_from,
checks the fingerprint (a base changed since the run started is refused) and loads the adapter: the run repeats an
uninterrupted one exactly. A full fine-tune resumes from its own checkpoint and no longer needs init_from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..checkpoints import CheckpointError
from .config import TrainConfig

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_init_model", "init_tokenizer", "weights_fingerprint",
           "add_lora", "adapted_layers", "merged_model", "save_adapter", "load_adapter", "describe_model"]

ADAPTER_CONFIG = "adapter_config.json"  # peft's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def init_directory(cfg: TrainConfig) -> Path:
    """The local directory of cfg.init_from (a Hub id resolved to its snapshot in huggingface_hub's cache)."""
    from ..checkpoints import resolve_checkpoint

    directory = resolve_checkpoint(cfg.init_from)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"init_from {cfg.init_from}: no config.json there, not a model directory")
    return directory


def load_init_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """init_from's model on `device`, float32 parameters, in training mode."""
    from ..models import MambaLM

    model = MambaLM.from_pretrained(init_directory(cfg), dtype=torch.float32, device=device)
    return model.train()


def init_tokenizer(cfg: TrainConfig):
    """The tokenizer saved with init_from (TrainConfig.tokenizer "init")."""
    from ..checkpoints import load_checkpoint_tokenizer

    directory = init_directory(cfg)
    try:
        return load_checkpoint_tokenizer(directory)
    except CheckpointError as err:  # a mamba_ssm folder comes without one
        raise CheckpointError(f"{err}; give the tokenizer the model was trained with (--tokenizer PATH to a "
                              "tokenizer.json, or bytes)") from None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `model`'s state dict: what a LoRA run's base must still
    be when the run resumes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def add_lora(model: torch.nn.Module, cfg: TrainConfig):
    """Put LoRA adapters (rank cfg.lora_rank, alpha cfg.lora_alpha, dropout cfg.lora_dropout) on the layers named
    cfg.lora_targets, in place; freezes every other parameter. Returns the peft model around `model`, which keeps
    training `model` itself (its Linear layers now hold the adapters).

    Raises ValueError when no layer matches the targets (peft's message names them).

    Example:
        >>> peft_model = add_lora(lm, TrainConfig(init_from="runs/base", lora_rank=8))
        >>> sum(p.numel() for p in lm.parameters() if p.requires_grad)      # the adapters only
    """
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA fine-tuning (lora_rank > 0) needs peft: pip install 'mambakit[train]'") from None

    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.lora_targets))
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"lora_targets {list(cfg.lora_targets)}: {' '.join(str(err).split())}") from None
    # what adapter_config.json names as the base (peft takes it from transformers models only)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.init_from
    return peft_model


def adapted_layers(peft_model) -> list[str]:
    """The names (last part) of the layers that hold adapters, in model order: "in_proj", "x_proj", ..."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in _lora_layers(peft_model.get_base_model())))


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, LoraLinear):
                raise ValueError(f"{name}: a LoRA layer of type {type(module).__name__}; mambakit merges LoRA on "
                                 "Linear layers only")
            layers[name] = module
    return layers


def merged_model(peft_model) -> torch.nn.Module:
    """A plain model (no peft layers) whose weights are the base's plus every adapter's delta, on the CPU: what a
    LoRA run publishes. The adapters themselves stay unmerged (training goes on exactly as before).

    Example:
        >>> plain = merged_model(peft_model)
        >>> torch.allclose(plain(ids), peft_model(ids), atol=1e-5)
        True
    """
    from ..models import build_model

    model = peft_model.get_base_model()
    layers = _lora_layers(model)
    state = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
        for name, layer in layers.items():
            base = layer.get_base_layer().weight
            delta = sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)
            state[f"{name}.weight"] = (base.float() + delta.float()).to(base.dtype).to("cpu")
    with torch.device("meta"):
        plain = build_model(model.config)
    plain.load_state_dict(state, assign=True, strict=True)
    return plain.eval()


def save_adapter(peft_model, directory: Path) -> None:
    """The adapter in peft's layout in `directory`: adapter_config.json and adapter_model.safetensors."""
    import peft
    from safetensors.torch import save_file

    peft_model.peft_config["default"].save_pretrained(str(directory))
    # no embedding layers are adapted; "auto" would look the base up (on the Hub, for a Hub id) to decide
    state = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS))


def load_adapter(peft_model, directory: Path) -> None:
    """Load `save_adapter`'s weights from `directory` into `peft_model` (built by `add_lora` with the same settings)."""
    import peft
    from safetensors.torch import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}; the checkpoint of a LoRA run holds its adapter")
    result = peft.set_peft_model_state_dict(peft_model, load_file(str(path)))
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: adapter weights do not fit the run's LoRA layers (missing {missing[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]})")


def describe_model(cfg: TrainConfig, config) -> TrainConfig:
    """cfg with its model fields (layer, d_model, n_layer, d_state, expand, headdim, chunk_size) set from the loaded
    model's config where TrainConfig can say them, so that a fine-tuning run's config.yaml tells what was trained."""
    from ..models import TransformerConfig

    changes = {"d_model": config.d_model, "n_layer": config.n_layer}
    if isinstance(config, TransformerConfig):
        changes.update(layer=config.arch, headdim=config.d_model // config.num_heads)
    else:
        if config.layer in ("Mamba1", "Mamba2"):
            changes["layer"] = config.layer
        for name in ("d_state", "expand", "headdim", "chunk_size"):
            if isinstance(config.ssm_cfg.get(name), int):
                changes[name] = config.ssm_cfg[name]
    try:
        return cfg.replace(**changes)
    except ValueError:  # a mixer TrainConfig cannot describe (S4D, ...): the fields stay as they were, unused
        return cfg
