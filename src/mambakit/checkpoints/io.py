"""Files of a checkpoint directory: config JSON, and weights in safetensors or PyTorch pickles, single or sharded.

    model.safetensors                                   one safetensors file (mambakit, Hugging Face)
    model.safetensors.index.json + model-0000k-of-0000n.safetensors      sharded (Hugging Face)
    pytorch_model.bin                                   torch.save'd state dict (mamba_ssm, older HF)
    pytorch_model.bin.index.json + pytorch_model-0000k-of-0000n.bin      sharded PyTorch

`WeightFiles` reads names, shapes and dtypes first (safetensors headers, without touching the data), so
a checkpoint that does not fit its config is refused before anything large is read; tensors are then
loaded one at a time. Every problem is a `CheckpointError` that names the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["CONFIG_NAME", "GENERATION_CONFIG", "SAFETENSORS_NAME", "TORCH_NAME", "checkpoint_dir", "read_json",
           "write_json", "WeightFiles", "write_safetensors", "write_torch", "remove_weight_files", "floating_dtype",
           "is_disk_full", "disk_full_error", "fsync_tree", "staged_directory", "torch_save", "atomic_write"]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
GENERATION_CONFIG = "generation_config.json"
# Weight files as mambakit, mamba_ssm and transformers name them (shards included), and transformers'
# generation config: removed before a save so that nothing of an earlier checkpoint is read back later.
_CHECKPOINT_FILE = re.compile(r"(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)"
                              r"(\.index\.json)?\Z|generation_config\.json\Z")

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def checkpoint_dir(path) -> Path:
    """`path` as a local directory; anything else (a hub id, a file, a typo) is an error: nothing is downloaded."""
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a directory" if p.is_file() else "is not a local directory"
        raise CheckpointError(f"{str(path)!r} {what}; mambakit reads checkpoints from local directories only and "
                              "never downloads (fetch it first, e.g. `huggingface-cli download "
                              "state-spaces/mamba-130m-hf --local-dir mamba-130m-hf`, and pass that directory)")
    return p


def _decode_floats(obj: dict):
    # transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}; older versions write bare Infinity.
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_json(path: Path) -> dict:
    """A JSON object from `path`, with a clear error for a missing, unreadable or malformed file."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_hook=_decode_floats)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def atomic_write(path: Path, write) -> None:
    """Write through a temporary name and rename, so an interrupted save never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if is_disk_full(err):
            raise disk_full_error(path) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------- whole directories, full disks


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err` (or an exception it was raised from) is a full disk or an exhausted quota.

    safetensors and torch.save wrap the OSError of the failed write in their own exceptions (a
    SafetensorError saying "os error 28", a RuntimeError whose context is the OSError), hence the walk.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err).lower()
        if "no space left on device" in text or "os error 28" in text or "disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path) -> CheckpointError:
    return CheckpointError(f"no space left on device writing {path}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file of `directory` (not recursive) and the directory itself to the disk."""
    for p in directory.iterdir():
        if p.is_file():
            _fsync(p)
    _fsync(directory)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `out`; when the block succeeds, publish it as `out`.

    Everything is written into the staging directory first, so a full disk, an exception or a kill
    while writing leaves `out` as it was (and, except for a kill, no staging directory behind). On
    success a new `out` is the staging directory renamed (one atomic step); into an existing `out`
    the new files are moved one rename each, then weight files of the earlier save that the new one
    does not have are removed (other files are left alone). A full disk raises CheckpointError
    "no space left on device writing <out>".
    """
    out = Path(out)
    # beside the real directory (a symlinked `out` may live on another filesystem): renames stay on one disk
    place = out.resolve() if out.exists() else out
    stage = place.parent / f".{place.name}.staging"
    _rmtree(stage)  # left by a killed save
    try:
        stage.mkdir(parents=True)
        yield stage
        fsync_tree(stage)
    except BaseException as err:
        _rmtree(stage)
        if is_disk_full(err):
            raise disk_full_error(out) from None
        raise
    if not out.exists():
        os.rename(stage, out)
        _fsync(out.parent)
        return
    new = {p.name for p in stage.iterdir()}
    # data files before the index and the config that point at them
    order = sorted(new, key=lambda n: (n.endswith(".json"), n == CONFIG_NAME, n))
    for name in order:
        os.replace(stage / name, out / name)
    for p in out.iterdir():
        if p.is_file() and _CHECKPOINT_FILE.match(p.name) and p.name not in new:
            p.unlink()
    _fsync(out)
    _rmtree(stage)


# ---------------------------------------------------------------- reading weights


def _unreadable(err: BaseException) -> bool:
    """A file the OS refuses to open (permissions), as opposed to one whose bytes are wrong."""
    return isinstance(err, PermissionError) or "Permission denied" in str(err) or "os error 13" in str(err)


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt")
            self.infos = {k: (tuple(self._f.get_slice(k).get_shape()), _ST_DTYPES.get(self._f.get_slice(k).get_dtype()))
                          for k in self._f.keys()}
        except Exception as err:  # safetensors raises its own SafetensorError (or OSError) for a bad file
            if _unreadable(err):
                raise CheckpointError(f"{path}: cannot open this file for reading ({err}): check its permissions") from err
            raise CheckpointError(f"{path}: cannot read this safetensors file ({err}); it is truncated or corrupt: "
                                  "download or save it again") from err

    def load(self, name: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({err}); the file is corrupt") from err


class _TorchFile:
    def __init__(self, path: Path):
        self.path = path
        state = None
        try:
            try:  # mmap: a multi-GB pickle is paged in tensor by tensor instead of read whole
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # legacy (non-zip) pickles cannot be memory-mapped; anything else is real
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # zip, pickle and EOF errors all mean the same thing to the user
            if _unreadable(err):
                raise CheckpointError(f"{path}: cannot open this file for reading ({err}): check its permissions") from err
            raise CheckpointError(f"{path}: cannot read this PyTorch weights file ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:300]}); it is truncated or corrupt, or not a "
                                  "state dict") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
        self._state = state
        self.infos = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}

    def load(self, name: str) -> torch.Tensor:
        return self._state[name]


class WeightFiles:
    """The tensors of a checkpoint directory, over one file or the shards an index lists.

    Attributes:
        infos: name -> (shape, dtype) for every tensor, read without loading the data.
        description: the file(s) read, for messages.

    Example:
        >>> w = WeightFiles(Path("mamba-130m-hf"))
        >>> w.infos["backbone.norm_f.weight"]
        ((768,), torch.float32)
        >>> t = w.load("backbone.norm_f.weight")
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, _SafetensorsFile | _TorchFile] = {}
        for index_name, single_name, opener in ((SAFETENSORS_INDEX, SAFETENSORS_NAME, _SafetensorsFile),
                                                (TORCH_INDEX, TORCH_NAME, _TorchFile)):
            if (directory / single_name).is_file():
                self._open_single(single_name, opener)
                return
            if (directory / index_name).is_file():
                self._open_index(index_name, opener)
                return
        raise CheckpointError(f"{directory}: no weights found: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX} "
                              f"(with its shards), {TORCH_NAME} or {TORCH_INDEX}")

    def _open_single(self, name: str, opener) -> None:
        f = opener(self.directory / name)
        self.description = str(self.directory / name)
        self._where = {k: name for k in f.infos}
        self._files[name] = f
        self.infos = dict(f.infos)

    def _open_index(self, index_name: str, opener) -> None:
        index_path = self.directory / index_name
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: expected a non-empty \"weight_map\" of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard files listed but not found: {missing}")
        self.description = f"{index_path} ({len(shards)} shards)"
        self._where, self.infos = {}, {}
        for shard in shards:
            f = self._files[shard] = opener(self.directory / shard)
            listed = sorted(k for k, s in weight_map.items() if s == shard)
            absent = [k for k in listed if k not in f.infos]
            if absent:
                raise CheckpointError(f"{index_path}: lists {absent} in {shard}, which does not hold them")
            for k in listed:
                self._where[k] = shard
                self.infos[k] = f.infos[k]

    def load(self, name: str) -> torch.Tensor:
        """One tensor, on CPU, as stored."""
        return self._files[self._where[name]].load(name)


# ---------------------------------------------------------------- writing weights


def remove_weight_files(directory: Path) -> None:
    """Delete the weight files (single, sharded, index) and generation_config.json of an earlier save."""
    for p in directory.iterdir():
        if p.is_file() and _CHECKPOINT_FILE.match(p.name):
            p.unlink()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor],
                      max_shard_size: int | None = None) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards + index when they exceed `max_shard_size` bytes.

    Tensors must not share memory (safetensors stores each once): drop tied copies first.
    Returns the file names written.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt"}  # transformers refuses safetensors files without this
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if max_shard_size is not None and shards[-1] and size + _nbytes(t) > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    if len(shards) == 1:
        atomic_write(directory / SAFETENSORS_NAME, lambda tmp: save_file(shards[0], str(tmp), metadata=metadata))
        return [SAFETENSORS_NAME]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=metadata))
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    write_json(directory / SAFETENSORS_INDEX, index)
    return names + [SAFETENSORS_INDEX]


def torch_save(obj, path: Path) -> None:
    """torch.save through a Python file object: a failed write then keeps its OSError (errno) as the
    context of torch's RuntimeError, so that a full disk can be told apart (see `is_disk_full`)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_torch(directory: Path, state: dict[str, torch.Tensor]) -> list[str]:
    """Write `state` with torch.save as pytorch_model.bin (tensors that share memory are stored once)."""
    atomic_write(directory / TORCH_NAME, lambda tmp: torch_save(state, tmp))
    return [TORCH_NAME]


def floating_dtype(infos: Iterable[tuple[tuple[int, ...], torch.dtype | None]]) -> torch.dtype | None:
    """The floating dtype holding the most elements (the model's dtype; a few fp32 A_log/D do not decide it)."""
    count: dict[torch.dtype, int] = {}
    for shape, dtype in infos:
        if dtype is not None and dtype.is_floating_point:
            n = 1
            for s in shape:
                n *= s
            count[dtype] = count.get(dtype, 0) + n
    return max(count, key=count.get) if count else None
