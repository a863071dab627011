"""torchrun / DistributedDataParallel plumbing: who am I, and set up / tear down the process group.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); without them the run is a
single process and nothing here touches torch.distributed. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "dist_info_from_env", "init_distributed", "destroy_distributed", "all_reduce_mean"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process prints, writes checkpoints and samples."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment variables (defaults: one process)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(info: DistInfo, device: torch.device) -> bool:
    """Join the process group (when world_size > 1 and not yet joined). Returns whether this call created it."""
    if not info.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    return True


def destroy_distributed(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of `t` over ranks (a no-op for one process)."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / info.world_size
