"""torchrun plumbing: who am I, set up / tear down the process group, and wrap the model (DDP or FSDP2).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); without them the run is a
single process and nothing here touches torch.distributed. NCCL on CUDA, gloo on CPU (FSDP2
included: fully_shard's all-gathers and reduce-scatters run over gloo, which is what the CPU tests use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "dist_info_from_env", "init_distributed", "destroy_distributed", "all_reduce_mean",
           "wrap_model"]


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


def destroy_distributed(created: bool, finished: bool = False) -> None:
    """Leave the process group this process created. finished: every rank got to the end of its run, so all wait
    for the slowest first (rank 0 writes the metrics, plot and sample alone, and hosts the store the others' teardown
    still talks to: a rank tearing down ahead of it was seen to abort, under load, with "terminate called without an
    active exception"). After an error no rank waits: the others may never arrive."""
    if created and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of `t` over ranks (a no-op for one process)."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / info.world_size


def wrap_model(model: torch.nn.Module, cfg, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The model as the training step calls it: itself for one process, DistributedDataParallel for
    cfg.parallel "ddp", or sharded in place by FSDP2 for "fsdp".

    FSDP2: `fully_shard` on each block of `model.backbone.layers` (a block's parameters are gathered just
    before its forward and backward and freed after), then on the root (embedding, final norm, head).
    With cfg.fsdp_mixed_precision "bf16" on CUDA the gathered parameters are cast to bf16 for compute
    and gradients are reduced in fp32 (the sharded fp32 parameters stay the optimizer's master copy).
    cfg.fsdp_reshard_after_forward True (the default, FSDP2's own) frees a block's gathered parameters after its
    forward and gathers them again for its backward. False keeps them from its forward to its backward: one all-gather per block and step instead of two, and less of FSDP2's per-parameter work
    on the host (on CPU, 24 blocks: 82k Python calls per step instead of 92k; a bare model makes 27k), for a
    bf16 copy of the blocks' parameters held through the step on every GPU (2 bytes per parameter: 0.26 GB at
    130M). On one H200 False measured slower (54.6k vs 59.6k tok/s, 130M Mamba-2, one run each, BENCHMARKS.md),
    so it is not the default; benchmarks/gpu_parallel.py's "fsdp" and "fsdp-reshard" cases measure both.

    Example (under torchrun, after init_distributed):
        >>> model = wrap_model(MambaLM(config).cuda(), TrainConfig(parallel="fsdp"), dist_info_from_env(), device)
    """
    if not info.distributed:
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if cfg.fsdp_mixed_precision == "bf16" and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    reshard = cfg.fsdp_reshard_after_forward
    for block in model.backbone.layers:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
    return model
