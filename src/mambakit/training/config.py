"""`TrainConfig`: every setting of a training run in one flat dataclass (recipes return one).

The model part (layer, d_model, n_layer, d_state, expand, headdim, chunk_size) is turned into a
`MambaConfig` by `model_config`; the vocabulary comes from the tokenizer.
`batch_size` is per process and per micro-step: under torchrun with N processes and `grad_accum` G an
optimizer step reads N x G x batch_size windows (the global batch).
The learning-rate schedule is a function of the step and `max_steps` only, so a run that ends
early (time budget) and is resumed follows the same schedule as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..models.config import MambaConfig
from ..models.mixers import canonical_mixer_name

__all__ = ["TrainConfig", "model_config", "lr_at", "MODEL_OVERRIDES"]

# the mixers in their one spelling ("mamba2" and other spellings are accepted and stored so), then the
# Transformer baselines of models/transformer.py, heads of headdim
LAYERS = ("Mamba1", "Mamba2", "transformer++", "gpt3")
PARALLEL = ("ddp", "fsdp")
LOGGERS = ("none", "tensorboard")
# MambaConfig fields a run may set through TrainConfig.model: all but d_model and n_layer (TrainConfig fields) and
# vocab_size (the tokenizer's)
MODEL_OVERRIDES = tuple(f.name for f in dataclasses.fields(MambaConfig) if f.name not in ("d_model", "n_layer",
                                                                                            "vocab_size"))


@dataclass
class TrainConfig:
    """A training run: data, model shape, optimisation, evaluation and output."""

    recipe: str = "custom"
    # data
    data: str | None = None  # file or directory; None = built-in Shakespeare corpus
    # "bytes", a path to a tokenizer.json (or a directory holding one), "nucleotides" (DNA), or "init": the tokenizer
    # saved with init_from
    tokenizer: str = "bytes"
    val_fraction: float = 0.05  # held-out share for user data (Shakespeare holds out fixed plays)
    # documents are joined with the tokenizer's EOS; the state restarts at each one (seq_idx), in evaluation too
    reset_at_eos: bool = True
    token_cache: str = "auto"  # "auto" ($MAMBAKIT_TOKEN_CACHE or ~/.cache/mambakit/tokens), a directory, or "off"
    tokenize_procs: int = 0  # processes that build the token cache; 0 = one per core (up to 8)
    streaming: bool = False  # stream json/parquet/text files and datasets directories (corpora larger than RAM)
    text_column: str = "text"  # the text column of datasets directories and streamed json/parquet files
    # data is conversations (.jsonl / .json of {"messages": [...]}, data.conversations): rendered with a chat
    # template, only the assistant's tokens scored, in training and evaluation
    chat: bool = False
    # with chat: None = the tokenizer's chat template, else mambakit's default (data.DEFAULT_CHAT_TEMPLATE);
    # "default"; or the path of a Jinja file
    chat_template: str | None = None
    # with chat: the training loss on "assistant" tokens only, or on "all" of a conversation's tokens (the usual
    # baseline without a mask); held-out figures always score the assistant's
    chat_loss: str = "assistant"
    # model
    layer: str = "Mamba2"  # "Mamba1", "Mamba2" (any case), or a Transformer baseline: "transformer++", "gpt3"
    d_model: int = 128
    n_layer: int = 2
    d_state: int = 64
    expand: int = 2
    headdim: int = 32  # mamba2, and the attention heads of the Transformers (d_model / headdim heads)
    chunk_size: int = 64  # mamba2 only
    # fine-tuning (training/finetune.py): start from this model directory or Hub id; the model fields above and
    # `model` are then not used (a run rewrites them from the loaded model where they can say it)
    init_from: str | None = None
    lora_rank: int = 0  # > 0: train peft LoRA adapters of this rank on lora_targets only (needs init_from)
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["in_proj", "x_proj", "dt_proj"])  # those a model has
    # other MambaConfig fields (MODEL_OVERRIDES), e.g. {"d_intermediate": 256, "ssm_cfg": {"d_conv": 3}}; ssm_cfg
    # entries are merged into the mixer settings above
    model: dict[str, Any] = field(default_factory=dict)
    # optimisation
    seqlen: int = 256
    batch_size: int = 16  # per process and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (gradients summed; synced across processes on the last)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: "stop" the run (nothing saved) or "skip" the step
    time_budget_s: float | None = None  # stop gracefully (eval, save) after this many seconds of this invocation
    # evaluation
    eval_every: int = 250  # steps between held-out evaluations; 0 = only at the end
    eval_tokens: int = 32768  # held-out tokens per periodic evaluation
    final_eval_tokens: int | None = None  # None = the whole held-out stream
    eval_batch_size: int = 16
    # runtime and output
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    # "bf16": bf16 autocast on CUDA (none on a CPU); "bf16+cpu": on a CPU too (1.4x faster steps at d_model 512 on
    # a CPU with AMX-BF16, BENCHMARKS.md; slower where the CPU has no native bf16); "none": float32 everywhere
    autocast: str = "bf16"
    recompute: bool = False  # keep only in_proj's output per layer; recompute conv, scan, norm in the backward
    # replay each optimizer step (every micro-step, clipping, AdamW) from one CUDA graph after 3 eager steps: one
    # launch per step instead of thousands (BENCHMARKS.md: 1.6x tokens/s for the 130M Mamba-2, 1.2x Mamba-1, an
    # order of magnitude for the default recipe's small models). None: on wherever it can be (CUDA, one process,
    # fused AdamW); True insists (an error elsewhere); a step that cannot be captured runs eagerly, with a warning
    cuda_graph: bool | None = None
    # "chunked": the model's own loss, ops.linear_cross_entropy (never the (batch, seqlen, vocab) logits: 20.4 ->
    # 9.8 GB at the 130M shape, batch 8 x 2048, ~8% slower on the H200, BENCHMARKS.md); "logits": F.cross_entropy
    # of the whole logits matrix (the faster one when memory allows)
    loss: str = "chunked"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2: parameters sharded per block)
    fsdp_mixed_precision: str = "bf16"  # "bf16": FSDP2 computes in bf16, reduces gradients in fp32 (CUDA only)
    # True (FSDP2's own default): a block's gathered parameters are freed after its forward and gathered again
    # for its backward. False keeps them through the step (one all-gather, not two, for a bf16 copy of the blocks'
    # parameters held): fewer host calls on CPU, but slower on one H200 (BENCHMARKS.md, gpu_parallel.py)
    fsdp_reshard_after_forward: bool = True
    out_dir: str | None = None  # None = runs/<recipe>
    save_every: int = 0  # steps between checkpoints during training; 0 = only at the end
    keep_checkpoints: int = 2  # complete checkpoints kept in out_dir/checkpoints (the newest ones)
    log_every: int = 10  # steps between records of out_dir/metrics.jsonl (and the progress bar's numbers)
    logger: str = "none"  # "tensorboard" also writes the records as TensorBoard scalars (out_dir/tensorboard)
    plot: bool = True  # out_dir/metrics.png (loss and held-out bits per byte) at the end (needs matplotlib)
    progress: bool = True  # tqdm progress bar (rank 0)
    sample_prompt: str = ""  # generated from at the end ("" = start of a document)
    sample_tokens: int = 300
    sample_temperature: float = 0.8
    sample_top_k: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layer, str) and self.layer not in ("transformer++", "gpt3"):
            try:
                self.layer = canonical_mixer_name(self.layer)
            except ValueError:
                pass  # named below, with the Transformer baselines
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        positive = ("d_model", "n_layer", "d_state", "expand", "seqlen", "batch_size", "max_steps", "eval_batch_size",
                    "log_every", "headdim", "chunk_size", "grad_accum")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.layer == "Mamba2" and (self.expand * self.d_model) % self.headdim:
            raise ValueError(f"Mamba2 needs expand * d_model ({self.expand * self.d_model}) divisible by headdim ({self.headdim})")
        if self.layer in ("transformer++", "gpt3") and self.d_model % self.headdim:
            raise ValueError(f"{self.layer} needs d_model ({self.d_model}) divisible by headdim ({self.headdim})")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be true, false or null (on where it can be), got {self.cuda_graph!r}")
        if self.loss not in ("chunked", "logits"):
            raise ValueError(f"loss must be 'chunked' or 'logits', got {self.loss!r}")
        if self.autocast not in ("bf16", "bf16+cpu", "none"):
            raise ValueError(f"autocast must be 'bf16', 'bf16+cpu' or 'none', got {self.autocast!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.fsdp_mixed_precision not in ("bf16", "none"):
            raise ValueError(f"fsdp_mixed_precision must be 'bf16' or 'none', got {self.fsdp_mixed_precision!r}")
        if self.logger not in LOGGERS:
            raise ValueError(f"logger must be one of {LOGGERS}, got {self.logger!r}")
        if self.save_every < 0 or self.eval_every < 0:
            raise ValueError(f"save_every and eval_every must be >= 0, got {self.save_every} and {self.eval_every}")
        unknown = sorted(set(self.model) - set(MODEL_OVERRIDES))
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; the MambaConfig fields a run sets are {MODEL_OVERRIDES}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.tokenize_procs < 0:
            raise ValueError(f"tokenize_procs must be >= 0 (0 = one per core), got {self.tokenize_procs}")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be an int >= 1, got {self.keep_checkpoints!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0 (0: train every weight), got {self.lora_rank!r}")
        if self.lora_rank and self.parallel == "fsdp":
            raise ValueError("LoRA runs train a few adapters: use parallel 'ddp', not 'fsdp'")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if (not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets
                or not all(isinstance(t, str) and t for t in self.lora_targets)):
            raise ValueError(f"lora_targets must be a non-empty list of layer names, got {self.lora_targets!r}")
        self.lora_targets = list(self.lora_targets)
        if self.chat and (self.streaming or self.tokenizer == "nucleotides"):
            raise ValueError("chat reads a file or folder of conversations: not with streaming or the DNA tokenizer")
        if self.chat_loss not in ("assistant", "all"):
            raise ValueError(f"chat_loss must be 'assistant' or 'all', got {self.chat_loss!r}")
        if self.chat_template is not None and not self.chat:
            raise ValueError("chat_template renders conversations: set chat too")
        # torch.manual_seed takes [0, 2**64) (negatives wrap around); anything else overflows inside torch
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")

    def missing_init_from(self) -> str | None:
        """What needs init_from and does not have it (a run refuses to start then), or None. Not checked at
        construction: the `finetune` and `lora` recipes are completed by init_from later.

        Example:
            >>> TrainConfig(lora_rank=8).missing_init_from()
            'lora_rank 8 trains LoRA adapters on a trained model: give init_from (a model directory or Hub id)'
        """
        if self.init_from:
            return None
        if self.lora_rank:
            return (f"lora_rank {self.lora_rank} trains LoRA adapters on a trained model: give init_from (a model "
                    "directory or Hub id)")
        if self.tokenizer == "init":
            return "tokenizer 'init' is the tokenizer of init_from's model: give init_from (a model directory or Hub id)"
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_yaml(self) -> str:
        """The config as YAML, the format `mambakit train --config FILE` reads (and `--print-config` writes)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def model_config(cfg: TrainConfig, vocab_size: int):
    """The `MambaConfig` of a run (no MLP, RMSNorm, tied embeddings, fp32 residual: the mamba_ssm defaults), or the
    `TransformerConfig` of a Transformer baseline (d_model / headdim heads, the recipe's MLP).

    Example:
        >>> model_config(TrainConfig(layer="Mamba1", d_model=128, n_layer=2, d_state=16), vocab_size=256).ssm_cfg
        {'layer': 'Mamba1', 'd_state': 16, 'expand': 2}
    """
    from ..models import TransformerConfig
    from ..models.mixers import canonical_mixer_name

    if cfg.layer in ("transformer++", "gpt3"):
        return TransformerConfig(arch=cfg.layer, d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=vocab_size,
                                 num_heads=cfg.d_model // cfg.headdim,
                                 max_position_embeddings=max(2048, cfg.seqlen + cfg.sample_tokens))
    overrides = dict(cfg.model)
    ssm_overrides = dict(overrides.pop("ssm_cfg", None) or {})
    # `--model.ssm-cfg '{layer: S4D}'` names another mixer than --layer: the run's sizes that mixer takes too
    # (d_state, expand), not Mamba-2's headdim / chunk_size
    layer = ssm_overrides.get("layer", cfg.layer)
    ssm_cfg = {"layer": layer, "d_state": cfg.d_state, "expand": cfg.expand}
    try:
        mamba2 = canonical_mixer_name(layer) == "Mamba2"
    except ValueError:  # MambaConfig below says which names there are
        mamba2 = False
    if mamba2:
        ssm_cfg.update(headdim=cfg.headdim, chunk_size=cfg.chunk_size)
    fields = dict(d_intermediate=0, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                  pad_vocab_size_multiple=8, tie_embeddings=True)
    ssm_cfg.update(ssm_overrides)
    fields.update(overrides)
    return MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=vocab_size, ssm_cfg=ssm_cfg, **fields)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio.

    A pure function of the step (no scheduler object): resuming needs only the step count.

    Example:
        >>> cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
        >>> lr_at(0, cfg), lr_at(10, cfg), lr_at(110, cfg)
        (0.0001, 0.001, 0.0001)
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
