"""mambakit.training: TrainConfig, recipes and the training loop (single process, or torchrun with DDP or FSDP2)."""

from .checkpoint import (
    TRAIN_STATE,
    Checkpoint,
    CheckpointFallbackWarning,
    holds_run,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, lr_at, model_config
from .loop import (
    Run,
    TrainingDiverged,
    TrainResult,
    build_optimizer,
    default_out_dir,
    forward_backward,
    resolve_device,
    train,
)
from .metrics import plot_metrics, read_metrics
from .recipes import RECIPES, default_recipe, get_recipe, tiny_recipe

__all__ = [
    "TrainConfig",
    "model_config",
    "lr_at",
    "RECIPES",
    "default_recipe",
    "tiny_recipe",
    "get_recipe",
    "train",
    "Run",
    "TrainResult",
    "read_metrics",
    "plot_metrics",
    "build_optimizer",
    "forward_backward",
    "resolve_device",
    "default_out_dir",
    "save_checkpoint",
    "load_train_state",
    "TRAIN_STATE",
    "Checkpoint",
    "CheckpointFallbackWarning",
    "resolve_checkpoint",
    "holds_run",
    "TrainingDiverged",
]
