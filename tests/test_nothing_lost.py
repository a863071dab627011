"""Nothing lost: checkpoints as one unit (kills, corruption, a full disk), divergence, signals, runs never
overwritten, outputs checked up front, and every bad input answered with one line (CLI) or a ValueError (API)."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoints import CheckpointError, convert_checkpoint
from mambakit.cli.__main__ import main
from mambakit.data import ByteTokenizer
from mambakit.generation import generate, stream
from mambakit.training import (
    CheckpointFallbackWarning,
    TrainConfig,
    TrainingDiverged,
    load_train_state,
    resolve_checkpoint,
    train,
)
from mambakit.training.loop import write_metrics

REPO = Path(__file__).resolve().parents[1]


def _corpus(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        (directory / f"d{i:02d}.txt").write_text(f"the rest is silence, line {i}\n" * 30)
    return str(directory)


def _tiny(tmp_path: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(recipe="test", data=_corpus(tmp_path / "data"), layer="mamba2", d_model=16, n_layer=1, d_state=8,
                      expand=2, headdim=8, chunk_size=16, seqlen=32, batch_size=4, lr=1e-2, warmup_steps=3,
                      max_steps=12, eval_every=0, eval_tokens=256, final_eval_tokens=256, eval_batch_size=4,
                      log_every=5, progress=False, sample_tokens=0, val_fraction=0.1, out_dir=str(tmp_path / "run"))
    return cfg.replace(**changes)


def _strays(out: Path) -> list[str]:
    names = [p.name for p in out.rglob("*")]
    return [n for n in names if n.endswith((".tmp", ".staging")) or n.startswith(".mambakit-probe")]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"  # a fixed thread count: these runs are compared bit for bit with in-process ones
    return env


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mambakit.cli", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# ---------------------------------------------------------------- checkpoints as one unit


@pytest.mark.slow
def test_checkpoints_are_step_directories_with_a_manifest_a_pointer_and_the_model_on_top(tmp_path):
    cfg = _tiny(tmp_path, save_every=4, keep_checkpoints=2)
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000008", "step-000012"]  # keep-last-2
    assert (root / "latest").read_text() == "step-000012\n"
    manifest = json.loads((root / "step-000012" / "manifest.json").read_text())
    assert manifest["step"] == 12
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "train_config.json", "train_state.pt"):
        assert manifest["files"][name]["size"] == (root / "step-000012" / name).stat().st_size
    # the run directory itself is a model directory holding the newest checkpoint's files
    top, inner = tmp_path / "run" / "model.safetensors", root / "step-000012" / "model.safetensors"
    assert top.read_bytes() == inner.read_bytes()
    assert MambaLM.from_pretrained(tmp_path / "run").config.d_model == 16
    assert _strays(tmp_path / "run") == []


CORRUPTIONS = [
    pytest.param("truncate-weights", id="truncated-weights"),
    pytest.param("flip-train-state", id="flipped-byte-in-train-state"),
    pytest.param("no-manifest", id="manifest-missing"),
    pytest.param("garbage-train-state", id="train-state-replaced"),
    pytest.param("pointer-to-nothing", id="latest-names-a-missing-directory"),
]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> str:
    """One corpus directory for the runs compared with `full_losses` (the held-out split depends on the paths)."""
    return _corpus(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture(scope="module")
def full_losses(tmp_path_factory, shared_data) -> list[float]:
    """The losses of the uninterrupted `_tiny` run on `shared_data`."""
    return train(_tiny(tmp_path_factory.mktemp("full"), data=shared_data)).losses


@pytest.mark.slow
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_resume_falls_back_to_the_previous_complete_checkpoint_and_repeats_the_run(tmp_path, how, shared_data,
                                                                                    full_losses):
    cfg = _tiny(tmp_path, save_every=4, data=shared_data)
    train(cfg, stop_at_step=8)  # checkpoints of steps 4 and 8
    newest = tmp_path / "run" / "checkpoints" / "step-000008"
    if how == "truncate-weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "flip-train-state":
        data = bytearray((newest / "train_state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "train_state.pt").write_bytes(bytes(data))
    elif how == "no-manifest":
        (newest / "manifest.json").unlink()
    elif how == "garbage-train-state":
        (newest / "train_state.pt").write_bytes(b"not a checkpoint")
    else:
        import shutil

        shutil.rmtree(newest)
        (tmp_path / "run" / "checkpoints" / "latest").write_text("step-000008\n")
    with pytest.warns(CheckpointFallbackWarning, match="step-000004"):
        ckpt = resolve_checkpoint(tmp_path / "run")
    assert ckpt.step == 4
    with pytest.warns(CheckpointFallbackWarning):
        rest = train(TrainConfig.from_dict(ckpt.state["config"]), resume=True)
    assert rest.losses == full_losses  # every step's loss, bit for bit


@pytest.mark.slow
def test_resume_with_no_complete_checkpoint_is_one_line(tmp_path, capsys):
    train(_tiny(tmp_path))
    (tmp_path / "run" / "checkpoints" / "step-000012" / "train_state.pt").write_bytes(b"\x00" * 100)
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambakit train: error: no complete checkpoint in") and err.count("\n") == 1
    assert "train_state.pt" in err


@pytest.mark.slow
def test_resume_reads_the_layout_before_step_directories(tmp_path, shared_data, full_losses):
    """A run saved before checkpoints/ existed (train_state.pt beside the model) still resumes."""
    cfg = _tiny(tmp_path, data=shared_data)
    train(cfg, stop_at_step=5)
    run = tmp_path / "run"
    step_dir = run / "checkpoints" / "step-000005"
    os.replace(step_dir / "train_state.pt", run / "train_state.pt")
    import shutil

    shutil.rmtree(run / "checkpoints")
    rest = train(TrainConfig.from_dict(load_train_state(run)["config"]), resume=True)
    assert rest.losses == full_losses
    assert not (run / "train_state.pt").exists() and (run / "checkpoints" / "step-000012").is_dir()


@pytest.mark.slow
def test_sigkill_at_random_points_of_saves_never_loses_the_run(tmp_path):
    """SIGKILLs until the run is over (each at a random moment of the 0.25 s after a save began,
    tests/save_killer.py): after every kill the newest checkpoint verifies and the model on top reads; a child
    that finds the run finished (or finishes it) ends the rounds cleanly; the resumed run's losses equal an
    uninterrupted run's exactly; nothing stray is left. (With 25 rounds the kills once outlasted the 70 steps
    on a loaded CI machine and the killer waited for a child it had already reaped: now every run takes that
    path.)"""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "save_killer.py"), str(tmp_path), "400", "0"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ended_between_kills"] is True, result
    assert result["kills"] >= 15, result
    assert result["partial_saves_killed"] >= 2, result  # kills did land inside saves
    assert result["steps"] == sorted(result["steps"]) and result["steps"][-1] > 2  # the run advanced across kills
    assert result["resumed"] == result["full"] and len(result["full"]) == 70
    assert result["stray_after"] is False


# ---------------------------------------------------------------- a full disk


class _SmallDisk:
    """A directory on a disk that `fill()` makes full: a real 4 MiB tmpfs where mounting works (root), else
    writes of the checkpoint writers under it raise ENOSPC (injected). `how` says which."""

    def __init__(self, path: Path, monkeypatch):
        self.path = path
        path.mkdir()
        mounted = False
        # MAMBAKIT_TEST_INJECT_ENOSPC=1 exercises the injected path where mounting would work
        if hasattr(os, "geteuid") and os.geteuid() == 0 and not os.environ.get("MAMBAKIT_TEST_INJECT_ENOSPC"):
            try:
                mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                                         capture_output=True).returncode == 0
            except OSError:  # no mount command
                mounted = False
        self.how = "tmpfs" if mounted else "injected"
        self.full = False
        if not mounted:
            self._inject(monkeypatch)

    def _inject(self, monkeypatch) -> None:
        import safetensors.torch

        import mambakit.checkpoints.io as io
        import mambakit.training.checkpoint as ckpt

        def failing(real):
            def write(obj, path, *args, **kwargs):
                if self.full and str(path).startswith(str(self.path)):
                    Path(path).write_bytes(b"\0" * 100)  # a partial write, as a full disk leaves
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(obj, path, *args, **kwargs)
            return write

        monkeypatch.setattr(safetensors.torch, "save_file", failing(safetensors.torch.save_file))
        monkeypatch.setattr(io, "torch_save", failing(io.torch_save))
        monkeypatch.setattr(ckpt, "torch_save", failing(ckpt.torch_save))

    def fill(self, leave: int = 16384) -> None:
        """Leave `leave` bytes free (enough for small JSON files, not for weights)."""
        self.full = True
        if self.how == "tmpfs":
            with open(self.path / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            size = (self.path / "filler").stat().st_size
            os.truncate(self.path / "filler", max(0, size - leave))

    def close(self) -> None:
        if self.how == "tmpfs":
            subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    disk = _SmallDisk(tmp_path / "disk", monkeypatch)
    yield disk
    disk.close()


@pytest.mark.slow
def test_full_disk_during_a_training_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, small_disk, capsys):
    out = small_disk.path / "run"
    data = _corpus(tmp_path / "data")
    args = ["train", "--recipe", "tiny", "--data", data, "--max-steps", "4", "--seqlen", "16", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    before = (out / "model.safetensors").read_bytes()
    small_disk.fill()
    # a longer run from the checkpoint: its saves fail on the full disk
    state = load_train_state(out)
    cfg = TrainConfig.from_dict(state["config"]).replace(max_steps=8, out_dir=str(out))
    with pytest.raises(CheckpointError, match="no space left on device writing"):
        train(cfg, resume=True)
    assert resolve_checkpoint(out).step == 4  # the previous checkpoint, complete, verified
    assert (out / "model.safetensors").read_bytes() == before
    assert _strays(out) == [], small_disk.how
    # the command line says it in one line, exit 2 (the run directory stays resumable)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0  # nothing left to train: no save
    assert main(["train", "--recipe", "tiny", "--data", data, "--max-steps", "3", "--seqlen", "16",
                 "--out", str(small_disk.path / "run2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"mambakit train: error: no space left on device writing {small_disk.path / 'run2'}" in err
    assert err.count("\n") == 1, err


def test_full_disk_during_convert_onto_an_existing_checkpoint_leaves_it_whole(tmp_path, small_disk, capsys):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba2", "headdim": 32}))
    model.save_pretrained(tmp_path / "src", tokenizer=ByteTokenizer())
    dst = small_disk.path / "dst"
    convert_checkpoint(tmp_path / "src", dst, to="mambakit")
    files = {p.name: p.read_bytes() for p in dst.iterdir()}
    small_disk.fill()
    assert main(["convert", str(tmp_path / "src"), str(dst), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err == f"mambakit convert: error: no space left on device writing {dst}\n"
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == files  # the earlier checkpoint, untouched
    assert [p.name for p in small_disk.path.iterdir() if p.name != "filler"] == ["dst"]  # no staging left
    with pytest.raises(CheckpointError, match="no space left on device writing"):
        model.save_pretrained(dst, format="hf")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == files


def test_save_pretrained_onto_an_existing_directory_replaces_the_weights_and_keeps_other_files(tmp_path):
    torch.manual_seed(0)
    a = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=256, ssm_cfg={"layer": "Mamba1"}))
    b = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=256, ssm_cfg={"layer": "Mamba1"}))
    a.save_pretrained(tmp_path / "m", max_shard_size=20_000)  # shards + index
    (tmp_path / "m" / "notes.txt").write_text("mine")
    b.save_pretrained(tmp_path / "m")  # one file: the shards of the earlier save go
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "model.safetensors", "notes.txt"]
    loaded = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert torch.equal(loaded["backbone.embedding.weight"], b.backbone.embedding.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ---------------------------------------------------------------- divergence


@pytest.mark.slow
def test_a_nan_run_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    data = _corpus(tmp_path / "data")

    def args(out_dir, *extra):
        return ["train", "--recipe", "tiny", "--data", data, "--seqlen", "16", "--out", str(out_dir), "--no-progress",
                *extra]

    assert main(args(out, "--max-steps", "4")) == 0
    # the same run continued with an absurd learning rate, through the API: the loss becomes NaN within steps
    cfg = TrainConfig.from_dict(load_train_state(out)["config"]).replace(lr=1e30, max_steps=30, save_every=1)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ .*the last checkpoint \(step \d+\)"):
        train(cfg, resume=True)
    ckpt = resolve_checkpoint(out)
    weights = load_file(str(ckpt.path / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(math.isfinite(x) for x in ckpt.state["history"]["losses"])
    # on the command line: one line, exit 1, the checkpoint untouched, no NaN written anywhere
    capsys.readouterr()
    assert main(args(tmp_path / "nan", "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    assert err.startswith("mambakit train: error: training diverged at step 2 ") and err.count("\n") == 1
    assert "no checkpoint was written" in err and "--skip-nonfinite" in err
    assert not (tmp_path / "nan" / "metrics.json").exists() and not (tmp_path / "nan" / "model.safetensors").exists()


@pytest.mark.slow
def test_skip_nonfinite_skips_the_bad_steps_and_writes_strict_json(tmp_path, monkeypatch):
    import mambakit.training.loop as loop

    real = loop.forward_backward
    calls = []

    def poisoned(model, window, *args, **kwargs):
        calls.append(1)
        loss = real(model, window, *args, **kwargs)
        if len(calls) in (3, 7):  # two steps whose gradients are NaN
            next(model.parameters()).grad.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(loop, "forward_backward", poisoned)
    result = train(_tiny(tmp_path, on_nonfinite="skip"))
    assert result.step == 12 and result.skipped_steps == 2
    assert [math.isnan(x) for x in result.losses] == [i in (2, 6) for i in range(12)]
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["skipped_steps"] == 2


def _poison_step(run, nan: bool) -> None:
    """Fill the embedding with NaN (every later loss is NaN) or give it back its saved values."""
    weight = run.raw_model.backbone.embedding.weight
    if nan:
        run._good = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(torch.full_like(weight, float("nan")) if nan else run._good)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_the_nonfinite_check_stays_on_the_device_until_the_next_record(tmp_path, mode):
    """Fused AdamW (the optimizer on CUDA and on the CPU) leaves a non-finite step unapplied by itself, so `step`
    reads no flag: steps 3 and 4 run before the host hears of step 3's NaN at the record of step 5. With "stop"
    step 4 (finite again) is left unapplied too, and the error names step 3; with "skip" only step 3 is skipped."""
    from mambakit.training import Run

    run = Run(_tiny(tmp_path, on_nonfinite=mode, log_every=5))
    try:
        assert run.device_checks
        run.step()
        run.step()
        run._flush()
        before = {n: p.detach().clone() for n, p in run.raw_model.named_parameters()}
        _poison_step(run, nan=True)
        run.step()  # step 3: NaN
        _poison_step(run, nan=False)
        run.step()  # step 4: finite
        assert run.skipped == 0 and [s for s, *_ in run._pending] == [3, 4]  # nothing read yet
        changed = {n for n, p in run.raw_model.named_parameters() if not torch.equal(p, before[n])}
        if mode == "stop":
            assert not changed
            with pytest.raises(TrainingDiverged, match=r"training diverged at step 3 \(loss nan"):
                run.step()  # step 5: its record reads the flags
        else:
            assert changed  # step 4 applied
            run.step()
            assert run.skipped == 1 and run.skipped_in_a_row == 0 and run._pending == []
            assert [math.isnan(x) for x in run.history["losses"]] == [False, False, True, False, False]
    finally:
        run.close()


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["mamba1", "mamba2"])
def test_gpu_an_eager_step_never_waits_for_the_gpu(tmp_path, layer):
    """`--no-cuda-graph` (and every torchrun step): between records the host reads nothing back, so it queues the
    next step while the GPU runs this one. torch's sync debug mode names any synchronising call in steps 2-4."""
    import warnings

    from mambakit.training import Run

    run = Run(_tiny(tmp_path, layer=layer, device="cuda", cuda_graph=False, log_every=5))
    try:
        run.step()  # the first step compiles the kernels and fills the allocator's cache
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    run.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # torch warns "called a synchronizing CUDA operation" per call; its one-off notice that the debug mode is a
        # prototype (the first time a process turns it on) is not one
        syncs = [str(w.message) for w in seen if "called a synchronizing" in str(w.message).lower()]
        assert syncs == [], syncs
        assert [s for s, *_ in run._pending] == [1, 2, 3, 4]  # the first record is at step 5 (log_every)
        run.step()
        assert run._pending == [] and len(run.history["losses"]) == 5 and run.skipped == 0
    finally:
        run.close()


def test_an_optimizer_that_cannot_skip_on_the_device_is_checked_after_every_step(tmp_path):
    """Foreach AdamW (what FSDP2's sharded parameters get) has no found_inf: the loop reads the flag after each step
    and applies the step only when finite, counting it there; the losses still wait for the next record (under
    torchrun reading them is a collective)."""
    from mambakit.training import Run

    from tests.helpers import use_foreach_adamw

    run = Run(_tiny(tmp_path, on_nonfinite="skip"))
    try:
        use_foreach_adamw(run)
        assert not run.device_checks
        run.step()
        assert run.skipped == 0 and [(s, f) for s, _, _, f in run._pending] == [(1, None)]
        before = {n: p.detach().clone() for n, p in run.raw_model.named_parameters()}
        _poison_step(run, nan=True)
        run.step()
        assert run.skipped == 1 and run.skipped_in_a_row == 1 and len(run._pending) == 2
        _poison_step(run, nan=False)
        assert all(torch.equal(p, before[n]) for n, p in run.raw_model.named_parameters())
        run.step()
        run._flush()
        assert run.skipped == 1 and run.skipped_in_a_row == 0 and len(run.history["losses"]) == 3
        assert math.isnan(run.history["losses"][1])
    finally:
        run.close()


def test_a_checkpoint_of_a_foreach_optimizer_resumes_with_this_machines_fused_one(tmp_path):
    """`Optimizer.load_state_dict` takes the saved groups' fused / foreach flags: a CPU run's checkpoint (foreach
    AdamW until session 32) resumed on CUDA stepped with foreach while the loop took it for fused AdamW and handed it
    `found_inf`, which a foreach step refuses (AssertionError). The resumed optimizer is this machine's."""
    from mambakit.training import Run
    from tests.helpers import save_foreach_checkpoint

    cfg = _tiny(tmp_path, max_steps=6)
    save_foreach_checkpoint(cfg, steps=3)
    resumed = Run(cfg, resume=True)
    try:
        assert resumed.global_step == 3 and resumed.device_checks
        assert all(g["fused"] and not g["foreach"] for g in resumed.optimizer.param_groups)
        assert all(s["step"].item() == 3 for s in resumed.optimizer.state.values())
        resumed.step()
        resumed._flush()
        assert resumed.skipped == 0 and all(s["step"].item() == 4 for s in resumed.optimizer.state.values())
    finally:
        resumed.close()


def test_metrics_json_writes_non_finite_numbers_as_null(tmp_path):
    write_metrics(tmp_path / "m.json", {"val_loss": float("nan"), "bpb": float("inf"), "rows": [1.0, float("-inf")]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"val_loss": None, "bpb": None,
                                                                         "rows": [1.0, None]}


# ---------------------------------------------------------------- signals


def _start_run(tmp_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    proc = _cli("train", "--recipe", "tiny", "--data", _corpus(tmp_path / "data"), "--seqlen", "32", "--max-steps",
                "100000", "--out", str(out), "--no-progress", *extra)
    for line in proc.stdout:  # the run has started when the data line is printed
        if line.startswith("data:"):
            break
    time.sleep(1.0)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [pytest.param(signal.SIGINT, 130, id="SIGINT"),
                                       pytest.param(signal.SIGTERM, 143, id="SIGTERM")])
def test_a_signal_saves_once_says_how_to_resume_and_the_resumed_run_repeats_the_losses(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _start_run(tmp_path, out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"continue with `mambakit train --resume --out {out}`" in stdout
    assert "Traceback" not in stderr
    ckpt = resolve_checkpoint(out)
    k = ckpt.step
    assert k > 0 and len(ckpt.state["history"]["losses"]) == k
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")] == [f"step-{k:06d}"]
    # resumed in-process for 3 more steps: the losses of an uninterrupted run of k + 3 steps, exactly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.from_dict(ckpt.state["config"])
        rest = train(cfg, resume=True, stop_at_step=k + 3)
        full = train(cfg.replace(out_dir=str(tmp_path / "full")), stop_at_step=k + 3)
    finally:
        torch.set_num_threads(threads)
    assert rest.losses == full.losses
    assert _strays(out) == []


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    proc = _start_run(tmp_path, tmp_path / "run")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals closer than Python's handler runs count as one
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    # 130 from `mambakit` itself, or killed by the SIGINT (a shell shows 130 too) when the second one lands
    # after the first one's save has finished, while the interpreter shuts down
    assert proc.returncode in (130, -signal.SIGINT)
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in stderr


# ---------------------------------------------------------------- runs never overwritten, outputs checked first


def test_out_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    data = _corpus(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--recipe", "tiny", "--data", data, "--max-steps", "3", "--seqlen", "16", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args[:-1] + ["--seed", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"mambakit train: error: {out} holds a run already: continue it with --resume, replace it with "
                   "--overwrite, or choose another --out\n")
    assert (out / "model.safetensors").read_bytes() == first
    assert main(args + ["--resume"]) == 2 and "cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--overwrite", "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003"]


@pytest.mark.slow
def test_run_label_default_directory_and_sample_follow_the_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _corpus(tmp_path / "my_texts")
    assert main(["train", "--data", data + "/", "--max-steps", "2", "--seqlen", "16", "--d-model", "32",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "recipe my_texts:" in out and "shakespeare" not in out.lower() and "HAMLET" not in out
    state = load_train_state(tmp_path / "runs" / "my_texts")
    assert state["config"]["recipe"] == "my_texts" and state["config"]["sample_prompt"] == ""


UNWRITABLE = [
    pytest.param(["train", "--recipe", "tiny", "--out", "{tmp}/file.txt/run"],
                 "mambakit train: error: --out {tmp}/file.txt/run: cannot write there", id="train-out-under-a-file"),
    pytest.param(["train", "--recipe", "tiny", "--out", "{tmp}/file.txt"],
                 "mambakit train: error: --out {tmp}/file.txt: exists and is not a directory", id="train-out-is-a-file"),
    pytest.param(["train", "--recipe", "tiny", "--out", "/proc/mambakit-run"],
                 "mambakit train: error: --out /proc/mambakit-run: cannot write there", id="train-out-read-only"),
    pytest.param(["generate", "--model", "{model}", "--prompts-file", "{tmp}/p.txt", "--output", "{tmp}"],
                 "mambakit generate: error: --output {tmp}: is a directory", id="generate-output-is-a-directory"),
    pytest.param(["generate", "--model", "{model}", "--prompts-file", "{tmp}/p.txt", "--output", "{tmp}/no/out.jsonl"],
                 "mambakit generate: error: --output {tmp}/no/out.jsonl: the directory {tmp}/no does not exist",
                 id="generate-output-missing-directory"),
    pytest.param(["generate", "--model", "{model}", "--prompts-file", "{tmp}/p.txt", "--output", "/proc/version"],
                 "mambakit generate: error: --output /proc/version: cannot write there", id="generate-output-read-only"),
]


@pytest.fixture
def tiny_model_dir(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=256,
                                ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}))
    model.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    return tmp_path / "model"


@pytest.mark.parametrize("argv, message", UNWRITABLE)
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, tiny_model_dir, argv, message, monkeypatch):
    import mambakit.training.loop as loop

    monkeypatch.setattr(loop, "_load_data", lambda cfg: pytest.fail("the run started"))
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "p.txt").write_text("to be\n")
    fill = {"{tmp}": str(tmp_path), "{model}": str(tiny_model_dir)}
    argv = [a.replace("{tmp}", fill["{tmp}"]).replace("{model}", fill["{model}"]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- bad input, one line (CLI) or ValueError (API)


CLI_BAD_INPUT = [
    pytest.param(["train", "--seed", str(2**70)], "mambakit train: error: argument --seed: expected an integer in [0, 2**64)",
                 id="train-huge-seed"),
    pytest.param(["train", "--seed", "-1"], "mambakit train: error: argument --seed: expected an integer in [0, 2**64)",
                 id="train-negative-seed"),
    pytest.param(["generate", "--model", "{model}", "--seed", str(2**64)],
                 "mambakit generate: error: argument --seed: expected an integer in [0, 2**64)", id="generate-huge-seed"),
    pytest.param(["train", "--keep-checkpoints", "0"], "mambakit train: error: argument --keep-checkpoints",
                 id="keep-no-checkpoints"),
    pytest.param(["convert", "{model}", "/proc/mambakit-converted", "--to", "hf"],
                 "mambakit convert: error: cannot write /proc/mambakit-converted", id="convert-dst-read-only"),
]


@pytest.mark.parametrize("argv, message", CLI_BAD_INPUT)
def test_bad_command_line_input_is_one_line_and_exit_2(tmp_path, capsys, tiny_model_dir, argv, message):
    argv = [a.replace("{model}", str(tiny_model_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_the_largest_seed_works_for_every_batch_of_a_prompts_file(tmp_path, capsys, tiny_model_dir):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts-file", str(tmp_path / "p.txt"), "--batch-size", "1",
            "--max-new-tokens", "3", "--seed", str(2**64 - 1)]
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_unreadable_weights_are_reported_as_unreadable_not_corrupt(tiny_model_dir, monkeypatch):
    import safetensors

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    with pytest.raises(CheckpointError, match="cannot open this file for reading .*check its permissions") as info:
        MambaLM.from_pretrained(tiny_model_dir)
    assert "corrupt" not in str(info.value)


@pytest.mark.slow
def test_generate_into_a_closed_pipe_is_one_line(tiny_model_dir):
    proc = _cli("generate", "--model", str(tiny_model_dir), "--prompt", "to be", "--max-new-tokens", "3000",
                "--seed", "0")
    proc.stdout.read(10)
    proc.stdout.close()  # `| head -c 10`
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 2
    assert stderr == "mambakit generate: error: the output was closed before generation ended (broken pipe)\n"


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=250, ssm_cfg={"layer": "Mamba1"})).eval()


API_BAD_INPUT = [
    pytest.param(lambda lm: generate(lm, [[1, 1.5]], 3), r"generate: prompts\[0\]: token ids must be ints, got 1.5",
                 id="float-token-id"),
    pytest.param(lambda lm: generate(lm, [[1, 2.0]], 3), r"token ids must be ints, got 2.0", id="integral-float-token-id"),
    pytest.param(lambda lm: generate(lm, [[1, True]], 3), r"token ids must be ints, got True", id="bool-token-id"),
    pytest.param(lambda lm: generate(lm, torch.tensor([[1.5, 2.0]]), 3), r"prompt tensor must be integer",
                 id="float-tensor"),
    pytest.param(lambda lm: generate(lm, [[1, 256]], 3), r"token ids must lie in \[0, 256\)", id="id-out-of-range"),
    pytest.param(lambda lm: generate(lm, [1, 2, 3], 3), r"generate: prompts must be a list of token-id lists .*\[prompt_ids\]",
                 id="flat-list-to-generate"),
    pytest.param(lambda lm: generate(lm, [[1, 2]], 3, eos_token_id=True), r"generate: eos_token_id must be",
                 id="eos-true"),
    pytest.param(lambda lm: generate(lm, [[1, 2]], 3, eos_token_id=[0, False]), r"generate: eos_token_id must be",
                 id="eos-false-in-list"),
    pytest.param(lambda lm: generate(lm, [[1, 2]], 3, seed=2**70), r"generate: seed must be None or an int in \[0, 2\*\*64\)",
                 id="seed-2-70"),
    pytest.param(lambda lm: generate(lm, [[1, 2]], 3, seed=-1), r"generate: seed must be", id="negative-seed"),
    pytest.param(lambda lm: stream(lm, [[1, 2]], 5), r"stream: prompt .*flat list of token ids.*nested list",
                 id="stream-nested-list"),
    pytest.param(lambda lm: stream(lm, [1, 1.5], 5), r"stream: prompt .*token ids must be ints, got 1.5",
                 id="stream-float-id"),
    pytest.param(lambda lm: stream(lm, torch.tensor([1.0, 2.0]), 5), r"stream: prompt token ids must be integers",
                 id="stream-float-tensor"),
    pytest.param(lambda lm: stream(lm, [1, 2], 5, seed=2**70), r"generate: seed must be", id="stream-seed-2-70"),
    pytest.param(lambda lm: lm(torch.tensor([[1, 256]])), r"MambaLM: input_ids must lie in \[0, 256\), got values from 1 to 256",
                 id="forward-id-too-large"),
    pytest.param(lambda lm: lm(torch.tensor([[-1, 2]])), r"MambaLM: input_ids must lie in \[0, 256\)",
                 id="forward-negative-id"),
    pytest.param(lambda lm: TrainConfig(seed=2**70), r"seed must be an int in \[0, 2\*\*64\)", id="train-config-seed"),
    pytest.param(lambda lm: TrainConfig(on_nonfinite="ignore"), r"on_nonfinite must be", id="train-config-on-nonfinite"),
]


@pytest.mark.parametrize("call, message", API_BAD_INPUT)
def test_bad_api_input_is_a_value_error_naming_the_argument(lm, call, message):
    with pytest.raises(ValueError, match=message):
        call(lm)


def test_valid_integer_kinds_are_still_accepted(lm):
    import numpy as np

    assert len(generate(lm, [[np.int64(1), 2]], 2, eos_token_id=np.int64(200))[0]) in (1, 2)
    assert len(list(stream(lm, torch.tensor([[1, 2]]), 2, seed=2**64 - 1, temperature=1.0))) == 2


# ---------------------------------------------------------------- CPU threads on a busy machine


@pytest.mark.parametrize("load, cores, threads", [
    pytest.param(0.0, 2, 2, id="idle"),
    pytest.param(0.3, 2, 2, id="light-load"),
    pytest.param(0.9, 2, 1, id="one-busy-process"),
    pytest.param(7.0, 2, 1, id="overloaded"),
    pytest.param(1.2, 8, 7, id="eight-cores"),
])
def test_threads_for_leaves_the_busy_cores_to_the_others(load, cores, threads):
    from mambakit.training.cpu_threads import threads_for

    assert threads_for(load, cores) == threads


def test_cpu_thread_governor_follows_the_other_load_and_respects_the_user(monkeypatch):
    import mambakit.training.cpu_threads as ct

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(ct, "available_cores", lambda: 2)
    # (wall s, machine busy CPU-s, own CPU-s): others use ~1 core, then none
    samples = iter([(0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.1, 0.2, 0.1), (0.1, 0.2, 0.1), (10.1, 10.2, 10.1)])
    monkeypatch.setattr(ct, "_sample", lambda: next(samples))
    monkeypatch.setattr(ct.time, "sleep", lambda s: None)
    monkeypatch.setattr(ct.time, "monotonic", lambda: 10.1)
    threads = torch.get_num_threads()
    try:
        governor = ct.CPUThreadGovernor(every_s=5.0)
        assert governor.enabled and torch.get_num_threads() == 1  # another process keeps a core busy
        governor.update()
        assert torch.get_num_threads() == 2  # it stopped: both cores again
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert not ct.CPUThreadGovernor().enabled
    finally:
        torch.set_num_threads(threads)


def test_generate_command_gives_the_thread_count_back(tmp_path, monkeypatch):
    """`mambakit generate` on a CPU shared with others runs on the idle cores (CPUThreadGovernor), and when it
    returns the process has its thread count back: run in-process it used to leave 1 thread behind, which changed
    the float rounding of later work in that process (a test of dna-context's workers caught it in session 23)."""
    import mambakit.training.cpu_threads as ct
    from mambakit.cli.__main__ import main
    from mambakit.data import ByteTokenizer
    from mambakit.models import MambaConfig, MambaLM

    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=256))
    model.save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(ct, "available_cores", lambda: 2)
    monkeypatch.setattr(ct, "other_cpu_load", lambda interval_s=0.1: 1.0)  # another process keeps a core busy
    import time

    monkeypatch.setattr(ct, "_sample", lambda: (time.monotonic(), 0.0, 0.0))  # no re-measurement within 2 s
    threads = torch.get_num_threads()
    seen = []
    import mambakit.generation as generation

    real_stream = generation.stream

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(generation, "stream", spy)
    try:
        torch.set_num_threads(2)
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "a", "--max-new-tokens", "3",
                     "--device", "cpu"]) == 0
        assert seen == [1]  # it ran on the idle core
        assert torch.get_num_threads() == 2  # and gave the second one back
    finally:
        torch.set_num_threads(threads)
