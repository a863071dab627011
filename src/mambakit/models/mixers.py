"""The mixers a config can name: one table from `ssm_cfg["layer"]` to the class, and what the layers above
need to know about a config's mixer without building one.

    MIXERS["Mamba2"]                 -> modules.Mamba2          (the model builder, models/mamba_lm.py)
    canonical_mixer_name("mamba2")   -> "Mamba2"                (config, CLI and checkpoints spell it so)
    mixer_args("Mamba2", ssm_cfg)    -> every constructor argument, defaults overridden by ssm_cfg
    mixer_sizes("Mamba2", d_model, args) -> the derived sizes (d_inner, d_ssm, nheads, norm groups, ...)

It lives with the config (models/) rather than with the classes (modules/): the config validates the
name, and checkpoints/ and generation/ read sizes from the config, never from `model.backbone.layers[i].mixer`.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..modules.attention import MHA
from ..modules.mamba1 import Mamba1
from ..modules.mamba1_ablation import Mamba1Ablation
from ..modules.mamba1_ungated import Mamba1Ungated
from ..modules.mamba2 import Mamba2, mamba2_sizes
from ..modules.s4d import S4D

__all__ = ["MIXERS", "ATTENTION", "canonical_mixer_name", "mixer_defaults", "mixer_args", "mixer_sizes",
           "unknown_mixer_args"]

# the spelling of config.json (mamba_ssm's "Mamba1" / "Mamba2"); canonical_mixer_name accepts the others
MIXERS: dict[str, type] = {"Mamba1": Mamba1, "Mamba2": Mamba2, "Mamba1Ungated": Mamba1Ungated, "S4D": S4D,
                           "Mamba1Ablation": Mamba1Ablation}
ATTENTION = MHA  # the attention layer of hybrid models (config.attn_layer_idx / attn_cfg)

_MAMBA2_SIZE_ARGS = tuple(inspect.signature(mamba2_sizes).parameters)[1:]  # its keywords, after d_model
_NOT_CONFIG = ("self", "d_model", "layer_idx", "device", "dtype")  # constructor arguments no config sets


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_BY_KEY = {_key(name): name for name in MIXERS}


def canonical_mixer_name(name: str) -> str:
    """The one spelling of a mixer name ("Mamba1", "Mamba2", "Mamba1Ungated", "S4D", "Mamba1Ablation").

    Accepts any case, with or without "-" / "_" ("mamba2", "Mamba-2", "s4d", "mamba1_ungated").

    Example:
        >>> canonical_mixer_name("mamba2")
        'Mamba2'
    """
    canonical = _BY_KEY.get(_key(name)) if isinstance(name, str) else None
    if canonical is None:
        raise ValueError(f"mixer name must be one of {tuple(MIXERS)} (any case, '-' or '_' ignored), got {name!r}")
    return canonical


def mixer_defaults(layer: str) -> dict[str, Any]:
    """The configurable constructor arguments of mixer `layer` (a name in MIXERS) and their defaults."""
    params = inspect.signature(MIXERS[canonical_mixer_name(layer)]).parameters
    return {k: p.default for k, p in params.items() if k not in _NOT_CONFIG}


def unknown_mixer_args(layer: str, ssm_cfg: dict[str, Any]) -> list[str]:
    """The keys of `ssm_cfg` (besides "layer") that mixer `layer`'s constructor does not take, sorted.

    Example:
        >>> unknown_mixer_args("S4D", {"layer": "S4D", "d_state": 16, "headdim": 64})
        ['headdim']
    """
    params = inspect.signature(MIXERS[canonical_mixer_name(layer)]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = mixer_defaults(layer)
    return sorted(k for k in ssm_cfg if k != "layer" and k not in accepted)


def mixer_args(layer: str, ssm_cfg: dict[str, Any]) -> dict[str, Any]:
    """Every constructor argument of mixer `layer`: its defaults overridden by `ssm_cfg` ("layer" left out)."""
    return {**mixer_defaults(layer), **{k: v for k, v in ssm_cfg.items() if k != "layer"}}


def mixer_sizes(layer: str, d_model: int, args: dict[str, Any]) -> dict[str, Any]:
    """The sizes a mixer derives from its arguments, as its constructor derives them.

    Every mixer: d_inner (= int(expand * d_model)), d_state, d_conv. Mamba2 also what `mamba2_sizes` gives
    (the module's own formula and checks: d_ssm, headdim, nheads, ngroups, d_mlp, conv_dim, norm_groups)
    and, with its gated RMSNorm (rmsnorm True), norm_eps. tests/test_cache.py checks these against the
    attributes of built mixers.
    """
    sizes: dict[str, Any] = {"d_inner": int(args["expand"] * d_model), "d_state": args["d_state"],
                             "d_conv": args["d_conv"]}
    if canonical_mixer_name(layer) == "Mamba2":
        sizes.update(mamba2_sizes(d_model, **{k: args[k] for k in _MAMBA2_SIZE_ARGS}))
        if args["rmsnorm"]:
            sizes["norm_eps"] = args["norm_eps"]
    return sizes
