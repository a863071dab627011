"""Named training recipes: functions returning a `TrainConfig` (no YAML).

`mambakit train --recipe NAME` looks names up in `RECIPES`; flags override single fields.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import TrainConfig

__all__ = ["default_recipe", "tiny_recipe", "finetune_recipe", "lora_recipe", "RECIPES", "get_recipe"]


def default_recipe() -> TrainConfig:
    """Byte-level Mamba LM on the built-in Shakespeare corpus: `mambakit train` with no arguments.

    Sized by measurement to finish (data loading, evaluation and saving included) in about
    5 minutes on a 2-core CPU and to reach about 2.2 bits per byte on the held-out plays; the
    time budget (540 s, stated in the README) stops it gracefully on a slower machine, and
    `mambakit train --resume` continues it.
    """
    return TrainConfig(
        recipe="shakespeare",
        layer="Mamba2",
        d_model=128,
        n_layer=2,
        # d_state 16 and 4 heads of 64 rather than 8 heads of 32 with d_state 64: a training step of this
        # model ran 1.3x faster on the 2-core CPU (SSD's chunked CPU path alone, several times faster)
        d_state=16,
        expand=2,
        headdim=64,
        chunk_size=64,
        seqlen=256,
        batch_size=16,
        lr=3e-3,
        warmup_steps=50,
        max_steps=1500,
        time_budget_s=540.0,
        eval_every=250,
        eval_tokens=32768,
        save_every=250,
        sample_prompt="**HAMLET**  \n",
    )


def tiny_recipe() -> TrainConfig:
    """A seconds-long smoke run (tests, checking an installation): tiny model, few steps."""
    return TrainConfig(
        recipe="tiny",
        layer="Mamba2",
        d_model=32,
        n_layer=1,
        d_state=16,
        expand=2,
        headdim=16,
        chunk_size=16,
        seqlen=64,
        batch_size=4,
        lr=3e-3,
        warmup_steps=5,
        max_steps=20,
        eval_every=0,
        eval_tokens=2048,
        final_eval_tokens=4096,
        eval_batch_size=8,
        log_every=5,
        sample_tokens=40,
    )


def finetune_recipe() -> TrainConfig:
    """Fine-tune every weight of a trained model (`mambakit train --init-from MODEL`): a tenth of the peak learning
    rate the published Mamba models were pretrained with (3e-3 at 130M; less for larger ones, so less here too for
    those), short warmup, no weight decay (it would pull the trained weights toward zero), held-out scores every 100
    steps. The model, its shape and its tokenizer come from init_from; the data default is the built-in Shakespeare
    corpus. benchmarks/cpu_finetune.py compares it with training from scratch (BENCHMARKS.md)."""
    return TrainConfig(
        recipe="finetune",
        tokenizer="init",
        seqlen=512,
        batch_size=8,
        lr=3e-4,
        min_lr_ratio=0.1,
        warmup_steps=20,
        max_steps=300,
        weight_decay=0.0,
        eval_every=100,
        eval_tokens=16384,
        save_every=100,
        sample_tokens=200,
    )


def lora_recipe() -> TrainConfig:
    """`finetune_recipe` with LoRA adapters of rank 8 (alpha 16) on in_proj, x_proj and dt_proj (those the model
    has) and the larger learning rate adapters take (`mambakit train --init-from MODEL --lora-rank 8`)."""
    return finetune_recipe().replace(recipe="lora", lora_rank=8, lora_alpha=16.0, lr=1e-3)


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "shakespeare": default_recipe,
    "tiny": tiny_recipe,
    "finetune": finetune_recipe,
    "lora": lora_recipe,
}


def get_recipe(name: str) -> TrainConfig:
    """The TrainConfig of recipe `name`; KeyError listing the known names otherwise."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()
