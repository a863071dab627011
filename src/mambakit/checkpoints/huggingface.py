"""The Hugging Face format: `MambaForCausalLM` (model_type "mamba") and `Mamba2ForCausalLM` ("mamba2").

    config.json              transformers' MambaConfig / Mamba2Config fields
    model.safetensors        or model.safetensors.index.json + shards (pytorch_model.bin read too)
    generation_config.json   token ids, and `suppress_tokens` for padded vocabulary rows

Names differ from the native formats (mambakit, mamba_ssm) only in the embedding
(`backbone.embeddings.weight`; transformers itself still accepts the older `backbone.embedding.weight`, and
so does this reader). The tensors have the same layouts, so no tensor is transformed.

Numerics that decide the config translation (transformers 5.17 `modeling_mamba*.py`, the PyTorch path):
- every RMSNorm uses `layer_norm_epsilon` (mamba_ssm: 1e-5 everywhere);
- Mamba-2's gated RMSNorm: transformers up to 5.22 normalises over the whole inner width whatever
  `n_groups` is; 5.23 normalises each of the `n_groups` groups separately, as mamba_ssm always did. The
  config's `transformers_version` tells which wrote it: a Mamba-2 with n_groups > 1 written before 5.23
  (or with no version) is read with `ssm_cfg["norm_ngroups"] = 1`, one written by 5.23 or later keeps
  per-group statistics. Writing stamps `transformers_version`: "5.23.0" for a per-group norm (older
  transformers would compute it over the whole width), nothing for a whole-width one;
- `time_step_limit` clamps dt (mamba_ssm's `dt_limit`; transformers' one-token decode step ignores it, mambakit
  clamps in both paths, so only the parallel forward can agree when the limit binds);
- the vocabulary is not padded: `vocab_size` is the number of embedding rows. mambakit pads its vocabulary and never samples the padded ids, so a padded
  model is written with `suppress_tokens` listing them (transformers' generate then skips them too), and
  reading a `suppress_tokens` that is exactly a tail of the vocabulary restores the unpadded size.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..models import MambaConfig, MambaLM
from ..models.mixers import mixer_defaults
from .errors import CheckpointError
from .io import CONFIG_NAME, GENERATION_CONFIG, read_json, remove_weight_files, write_json, write_safetensors
from .keymap import KeyMap

__all__ = ["KEY_MAP", "MODEL_TYPES", "GENERATION_CONFIG", "is_hf_config", "config_from_hf", "save_hf"]

MODEL_TYPES = {"mamba": ("Mamba1", "MambaForCausalLM"), "mamba2": ("Mamba2", "Mamba2ForCausalLM")}
_EPS = 1e-5  # mamba_ssm's (and mambakit's default) norm epsilon

KEY_MAP = KeyMap([
    ("backbone.embedding.weight", "backbone.embeddings.weight"),
    ("backbone.embedding.weight", "backbone.embedding.weight"),  # older transformers files; read only
    ("backbone.layers.{i}.norm.weight", "backbone.layers.{i}.norm.weight"),
    ("backbone.layers.{i}.mixer.{param}", "backbone.layers.{i}.mixer.{param}"),
    ("backbone.norm_f.weight", "backbone.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
])

# transformers' config defaults for the fields read here (a config.json may leave any of them out).
HF_DEFAULTS = {
    "mamba": dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
                  expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu",
                  residual_in_fp32=True, time_step_rank="auto", time_step_scale=1.0, time_step_min=0.001,
                  time_step_max=0.1, time_step_init_scheme="random", time_step_floor=1e-4, tie_word_embeddings=True),
    "mamba2": dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8, use_bias=False,
                   use_conv_bias=True, hidden_act="silu", residual_in_fp32=True, time_step_min=0.001,
                   time_step_max=0.1, time_step_floor=1e-4, time_step_limit=(0.0, math.inf), chunk_size=256,
                   tie_word_embeddings=False),
}


def is_hf_config(raw: dict) -> bool:
    """A transformers config.json (it names a model_type or architectures; mamba_ssm's does neither)."""
    return "model_type" in raw or "architectures" in raw


def _model_type(raw: dict, source: str) -> str:
    model_type = raw.get("model_type")
    if model_type is None:  # very old files name only the class
        by_arch = {arch: mt for mt, (_, arch) in MODEL_TYPES.items()}
        model_type = next((by_arch[a] for a in raw.get("architectures") or [] if a in by_arch), None)
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {raw.get('model_type')!r} (architectures {raw.get('architectures')}) is not "
            f"supported: mambakit reads {', '.join(f'{mt!r} ({arch})' for mt, (_, arch) in MODEL_TYPES.items())}")
    return model_type


def _unpadded_vocab(n_rows: int, generation: dict | None) -> tuple[int, int]:
    """(vocab_size, pad_vocab_size_multiple) for a head of `n_rows` rows.

    When generation_config's suppress_tokens is exactly the tail [v, n_rows), those are padding rows: the
    vocabulary is v, padded by the largest power of two dividing n_rows when that rounds v up to n_rows
    (what mamba_ssm's multiples 8 and 16 give), else by n_rows itself.
    """
    suppress = (generation or {}).get("suppress_tokens")
    if isinstance(suppress, list) and suppress and suppress == list(range(suppress[0], n_rows)) and suppress[0] > 0:
        vocab = suppress[0]
        multiple = n_rows & -n_rows
        if -(-vocab // multiple) * multiple != n_rows:
            multiple = n_rows
        return vocab, multiple
    return n_rows, 1


def _drop_defaults(layer: str, ssm_cfg: dict) -> dict:
    """Keep only what differs from the mixer's defaults (as mamba_ssm's own config.json files do)."""
    defaults = mixer_defaults(layer)
    out = {"layer": layer}
    for k, v in ssm_cfg.items():
        if k not in defaults:  # kept, so that MambaConfig names it
            out[k] = v
            continue
        same = tuple(v) == tuple(defaults[k]) if isinstance(v, (list, tuple)) else v == defaults[k]
        if not same:
            out[k] = v
    return out


GROUPED_NORM_VERSION = "5.23.0"  # the first transformers whose Mamba-2 gated norm is per group, as mamba_ssm's


def _norm_per_group(raw: dict) -> bool:
    """Whether the transformers that wrote this config.json normalises Mamba-2's gated output per group."""
    version = str(raw.get("transformers_version") or "0")
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    want = tuple(int(p) for p in GROUPED_NORM_VERSION.split(".")[:2])
    return tuple(parts + [0] * (2 - len(parts))) >= want


def config_from_hf(raw: dict, source: str, generation: dict | None = None) -> MambaConfig:
    """MambaConfig computing what transformers computes for this config.json (+ generation_config.json)."""
    model_type = _model_type(raw, source)
    layer, _ = MODEL_TYPES[model_type]
    hf = dict(HF_DEFAULTS[model_type])
    hf.update({k: raw[k] for k in hf if raw.get(k) is not None})
    if hf["hidden_act"] not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (Mamba uses 'silu')")
    d_model, eps = hf["hidden_size"], float(hf["layer_norm_epsilon"])
    if layer == "Mamba1":
        rank = hf["time_step_rank"]
        ssm = dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=hf["expand"],
                   dt_rank="auto" if rank in ("auto", math.ceil(d_model / 16)) else rank,
                   dt_min=hf["time_step_min"], dt_max=hf["time_step_max"], dt_init=hf["time_step_init_scheme"],
                   dt_scale=hf["time_step_scale"], dt_init_floor=hf["time_step_floor"],
                   conv_bias=hf["use_conv_bias"], bias=hf["use_bias"])
    else:
        if hf["num_heads"] * hf["head_dim"] != int(hf["expand"] * d_model):
            raise CheckpointError(f"{source}: num_heads * head_dim = {hf['num_heads']} * {hf['head_dim']} must equal "
                                  f"expand * hidden_size = {hf['expand']} * {d_model}")
        ssm = dict(d_state=hf["state_size"], d_conv=hf["conv_kernel"], expand=hf["expand"], headdim=hf["head_dim"],
                   ngroups=hf["n_groups"], dt_min=hf["time_step_min"], dt_max=hf["time_step_max"],
                   dt_init_floor=hf["time_step_floor"], dt_limit=[float(x) for x in hf["time_step_limit"]],
                   bias=hf["use_bias"], conv_bias=hf["use_conv_bias"], chunk_size=hf["chunk_size"])
        if hf["n_groups"] > 1 and not _norm_per_group(raw):
            ssm["norm_ngroups"] = 1  # transformers < 5.23 normalises the gated output over the whole width
        if eps != _EPS:
            ssm["norm_eps"] = eps
    vocab_size, multiple = _unpadded_vocab(hf["vocab_size"], generation)
    fields = dict(d_model=d_model, n_layer=hf["num_hidden_layers"], vocab_size=vocab_size, d_intermediate=0,
                  ssm_cfg=_drop_defaults(layer, ssm), rms_norm=True, residual_in_fp32=bool(hf["residual_in_fp32"]),
                  pad_vocab_size_multiple=multiple, tie_embeddings=bool(hf["tie_word_embeddings"]))
    if eps != _EPS:
        fields["norm_epsilon"] = eps
    try:
        config = MambaConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err
    return config


def read_generation_config(directory: Path) -> dict | None:
    path = directory / GENERATION_CONFIG
    return read_json(path) if path.is_file() else None


# ---------------------------------------------------------------- writing


def _hf_config(model: MambaLM, eos_id: int | None) -> dict:
    """transformers' config.json for `model`; CheckpointError listing whatever that format cannot express."""
    cfg = model.config
    if cfg.layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(f"this model cannot be written in the Hugging Face format: transformers has no "
                              f"{cfg.layer} mixer (save with format='mambakit')")
    args = cfg.mixer_args
    problems = []
    stamp: dict = {}
    if cfg.attn_layer_idx:
        problems.append(f"attention layers (attn_layer_idx={cfg.attn_layer_idx})")
    if cfg.d_intermediate:
        problems.append(f"a gated MLP after each mixer (d_intermediate={cfg.d_intermediate})")
    if not cfg.rms_norm:
        problems.append("LayerNorm instead of RMSNorm (rms_norm=False)")
    expand = args["expand"]
    if float(expand) != int(expand):
        problems.append(f"a fractional expand={expand} (transformers' expand is an integer)")
    eps = float(cfg.norm_epsilon)
    common = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
                  state_size=args["d_state"], expand=int(expand), conv_kernel=args["d_conv"], use_bias=args["bias"],
                  use_conv_bias=args["conv_bias"], hidden_act="silu", residual_in_fp32=cfg.residual_in_fp32,
                  layer_norm_epsilon=eps, tie_word_embeddings=cfg.tie_embeddings, time_step_min=args["dt_min"],
                  time_step_max=args["dt_max"], time_step_floor=args["dt_init_floor"])
    if cfg.layer == "Mamba1":
        rank = math.ceil(cfg.d_model / 16) if args["dt_rank"] == "auto" else int(args["dt_rank"])
        out = dict(architectures=["MambaForCausalLM"], model_type="mamba", **common,
                   intermediate_size=int(expand * cfg.d_model), time_step_rank=rank,
                   time_step_scale=args["dt_scale"], time_step_init_scheme=args["dt_init"])
    else:
        sizes = cfg.mixer_sizes  # from the config alone: no built mixer is read
        if sizes["d_ssm"] != sizes["d_inner"]:
            problems.append(f"an MLP half inside the mixer (d_ssm={sizes['d_ssm']} < d_inner={sizes['d_inner']})")
        if args["D_has_hdim"]:
            problems.append("D per channel (D_has_hdim=True; transformers has one D per head)")
        if not args["rmsnorm"]:
            problems.append("no gated RMSNorm (rmsnorm=False)")
        elif args["norm_before_gate"]:
            problems.append("norm_before_gate=True (transformers computes norm(y * silu(z)))")
        else:
            groups = sizes["norm_groups"]
            if groups not in (1, sizes["ngroups"]):
                problems.append(f"a gated RMSNorm over {groups} groups (transformers normalises the whole width "
                                f"or each of the n_groups={sizes['ngroups']} groups)")
            elif groups > 1:
                stamp = {"transformers_version": GROUPED_NORM_VERSION}  # only >= 5.23 computes it per group
            if float(sizes["norm_eps"]) != eps:
                problems.append(f"a gated-norm eps {sizes['norm_eps']} different from the other norms' {eps} "
                                "(transformers has one layer_norm_epsilon)")
        out = dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", **common, num_heads=sizes["nheads"],
                   head_dim=sizes["headdim"], n_groups=sizes["ngroups"], chunk_size=args["chunk_size"],
                   time_step_limit=[float(x) for x in args["dt_limit"]])
    if problems:
        raise CheckpointError("this model cannot be written in the Hugging Face format (transformers' Mamba and "
                              f"Mamba-2 cannot compute it): {'; '.join(problems)}; save it with format='mambakit' "
                              "instead")
    dtype = model.backbone.embedding.weight.dtype
    out.update(stamp)
    out.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True,
               dtype=str(dtype).removeprefix("torch."))
    return out


def _generation_config(config: MambaConfig, eos_id: int | None) -> dict | None:
    gen = {}
    if eos_id is not None:
        gen.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if config.padded_vocab_size > config.vocab_size:
        # mambakit never samples the padded rows; this makes transformers' generate skip them too
        gen["suppress_tokens"] = list(range(config.vocab_size, config.padded_vocab_size))
    return gen or None


def save_hf(model: MambaLM, directory: Path, eos_id: int | None = None, max_shard_size: int | None = None) -> list[str]:
    """Write config.json, generation_config.json (when there is something to say) and the weights as
    transformers names them; a tied LM head is left out (transformers re-ties it). Weight files of an
    earlier save are removed first. Returns the file names."""
    hf_config = _hf_config(model, eos_id)  # refuse before touching the directory
    remove_weight_files(directory)
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        theirs = KEY_MAP.to_theirs(name)
        if theirs is None:  # a module the key map does not know (the config checks above should prevent this)
            raise CheckpointError(f"no Hugging Face name for {name!r}")
        state[theirs] = tensor
    write_json(directory / CONFIG_NAME, hf_config)
    files = [CONFIG_NAME]
    gen = _generation_config(model.config, eos_id)
    if gen is not None:
        write_json(directory / GENERATION_CONFIG, gen)
        files.append(GENERATION_CONFIG)
    return files + write_safetensors(directory, state, max_shard_size)

