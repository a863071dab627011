"""MambaLM: embedding -> residual blocks (Mamba-1 / Mamba-2 / S4D mixers or attention, optional gated MLP) -> norm -> LM head.

Shapes (legend): B batch, L seqlen, M d_model, V padded vocab.

    input_ids (B, L) -> embedding (B, L, M) -> n_layer x Block -> norm_f -> lm_head -> logits (B, L, V)

Module names follow mamba_ssm's `MambaLMHeadModel` (backbone.embedding, backbone.layers.i.{norm, mixer,
norm2, mlp}, backbone.norm_f, lm_head), so a mamba_ssm state dict loads without renaming. Passing an
inference cache makes every call continue from the cache's state and advance it: prefill k tokens,
then one token at a time (the recurrent step path, constant cost per token), and the logits equal
those of one parallel forward over the whole sequence.
"""

from __future__ import annotations

import math
from functools import partial
import torch
import torch.nn.functional as F
from torch import nn

from ..modules import Block, GatedMLP, RMSNorm
from ..modules.fusion import reads_as_plain
from ..ops import linear_cross_entropy
from ..modules.block import add_and_norm
from ..modules.state import InferenceCache
from .config import MambaConfig
from .mixers import ATTENTION, MIXERS


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02) -> None:
    """mamba_ssm's initialisation: zero biases (except dt_proj's), N(0, 0.02) embeddings, and output
    projections of each residual branch rescaled by 1/sqrt(n_layer) (GPT-2's prenorm-residual scaling)."""
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    for child_name in ("out_proj", "fc2"):
        child = getattr(module, child_name, None)
        if isinstance(child, nn.Linear):
            nn.init.kaiming_uniform_(child.weight, a=math.sqrt(5))
            with torch.no_grad():
                child.weight /= math.sqrt(n_layer)


class Backbone(nn.Module):
    """Embedding, the residual blocks and the final norm: (B, L) ids -> (B, L, M) hidden states."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        mixer_cls = MIXERS[config.layer]
        d = config.d_model
        eps = config.norm_epsilon
        norm_cls = partial(RMSNorm, eps=eps) if config.rms_norm else partial(nn.LayerNorm, eps=eps)
        self.embedding = nn.Embedding(config.padded_vocab_size, d, **factory)
        layers = []
        for i in range(config.n_layer):
            mlp = GatedMLP(d, hidden_features=config.d_intermediate, out_features=d, **factory) \
                if config.d_intermediate > 0 else None
            if i in config.attn_layer_idx:  # mamba_ssm's hybrid layout: these layers are attention
                try:
                    mixer = ATTENTION(d, layer_idx=i, **config.attn_cfg, **factory)
                except TypeError as err:  # a missing num_heads or an argument MHA does not take
                    raise ValueError(f"MambaLM: attn_cfg {config.attn_cfg} does not build an attention layer ({err})") from None
            else:
                mixer = mixer_cls(d, layer_idx=i, **config.mixer_kwargs, **factory)
            layers.append(Block(
                d, mixer, norm_cls(d, **factory),
                mlp=mlp, norm2=norm_cls(d, **factory) if mlp is not None else None,
                residual_in_fp32=config.residual_in_fp32,
            ))
        self.layers = nn.ModuleList(layers)
        self.norm_f = norm_cls(d, **factory)

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        hidden, residual = self.embedding(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cache=None if cache is None else cache.layers[i], seq_idx=seq_idx)
        return add_and_norm(hidden, residual, self.norm_f, residual_in_fp32=False)[0]


class MambaLM(nn.Module):
    """Mamba language model.   forward(input_ids (B, L), cache=None, seq_idx=None) -> logits (B, L, V).

    V is `config.padded_vocab_size` (the vocab rounded up to pad_vocab_size_multiple, as mamba_ssm does).

    Example:
        >>> from mambakit import MambaConfig, MambaLM
        >>> model = MambaLM(MambaConfig(d_model=128, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba2",
        ...                 "d_state": 32, "headdim": 32}))
        >>> logits = model(torch.randint(0, 256, (2, 64)))          # (2, 64, 256)
        >>> cache = model.allocate_cache(batch_size=2)
        >>> _ = model(prompt_ids, cache=cache); step_logits = model(next_ids[:, None], cache=cache)
    """

    backbone_cls = Backbone  # a subclass swaps the backbone (models/transformer.py) and keeps the rest

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = self.backbone_cls(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.apply(partial(_init_weights, n_layer=config.n_layer))
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None,
                seq_idx: torch.Tensor | None = None, logits_to_keep: int = 0, *,
                targets: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                vocab_size: int | None = None) -> torch.Tensor:
        """Logits (B, L, V); with logits_to_keep = k > 0 only the last k positions (B, k, V), as prefill needs.

        With `cache`, the tokens continue the cached sequences and the cache advances by L tokens.

        With `targets` (B, L) (the next token of each position; `ignore_index` where nothing is scored) the
        forward returns the cross-entropy instead of the logits: a float32 scalar, the mean (or, with
        reduction="sum", the sum) over scored positions of -log p(target) under a softmax over the first
        `vocab_size` columns (default `config.vocab_size`: padding columns are never scored). It is computed
        by `ops.linear_cross_entropy`, a block of positions at a time, so the (B, L, V) logits and their
        float32 copies are never held: gigabytes less at a 50k vocabulary (BENCHMARKS.md). An lm_head that
        is not a plain nn.Linear (an adapter, a quantized weight, a hook) is called as a module instead.
        Inside forward, so that DDP and FSDP2 see the head's parameters as they see every other.

        Example:
            >>> loss = model(ids[:, :-1], targets=ids[:, 1:])          # mean next-token loss, a scalar
            >>> loss.backward()
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"MambaLM: input_ids must be an integer tensor (batch, seqlen), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            # on CPU an id outside the embedding is an IndexError deep inside; the check costs one min/max
            # (not done on CUDA, where it would be a host sync per decode step)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.padded_vocab_size:
                raise ValueError(f"MambaLM: input_ids must lie in [0, {self.config.padded_vocab_size}), got values "
                                 f"from {lo} to {hi}")
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"MambaLM: cache holds {cache.batch_size} sequences, input_ids has batch "
                             f"{input_ids.shape[0]}")
        hidden = self.backbone(input_ids, cache=cache, seq_idx=seq_idx)
        if cache is not None:
            cache.advance(input_ids.shape[1])  # the one place a forward moves the position
        if targets is not None:
            return self._loss(hidden, targets, ignore_index, reduction, vocab_size)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
              vocab_size: int | None) -> torch.Tensor:
        """The cross-entropy of the head's logits at `hidden` (B, L, M) against `targets` (B, L): a float32 scalar."""
        vocab = self.config.vocab_size if vocab_size is None else vocab_size
        if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:2]:
            raise ValueError(f"MambaLM: targets must be a tensor of shape {tuple(hidden.shape[:2])} like input_ids, "
                             f"got "
                             f"{tuple(getattr(targets, 'shape', ())) or type(targets).__name__}")
        if not 0 < vocab <= self.config.padded_vocab_size:
            raise ValueError(f"MambaLM: vocab_size must lie in [1, {self.config.padded_vocab_size}], got {vocab}")
        if reads_as_plain(self.lm_head, nn.Linear) and self.lm_head.bias is None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=ignore_index,
                                        reduction=reduction, vocab_size=vocab)
        logits = self.lm_head(hidden)[..., :vocab].float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), ignore_index=ignore_index,
                               reduction=reduction)

    def allocate_cache(self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                       state_dtype: torch.dtype | None = None) -> InferenceCache:
        """Zero recurrent state for `batch_size` sequences: one state per layer, at position 0.

        Conv windows in `dtype` (default: the model's), SSM states float32 (float64 for a float64 model);
        `state_dtype=torch.bfloat16` keeps the SSM states of Mamba-2 layers in bfloat16 (updated in float32,
        rounded back each token), as mamba_ssm's inference caches do: half the bytes a large-batch decode
        step moves. Mamba-1 layers refuse it (their d_state 16 state is small next to the weights).

        Example:
            >>> cache = model.allocate_cache(batch_size=4)
            >>> cache.layers[0].ssm_state.shape        # Mamba-2: (4, nheads, headdim, d_state)
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"allocate_cache: batch_size must be a positive int, got {batch_size!r}")
        return InferenceCache([block.mixer.allocate_state(batch_size, dtype=dtype, device=device,
                                                          state_dtype=state_dtype)
                               for block in self.backbone.layers])

    # ---- conveniences whose implementations live in the layers above (generation/, checkpoints/) ----

    def generate(self, prompts, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """New tokens per prompt (see mambakit.generation.generate for the sampling arguments)."""
        from ..generation import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def save_pretrained(self, save_directory, format: str = "mambakit", tokenizer=None,
                        max_shard_size: int | None = None, push_to_hub: bool = False, repo_id: str | None = None,
                        **hub_kwargs) -> None:
        """Write config + weights (+ tokenizer) in format "mambakit", "mamba_ssm" or "hf" (see mambakit.checkpoints);
        with push_to_hub=True also upload them to the Hub repository `repo_id` (the `hub` extra)."""
        from ..checkpoints import save_pretrained

        save_pretrained(self, save_directory, format=format, tokenizer=tokenizer, max_shard_size=max_shard_size,
                        push_to_hub=push_to_hub, repo_id=repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None,
                        revision: str | None = None) -> "MambaLM":
        """Load a local checkpoint directory or a Hugging Face Hub id such as "state-spaces/mamba-130m-hf" at
        `revision` (see mambakit.checkpoints.load_pretrained)."""
        from ..checkpoints import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, revision=revision)
