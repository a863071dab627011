"""Training checkpoints, each written as one unit and published by one rename.

    out_dir/checkpoints/step-000250/         one complete checkpoint:
        config.json, model.safetensors       the model (MambaLM.save_pretrained)
        tokenizer_config.json (+ tokenizer.json)
        train_config.json, config.yaml       the TrainConfig, for people and for `mambakit train --config`
        adapter_config.json,                 a LoRA run's adapter in peft's layout (model.safetensors holds the
        adapter_model.safetensors            base with the adapter merged in); training/finetune.py
        train_state.pt                       step, optimizer state, data-sampler generator, RNG states, TrainConfig
        distributed/                         with --parallel fsdp: model and optimizer state written by every
                                             process through torch.distributed.checkpoint (then train_state.pt
                                             holds optimizer None); it loads onto any number of processes
        manifest.json                        step, and the size and sha256 of every file above
    out_dir/checkpoints/latest               the name of the newest complete checkpoint (one line)
    out_dir/config.json, model.safetensors, tokenizer files, train_config.json, config.yaml
                                             the newest checkpoint's model, published at the top (hard links)
                                             so that `MambaLM.from_pretrained(out_dir)` and
                                             `mambakit generate --model out_dir` read the run directory itself

A save writes `step-N.tmp/`, fsyncs it, renames it to `step-N/` (the atomic step), then replaces `latest`
(write + os.replace) and the files at the top (one os.replace each), and finally removes the checkpoints
beyond the newest `keep`. A kill at any point leaves the previous checkpoint complete; `resolve_checkpoint`
checks the manifest (sizes, hashes, step numbers) and falls back, with a warning, to the newest
checkpoint that passes. A full disk raises CheckpointError "no space left on device writing ..." and
leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import CheckpointError
from ..checkpoints.io import GENERATION_CONFIG, disk_full_error, fsync_tree, is_disk_full, torch_save
from ..checkpoints.tokenizer_files import TOKENIZER_FILES, save_checkpoint_fields
from .config import TrainConfig
from .finetune import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["TRAIN_STATE", "PUBLISHED", "CHECKPOINTS", "DISTRIBUTED", "Checkpoint", "CheckpointFallbackWarning", "save_checkpoint",
           "save_sharded_checkpoint", "load_sharded_state", "load_train_state", "resolve_checkpoint", "holds_run", "remove_strays",
           "keep_own_implementation"]

TRAIN_STATE = "train_state.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
DISTRIBUTED = "distributed"  # torch.distributed.checkpoint's files (--parallel fsdp)
# what the top of a run directory holds of the newest checkpoint (a loadable model directory)
PUBLISHED = ("config.json", "model.safetensors", "train_config.json", "config.yaml", ADAPTER_CONFIG,
             ADAPTER_WEIGHTS, GENERATION_CONFIG) + TOKENIZER_FILES
_STEP_DIR = re.compile(r"step-(\d+)(?:-(\d+))?\Z")
_HASH_CHUNK = 1 << 20


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was incomplete or corrupt; an older complete one is used instead."""


@dataclass
class Checkpoint:
    """A verified checkpoint: its directory and the contents of its train_state.pt."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _replace_file(path: Path, text: str) -> None:
    """Replace `path` atomically (write a temporary file, fsync, os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _step_dirs(root: Path) -> list[tuple[tuple[int, int], Path]]:
    """Complete-looking checkpoint directories (not *.tmp), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return sorted(found)


def remove_strays(out_dir: str | Path) -> list[str]:
    """Remove what a killed save leaves behind (step-*.tmp and .*.staging directories, .*.tmp files); returns them."""
    out_dir = Path(out_dir)
    removed = []
    root = out_dir / CHECKPOINTS
    for directory in (root, out_dir):
        if not directory.is_dir():
            continue
        for p in directory.iterdir():
            if p.name.endswith((".tmp", ".staging")) and p.name.startswith((".", "step-")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(str(p))
    return removed


def holds_run(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a training run (checkpoints, a train_state.pt or a model)."""
    out_dir = Path(out_dir)
    return any((out_dir / name).exists() for name in (CHECKPOINTS, TRAIN_STATE, "model.safetensors", "metrics.json",
                                                       "metrics.jsonl"))


def _train_state(step: int, optimizer_state: dict | None, sampler_state: dict, config: TrainConfig, history: dict,
                 world_size: int, init: dict | None = None) -> dict:
    return {
        "step": step,
        "optimizer": optimizer_state,  # None: it is in distributed/
        "sampler": sampler_state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": config.to_dict(),
        "history": history,
        # the global batch of a step, so that a resume onto another number of processes can check it reads the same
        "global_batch": config.batch_size * config.grad_accum * world_size,
        # a LoRA run's base: {"from": init_from, "fingerprint": sha256 of its weights} (training/finetune.py)
        "init": init,
    }


def _new_name(root: Path, step: int) -> str:
    base = f"step-{step:06d}"
    taken = {p.name for _, p in _step_dirs(root)}
    # a directory of this step may exist (a resumed run that had fallen back past it): never touch it
    return base if base not in taken else next(f"{base}-{k}" for k in range(1, 10**6) if f"{base}-{k}" not in taken)


def _write_rest(tmp: Path, *, model, tokenizer, config: TrainConfig, state: dict, adapter=None) -> None:
    """Everything of a checkpoint but the sharded files: the model, tokenizer, configs, train state, manifest (and a
    LoRA run's adapter)."""
    # creates tmp when it does not exist yet (the direct path: no staging directory, the save stays short);
    # after torch.distributed.checkpoint's files it adds the model beside them
    model.save_pretrained(tmp)
    if adapter is not None:
        from .finetune import save_adapter

        save_adapter(adapter, tmp)
    tokenizer.save(tmp)
    save_checkpoint_fields(tokenizer, tmp)  # a fine-tuned chat model keeps its chat template and stop tokens
    _write_file(tmp / "train_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    _write_file(tmp / "config.yaml", config.to_yaml())
    torch_save(state, tmp / TRAIN_STATE)
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_file(tmp / MANIFEST, json.dumps({"step": state["step"], "files": files}, indent=2) + "\n")


def _commit(out_dir: Path, root: Path, tmp: Path, name: str, keep: int) -> Path:
    for directory in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsync_tree(directory)
    os.rename(tmp, root / name)
    fsync_tree(root)
    _replace_file(root / LATEST, name + "\n")
    _publish(out_dir, root / name)
    _prune(root, keep, name)
    return root / name


def _cleanup_failed_save(out_dir: Path, root: Path, tmp: Path, name: str, err: BaseException) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for p in out_dir.glob(".*.tmp"):
        p.unlink()
    if is_disk_full(err):
        raise disk_full_error(root / name) from None


def save_checkpoint(out_dir: str | Path, *, model, tokenizer, optimizer: torch.optim.Optimizer, sampler_state: dict,
                    step: int, config: TrainConfig, history: dict, keep: int = 2, world_size: int = 1, adapter=None,
                    init: dict | None = None) -> Path:
    """Write everything needed to use the model and to resume training from `step`, as one unit.

    A LoRA run passes its peft model as `adapter` (written in peft's layout beside the merged `model`) and its base's
    {"from", "fingerprint"} as `init` (kept in train_state.pt).

    Returns the new checkpoint directory (out_dir/checkpoints/step-NNNNNN). The previous checkpoint stays
    until this one is complete; afterwards only the newest `keep` (>= 1) remain. Called by one process.

    Example:
        >>> save_checkpoint("runs/x", model=model, tokenizer=tok, optimizer=opt, sampler_state=sampler.state_dict(),
        ...                 step=100, config=cfg, history={"losses": [], "evals": []})
        PosixPath('runs/x/checkpoints/step-000100')
    """
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}")
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINTS
    name = _new_name(root, step)
    tmp = root / (name + ".tmp")
    state = _train_state(step, optimizer.state_dict(), sampler_state, config, history, world_size, init)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_strays(out_dir)
        _write_rest(tmp, model=model, tokenizer=tokenizer, config=config, state=state, adapter=adapter)
        return _commit(out_dir, root, tmp, name, keep)
    except BaseException as err:
        _cleanup_failed_save(out_dir, root, tmp, name, err)
        raise


def save_sharded_checkpoint(out_dir: str | Path, *, model, model_config, tokenizer, optimizer: torch.optim.Optimizer,
                            sampler_state: dict, step: int, config: TrainConfig, history: dict, keep: int = 2,
                            rank: int = 0, world_size: int = 1) -> Path:
    """`save_checkpoint` for a model wrapped by FSDP2 (or any model, any number of processes): called by every process.

    Model and optimizer state go to `distributed/` through torch.distributed.checkpoint, each process writing its
    own shards (no process holds the whole optimizer state); rank 0 then gathers the full weights once more for the
    loadable model.safetensors, writes the rest and publishes the checkpoint as `save_checkpoint` does.

    Example (every rank, after fully_shard):
        >>> save_sharded_checkpoint("runs/x", model=model, model_config=model.config, tokenizer=tok, optimizer=opt,
        ...                         sampler_state=s, step=100, config=cfg, history=h, rank=rank, world_size=2)
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    if keep < 1:
        raise ValueError(f"save_sharded_checkpoint: keep must be >= 1, got {keep}")
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINTS
    distributed = dist.is_available() and dist.is_initialized()
    names = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_strays(out_dir)
        names[0] = _new_name(root, step)
    if distributed:
        dist.broadcast_object_list(names, src=0)
    name = names[0]
    tmp = root / (name + ".tmp")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / DISTRIBUTED,
             no_dist=not distributed)
    # the whole model on rank 0's CPU (every rank takes part in the gathers)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    error = None
    if rank == 0:
        from ..models import MambaLM

        try:
            plain = MambaLM(model_config)
            plain.load_state_dict(full)
            state = _train_state(step, None, sampler_state, config, history, world_size)
            _write_rest(tmp, model=plain, tokenizer=tokenizer, config=config, state=state)
            _commit(out_dir, root, tmp, name, keep)
        except BaseException as err:
            error = err
            try:
                _cleanup_failed_save(out_dir, root, tmp, name, err)
            except BaseException as replaced:
                error = replaced
    if distributed:
        # the other ranks wait for the checkpoint to be complete (or not) before going on
        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0)
        if failed[0] and error is None:
            raise CheckpointError(f"rank 0 failed to write the checkpoint {root / name}")
    if error is not None:
        raise error
    return root / name


def load_sharded_state(path: str | Path, model, optimizer: torch.optim.Optimizer) -> None:
    """Load `path`/distributed/ (written by `save_sharded_checkpoint` on any number of processes) into `model` and
    `optimizer`: FSDP2-sharded, DDP-replicated or plain, on this run's processes (every rank calls it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    distributed = dist.is_available() and dist.is_initialized()
    dcp.load(state, checkpoint_id=Path(path) / DISTRIBUTED, no_dist=not distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def keep_own_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After loading an optimizer's state: give its param groups back this optimizer's implementation flags (fused,
    foreach, capturable) and put each step count where that implementation keeps it (on the parameter's device
    when fused or capturable, else on the CPU).

    `Optimizer.load_state_dict` takes every group setting from the saved state, these included, so a checkpoint of a
    CPU foreach run resumed on CUDA stepped with foreach there while the loop, reading `defaults`, took it for
    fused AdamW (whose `found_inf` a foreach step refuses). They say how a step is computed on this machine, not
    what it computes."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach", "capturable"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and type(state.get("step")) is torch.Tensor:  # (not a DTensor: FSDP2 keeps those as they are)
                state["step"] = state["step"].to(dtype=torch.float32, device=param.device if on_device else "cpu")


def _publish(out_dir: Path, checkpoint: Path) -> None:
    """Make out_dir's model files those of `checkpoint`: a hard link per file (a copy where links are not
    possible) under a temporary name, then os.replace, so each file at the top is always whole."""
    for name in PUBLISHED:
        src = checkpoint / name
        if not src.is_file():
            continue
        tmp = out_dir / f".{name}.tmp"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, out_dir / name)
    legacy = out_dir / TRAIN_STATE  # the layout before checkpoints/: its state now lives in the checkpoint
    if legacy.is_file():
        legacy.unlink()


def _prune(root: Path, keep: int, current: str) -> None:
    dirs = _step_dirs(root)
    for _, p in dirs[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def _verify(directory: Path) -> Checkpoint:
    """The checkpoint in `directory` if its manifest, files and step numbers agree; CheckpointError otherwise."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        step, files = int(manifest["step"]), dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: missing or unreadable ({type(err).__name__})") from None
    m = _STEP_DIR.match(directory.name)
    if m is None or int(m.group(1)) != step:
        raise CheckpointError(f"{manifest_path}: step {step} does not match the directory name")
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != info.get("size"):
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.get('size')}")
        if _sha256(path) != info.get("sha256"):
            raise CheckpointError(f"{path}: contents differ from the manifest (sha256)")
    if TRAIN_STATE not in files:
        raise CheckpointError(f"{manifest_path}: lists no {TRAIN_STATE}")
    state = _load_state_file(directory / TRAIN_STATE)
    if state.get("step") != step:
        raise CheckpointError(f"{directory / TRAIN_STATE}: step {state.get('step')}, the manifest says {step}")
    return Checkpoint(directory, state)


def _load_state_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle, EOF errors: the file is damaged
        raise CheckpointError(f"{path}: cannot read it ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                              "it is truncated or corrupt") from None
    required = ("step", "optimizer", "sampler", "torch_rng", "config", "history")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise CheckpointError(f"{path}: not a mambakit training state (expected the keys {required})")
    return state


def resolve_checkpoint(out_dir: str | Path) -> Checkpoint:
    """The checkpoint to resume the run in `out_dir` from, verified.

    The one `checkpoints/latest` names; when it is incomplete or corrupt, the newest complete one, with
    a `CheckpointFallbackWarning` saying why. A run directory in the layout before checkpoints/ (a bare
    out_dir/train_state.pt) is read as it is. FileNotFoundError when there is no checkpoint at all;
    CheckpointError when none is complete.

    Example:
        >>> ckpt = resolve_checkpoint("runs/shakespeare")
        >>> ckpt.path, ckpt.step
        (PosixPath('runs/shakespeare/checkpoints/step-001500'), 1500)
    """
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINTS
    candidates = [p for _, p in reversed(_step_dirs(root))]
    pointed = None
    try:
        pointed = root / (root / LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        pass
    if pointed is not None and pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    if not candidates:
        if (out_dir / TRAIN_STATE).is_file():
            return Checkpoint(out_dir, _load_state_file(out_dir / TRAIN_STATE))
        raise FileNotFoundError(f"no checkpoint in {out_dir} (no {CHECKPOINTS}/ and no {TRAIN_STATE}): nothing to resume")
    problems = []
    for directory in candidates:
        try:
            ckpt = _verify(directory)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems or (pointed is not None and directory != pointed):
            why = "; ".join(problems) if problems else f"{LATEST} names {pointed.name}, which is missing"
            warnings.warn(CheckpointFallbackWarning(
                f"using checkpoint {directory.name} (step {ckpt.step}): a newer one is incomplete or corrupt ({why})"),
                stacklevel=2)
        return ckpt
    raise CheckpointError(f"no complete checkpoint in {root}: " + "; ".join(problems))


def load_train_state(out_dir: str | Path) -> dict:
    """The train_state dict of the checkpoint `resolve_checkpoint(out_dir)` picks (tensors on CPU)."""
    return resolve_checkpoint(out_dir).state
