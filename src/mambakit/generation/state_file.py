"""State files: a Mamba model's recurrent state after a text, saved to disk and continued later.

A Mamba LM reads any length of text into a state of fixed size (per layer a conv window and an SSM state: about
2.4 MB in float32 for the 130M model, whatever the text's length), so a long document read once can be asked about
many times without reading it again. `save_state` writes that state with the logits of the next token;
`load_state` reads it back for `generate(..., state=...)`, `stream(..., state=...)` or `prefill(model, ids, cache)`.

    file (safetensors)   layers.{i}.conv_state (B, C, W - 1), layers.{i}.ssm_state (B, D, N) or (B, H, P, N),
                         logits (B, V) float32: the next-token logits after the last token read
    metadata             format "mambakit-state", version, tokens (seqlen_offset), layers, config (the model's
                         config hash: a state is refused by a model of another shape), weights (a digest of the
                         weights: a state made with other weights, or another dtype, is loaded with a warning)

Models with attention layers (Transformer baselines, hybrids) keep a cache that grows with the text: state files
hold Mamba states only, and refuse those models.

Example:
    >>> cache, logits = prefill(model, [book_ids])                      # read once
    >>> save_state("book.state", model, cache, logits)
    >>> state = load_state("book.state", model)
    >>> generate(model, [question_ids, other_question_ids], 100, state=state)   # both rows continue the book
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.io import atomic_write
from ..modules.state import InferenceCache, MixerState
from .cache import allocate_cache

__all__ = ["SavedState", "save_state", "load_state", "config_digest", "weights_digest", "StateFileWarning"]

FORMAT = "mambakit-state"
VERSION = "1"


class StateFileWarning(UserWarning):
    """A state file made by a model with other weights (or another dtype, or quantized) is being continued."""


@dataclass
class SavedState:
    """A state read by `load_state`: the cache (batch rows of per-layer states, `tokens` consumed) and each row's
    next-token logits (batch, padded vocab) float32. `generate(..., state=...)` copies it: it can be reused."""

    cache: InferenceCache
    logits: torch.Tensor
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # what the writer's `metadata=` added (e.g. a chat's)

    @property
    def tokens(self) -> int:
        return self.cache.seqlen_offset

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size


def config_digest(model: nn.Module) -> str:
    """A hex digest of the model's config (its shape): a state fits only a model with the same one."""
    config = model.config
    data = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def weights_digest(model: nn.Module) -> str:
    """A hex digest of the weights: each parameter's name, shape and sum to 4 significant digits (cheap: one
    reduction per parameter, on its device)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = float(p.detach().float().sum()) if p.is_floating_point() else 0.0
            digest.update(f"{name}:{tuple(p.shape)}:{total:.4g};".encode())
    return digest.hexdigest()[:32]


def _check_model(model: nn.Module, who: str) -> None:
    if getattr(model.config, "attn_layer_idx", None) or not hasattr(model.config, "ssm_cfg"):
        raise ValueError(f"{who}: state files hold Mamba states; this model has attention layers, whose cache grows "
                         "with the text")


def save_state(path: str | Path, model: nn.Module, cache: InferenceCache, logits: torch.Tensor,
               metadata: dict[str, str] | None = None) -> Path:
    """Write `cache` (after `prefill`) and `logits` (B, V), the logits `prefill` returned, to `path` (safetensors).

    metadata: extra string fields kept in the file (`SavedState.metadata` when read; e.g. a chat's messages).
    Raises ValueError for a model with attention layers, logits whose rows do not match the cache's, or metadata
    that does not map strings to strings.

    Example:
        >>> cache, logits = prefill(model, [ids])
        >>> save_state("doc.state", model, cache, logits)
    """
    from safetensors.torch import save_file

    _check_model(model, "save_state")
    if logits.dim() != 2 or logits.shape[0] != cache.batch_size:
        raise ValueError(f"save_state: logits must be (batch {cache.batch_size}, vocab), got {tuple(logits.shape)}")
    tensors = {"logits": logits.detach().float().contiguous().cpu()}
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, MixerState):
            raise ValueError(f"save_state: layer {i} holds a {type(layer).__name__}, not a Mamba state")
        tensors[f"layers.{i}.conv_state"] = layer.conv_state.detach().contiguous().cpu()
        tensors[f"layers.{i}.ssm_state"] = layer.ssm_state.detach().contiguous().cpu()
    meta = {"format": FORMAT, "version": VERSION, "tokens": str(cache.seqlen_offset), "layers": str(len(cache.layers)),
            "config": config_digest(model), "weights": weights_digest(model)}
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("save_state: metadata must map strings to strings")
    meta.update({f"user.{k}": v for k, v in extra.items()})
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # a kill never leaves half a file
    return path


def load_state(path: str | Path, model: nn.Module, device: torch.device | str | None = None,
               state_dtype: torch.dtype | None = None) -> SavedState:
    """Read a state file written by `save_state` for `model` onto `device` (default: the model's).

    Raises ValueError when the file is not a state file or was made by a model of another shape; warns
    (StateFileWarning) when the model's weights differ from those that made it. state_dtype: the SSM states' dtype
    (default float32, as `allocate_cache`).

    Example:
        >>> state = load_state("doc.state", model)
        >>> state.tokens, state.batch_size
    """
    from safetensors import safe_open

    _check_model(model, "load_state")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable state file ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mambakit state file (no format {FORMAT!r} in its metadata)")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: state file version {meta.get('version')!r}; this mambakit reads {VERSION!r}")
    if meta.get("config") != config_digest(model):
        raise ValueError(f"{path}: made by a model of another shape (config); it continues only the model that made it")
    if meta.get("weights") != weights_digest(model):
        warnings.warn(StateFileWarning(f"{path}: made by a model with other weights (another checkpoint, dtype or "
                                       "quantization); its continuations may differ from that model's"), stacklevel=2)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    logits = tensors["logits"]
    try:
        saved = InferenceCache([MixerState(tensors[f"layers.{i}.conv_state"], tensors[f"layers.{i}.ssm_state"])
                                for i in range(int(meta["layers"]))], seqlen_offset=int(meta["tokens"]))
        # a cache as the model allocates it (its conv dtype, the SSM state dtype asked for), holding the saved states
        cache = allocate_cache(model, logits.shape[0], device=device, state_dtype=state_dtype).copy_from_(saved)
    except (KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: its states do not fit this model ({err})") from None
    return SavedState(cache, logits.to(device), path,
                      {k[len("user."):]: v for k, v in meta.items() if k.startswith("user.")})
