"""The native formats, whose names are MambaLM's own: mambakit's and mamba_ssm's (`MambaLMHeadModel`).

    mambakit:   config.json (MambaConfig fields) + model.safetensors (a tied LM head stored once)
    mamba_ssm:  config.json (only mamba_ssm's fields) + pytorch_model.bin (every key, as mamba_ssm's
                `save_pretrained` writes it and its `from_pretrained` reads it)

State-dict names are the same on both sides (backbone.embedding.weight, backbone.layers.i.{norm, mixer,
norm2, mlp}.*, backbone.norm_f.weight, lm_head.weight): the key map is the identity. Reading accepts
either weights file with either config.
"""

from __future__ import annotations

from pathlib import Path

from ..models import MambaConfig, MambaLM
from .errors import CheckpointError
from .io import CONFIG_NAME, remove_weight_files, write_json, write_safetensors, write_torch
from .keymap import IDENTITY

__all__ = ["KEY_MAP", "config_from_dict", "save_native"]

KEY_MAP = IDENTITY

# mamba_ssm's MambaConfig fields (models/config_mamba.py): what its config.json may hold.
MAMBA_SSM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
# mambakit options mamba_ssm does not have, with the value that computes what mamba_ssm computes.
# A mamba_ssm checkpoint may only leave them out; any other value cannot be written in that format.
MAMBAKIT_ONLY_FIELDS = {"norm_epsilon": 1e-5}
MAMBAKIT_ONLY_MIXER_ARGS = {"norm_ngroups": None, "norm_eps": 1e-5}


def config_from_dict(raw: dict, source: str) -> MambaConfig:
    """MambaConfig from a mamba_ssm (or mambakit) config.json dict, errors prefixed with `source`."""
    try:
        config = MambaConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err
    return config


def _mamba_ssm_config(config: MambaConfig) -> dict:
    """config.json as mamba_ssm reads it: its fields only; mambakit-only options must hold their neutral value."""
    full, ssm_cfg = config.to_dict(), dict(config.ssm_cfg)
    bad = [f"{k}={full[k]!r}" for k, neutral in MAMBAKIT_ONLY_FIELDS.items() if k in full and full[k] != neutral]
    bad += [f"ssm_cfg[{k!r}]={ssm_cfg[k]!r}" for k, neutral in MAMBAKIT_ONLY_MIXER_ARGS.items()
            if k in ssm_cfg and ssm_cfg[k] != neutral]
    if config.layer not in ("Mamba1", "Mamba2"):
        bad.append(f"ssm_cfg['layer']={config.layer!r}")
    if config.attn_cfg.get("absolute_pos_emb"):
        bad.append("attn_cfg['absolute_pos_emb']=True")
    if bad:
        raise CheckpointError(f"the mamba_ssm format cannot express {', '.join(bad)} (mamba_ssm has no such option); "
                              "save with format='mambakit' instead")
    for k in MAMBAKIT_ONLY_MIXER_ARGS:
        ssm_cfg.pop(k, None)
    out = {k: full[k] for k in MAMBA_SSM_FIELDS}
    out["ssm_cfg"] = ssm_cfg
    return out


def save_native(model: MambaLM, directory: Path, format: str, max_shard_size: int | None = None) -> list[str]:
    """Write config.json and the weights in the "mambakit" or "mamba_ssm" layout; returns the file names.

    max_shard_size (bytes) splits mambakit's safetensors into shards + index; mamba_ssm reads one file only.
    Weight files of an earlier save are removed first.
    """
    config = model.config
    state = dict(model.state_dict())
    if format == "mamba_ssm":
        if max_shard_size is not None:
            raise CheckpointError("the mamba_ssm format is one pytorch_model.bin (mamba_ssm reads no shards): "
                                  "leave max_shard_size unset")
        cfg = _mamba_ssm_config(config)  # refuse before touching the directory
        remove_weight_files(directory)
        # Every key, a tied head included (mamba_ssm's load_state_dict is strict), moved to CPU once so that
        # the tied pair still shares storage and torch.save writes it once.
        cpu = {k: v.detach().cpu() for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")}
        if config.tie_embeddings:
            cpu["lm_head.weight"] = cpu["backbone.embedding.weight"]
        write_json(directory / CONFIG_NAME, cfg)
        return [CONFIG_NAME] + write_torch(directory, cpu)
    remove_weight_files(directory)
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # the embedding itself; safetensors refuses shared tensors, and reading re-ties
    write_json(directory / CONFIG_NAME, config.to_dict())
    return [CONFIG_NAME] + write_safetensors(directory, state, max_shard_size)
