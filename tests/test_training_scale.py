"""Training at scale on CPU: gradient accumulation, DDP and FSDP2 over 2 gloo processes, sharded checkpoints that
resume on another number of processes, SIGKILL + resume, config files, metrics.jsonl / TensorBoard / plot (issue 13).

Every comparison of a distributed or accumulated run is against one process reading the same global batch: the
sampler draws the windows of the whole global batch from one generator (mambakit.data.RandomWindows), so only the
order of float sums differs (tolerance 1e-4 relative). Resuming on the same layout is compared exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mambakit import MambaLM
from mambakit.cli.__main__ import main
from mambakit.ops import record_backends
from mambakit.training import (TrainConfig, build_optimizer, load_train_state, model_config, read_metrics,
                               resolve_checkpoint, train)
from mambakit.training.checkpoint import DISTRIBUTED
from mambakit.training.distributed import DistInfo, wrap_model
from mambakit.training.config import MODEL_OVERRIDES
from tests.helpers import assert_close

REPO = Path(__file__).resolve().parents[1]


def _corpus(directory: Path) -> str:
    """24 short documents of repeated verse."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["to be or not to be that is the question\n", "the rest is silence\n", "all the world's a stage\n"]
    for i in range(24):
        (directory / f"doc{i:02d}.txt").write_text("".join(lines[(i + j) % 3] for j in range(12)))
    return str(directory)


def _tiny(tmp_path: Path, **changes) -> TrainConfig:
    """Two blocks (so that FSDP2 shards two units besides the root), float32 on CPU, a few seconds per run."""
    cfg = TrainConfig(recipe="test", data=_corpus(tmp_path / "data"), layer="mamba2", d_model=16, n_layer=2,
                      d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=32, batch_size=4, lr=1e-2, warmup_steps=2,
                      max_steps=6, eval_every=0, eval_tokens=256, final_eval_tokens=256, eval_batch_size=4,
                      log_every=1, progress=False, sample_tokens=0, val_fraction=0.1, plot=False, device="cpu",
                      out_dir=str(tmp_path / "run"))
    return cfg.replace(**changes)


def _assert_same_weights(dir_a: Path, dir_b: Path, rel: float | None = None) -> None:
    a, b = load_file(str(dir_a / "model.safetensors")), load_file(str(dir_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if rel is None:
            assert torch.equal(a[name], b[name]), name
        else:
            assert_close(a[name], b[name], name=name, rel=rel)


# ---------------------------------------------------------------- gradient accumulation


def test_grad_accum_2_of_batch_2_equals_batch_4(tmp_path):
    big = train(_tiny(tmp_path, batch_size=4, out_dir=str(tmp_path / "big")))
    accum = train(_tiny(tmp_path, batch_size=2, grad_accum=2, out_dir=str(tmp_path / "accum")))
    assert len(accum.losses) == 6
    assert_close(torch.tensor(accum.losses), torch.tensor(big.losses), name="losses", rel=1e-5)
    _assert_same_weights(tmp_path / "accum", tmp_path / "big", rel=1e-4)
    assert accum.val_loss == pytest.approx(big.val_loss, rel=1e-4)
    state = load_train_state(tmp_path / "accum")
    assert state["global_batch"] == 4 and state["config"]["grad_accum"] == 2


def test_grad_accum_syncs_gradients_only_on_the_last_micro_step(tmp_path, monkeypatch):
    """Under DDP each micro-step but the last runs inside no_sync (checked on a stand-in for the DDP wrapper)."""
    import contextlib

    from mambakit.training import Run

    run = Run(_tiny(tmp_path, batch_size=2, grad_accum=3))
    try:
        entered = []

        @contextlib.contextmanager
        def no_sync():
            entered.append(True)
            yield

        monkeypatch.setattr(run.model, "no_sync", no_sync, raising=False)
        monkeypatch.setattr(run, "info", run.info.__class__(rank=0, world_size=2), raising=True)
        monkeypatch.setattr("mambakit.training.loop.all_reduce_mean", lambda t, info: t)
        run.step()
        assert entered == [True, True]  # micro-steps 1 and 2 of 3
    finally:
        run.info = run.info.__class__()
        run.close()


# ---------------------------------------------------------------- DDP and FSDP2 over 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, cfg_dict: dict, stop_at_step: int | None, resume: bool,
            out: str) -> None:
    """One torchrun-like process running train(); each rank saves its TrainResult's losses."""
    import faulthandler

    # a collective that never completes fails the test with every thread's stack instead of hanging it
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(TrainConfig.from_dict(cfg_dict), stop_at_step=stop_at_step, resume=resume)
    torch.save(result.losses, os.path.join(out, f"losses{rank}.pt"))


def _spawn(cfg: TrainConfig, tmp_path: Path, nprocs: int = 2, stop_at_step: int | None = None,
           resume: bool = False) -> list[float]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nprocs, _free_port(), cfg.to_dict(), stop_at_step, resume, str(tmp_path)), nprocs=nprocs,
             join=True)
    losses = [torch.load(tmp_path / f"losses{r}.pt") for r in range(nprocs)]
    assert all(x == losses[0] for x in losses)  # every rank reports the all-reduced losses
    return losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [pytest.param("ddp", id="ddp"), pytest.param("fsdp", id="fsdp")])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, parallel):
    # 2 processes x 2 micro-steps x batch 1 against 1 process x batch 4: accumulation and sharding together
    cfg = _tiny(tmp_path, batch_size=1, grad_accum=2, parallel=parallel, out_dir=str(tmp_path / "two"))
    two = _spawn(cfg, tmp_path)
    one = train(_tiny(tmp_path, batch_size=4, out_dir=str(tmp_path / "one")))
    assert len(two) == 6
    assert_close(torch.tensor(two), torch.tensor(one.losses), name="losses", rel=1e-4)
    _assert_same_weights(tmp_path / "two", tmp_path / "one", rel=1e-3)
    ckpt = resolve_checkpoint(tmp_path / "two")
    if parallel == "fsdp":
        # the sharded state is in torch.distributed.checkpoint's files, listed (and hashed) in the manifest
        assert ckpt.state["optimizer"] is None and (ckpt.path / DISTRIBUTED / ".metadata").is_file()
        manifest = json.loads((ckpt.path / "manifest.json").read_text())
        assert any(name.startswith(f"{DISTRIBUTED}/") for name in manifest["files"])
    else:
        assert ckpt.state["optimizer"] is not None and not (ckpt.path / DISTRIBUTED).exists()


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_on_a_different_number_of_processes(tmp_path):
    # uninterrupted, one process, global batch 4
    full = train(_tiny(tmp_path, batch_size=4, parallel="fsdp", out_dir=str(tmp_path / "full")))
    # 2 FSDP2 processes x batch 2 stop after step 3 (a sharded checkpoint), then one process x batch 4 resumes it
    cfg = _tiny(tmp_path, batch_size=2, parallel="fsdp", out_dir=str(tmp_path / "moved"))
    first = _spawn(cfg, tmp_path, stop_at_step=3)
    assert len(first) == 3 and resolve_checkpoint(cfg.out_dir).step == 3
    resumed_cfg = TrainConfig.from_dict(load_train_state(cfg.out_dir)["config"])
    with pytest.raises(ValueError, match="the checkpoint's steps read 4 windows"):
        train(resumed_cfg, resume=True)  # batch 2 on one process: not the global batch of the checkpoint
    rest = train(resumed_cfg.replace(batch_size=4), resume=True)
    assert rest.step == 6
    assert_close(torch.tensor(rest.losses), torch.tensor(full.losses), name="losses", rel=1e-4)
    _assert_same_weights(tmp_path / "moved", tmp_path / "full", rel=1e-3)
    # and back onto 2 processes from the one-process sharded checkpoint of step 3 of the uninterrupted layout
    again = _tiny(tmp_path, batch_size=4, parallel="fsdp", out_dir=str(tmp_path / "grow"))
    train(again, stop_at_step=3)
    grown = _spawn(again.replace(batch_size=2), tmp_path, resume=True)
    assert_close(torch.tensor(grown), torch.tensor(full.losses), name="losses after growing", rel=1e-4)


# ---------------------------------------------------------------- SIGKILL, then resume


def _cli(*args: str) -> subprocess.Popen:
    # one thread, fixed by the environment (the CPU thread governor then stays off): bit-exact float32 sums
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mambakit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    data = _corpus(tmp_path / "data")
    args = ["train", "--recipe", "tiny", "--data", data, "--seqlen", "32", "--max-steps", "400", "--save-every", "5",
            "--log-every", "1", "--no-progress", "--device", "cpu", "--plot", "false"]
    killed = tmp_path / "killed"
    proc = _cli(*args, "--out", str(killed))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        records = read_metrics(killed)
        last = records[-1].get("step", 0) if records else 0
        # kill one to three steps past a checkpoint (every 5 steps): killed right at one, the run would have no
        # records past it to redo on resume (a race CI lost once, with the kill landing at step 15)
        if last >= 12 and last % 5 in (1, 2, 3) and (killed / "checkpoints" / "latest").is_file():
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    k = resolve_checkpoint(killed).step
    assert k >= 10 and k % 5 == 0
    assert max(r["step"] for r in read_metrics(killed)) > k  # records past the checkpoint: redone on resume
    resumed = _cli("train", "--resume", "--out", str(killed), "--no-progress")
    uninterrupted = _cli(*args, "--out", str(tmp_path / "full"))
    for p in (resumed, uninterrupted):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]

    assert losses(killed) == losses(tmp_path / "full")  # every step once, bit for bit
    assert [s for s, _ in losses(killed)] == list(range(1, 401))
    assert load_train_state(killed)["history"]["losses"] == load_train_state(tmp_path / "full")["history"]["losses"]
    _assert_same_weights(killed, tmp_path / "full")


# ---------------------------------------------------------------- configuration


def test_every_train_config_and_model_field_is_a_flag():
    from mambakit.cli.train import build_parser

    dests = {a.dest for a in build_parser()._actions}
    fields = {f for f in TrainConfig.__dataclass_fields__ if f != "model"}
    assert fields <= dests, sorted(fields - dests)
    assert {f"model.{name}" for name in MODEL_OVERRIDES} <= dests
    assert "ssm_cfg" in MODEL_OVERRIDES and "vocab_size" not in MODEL_OVERRIDES


def test_config_round_trip_print_config_then_config_file_reproduces_the_run(tmp_path, capsys):
    data = _corpus(tmp_path / "data")
    flags = ["--recipe", "tiny", "--data", data, "--seqlen", "32", "--max-steps", "4", "--batch-size", "2",
             "--grad-accum", "2", "--eval-every", "2", "--model.d-intermediate", "16", "--model.ssm-cfg", "{d_conv: 3}",
             "--warmup-steps", "1", "--device", "cpu", "--no-progress", "--plot", "false"]
    assert main(["train", *flags, "--out", str(tmp_path / "a"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "a").exists()  # printing runs nothing
    (tmp_path / "run.yaml").write_text(printed)
    assert main(["train", *flags, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "b")]) == 0
    a, b = load_train_state(tmp_path / "a"), load_train_state(tmp_path / "b")
    assert a["history"]["losses"] == b["history"]["losses"] and len(a["history"]["losses"]) == 4
    assert {**a["config"], "out_dir": None} == {**b["config"], "out_dir": None}
    assert a["config"]["model"] == {"d_intermediate": 16, "ssm_cfg": {"d_conv": 3}}
    assert json.loads((tmp_path / "a" / "config.json").read_text())["d_intermediate"] == 16
    # the resolved config is saved as YAML beside the checkpoint (and at the top of the run directory)
    import yaml

    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved == {**yaml.safe_load(printed), "out_dir": str(tmp_path / "a")}
    assert (resolve_checkpoint(tmp_path / "a").path / "config.yaml").is_file()
    # flags override the file, whatever their order
    capsys.readouterr()
    assert main(["train", "--lr", "0.5", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 0.5


CONFIG_ERRORS = [
    pytest.param("nonsense_field: 1\n", "Key 'nonsense_field' not in 'TrainConfig'", id="unknown-key"),
    pytest.param("batch_size: many\n", "Value 'many' of type 'str' could not be converted to Integer", id="bad-type"),
    pytest.param("model: {vocab_size: 3}\n", "model: unknown keys ['vocab_size']", id="unknown-model-key"),
    pytest.param("grad_accum: 0\n", "grad_accum must be positive, got 0", id="bad-value"),
]


@pytest.mark.parametrize("text, message", CONFIG_ERRORS)
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    (tmp_path / "run.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambakit train: error: ") and message in err and err.count("\n") == 1


# ---------------------------------------------------------------- metrics.jsonl, TensorBoard, plot


def test_metrics_jsonl_tensorboard_and_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = _corpus(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny", "--data", data, "--seqlen", "32", "--max-steps", "8", "--log-every", "2",
                 "--eval-every", "4", "--logger", "tensorboard", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "held-out" in stdout and f"plot: {out / 'metrics.png'}" in stdout  # log lines on stdout
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    for r in train_records:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    history = load_train_state(out)["history"]["losses"]
    assert train_records[0]["loss"] == pytest.approx(sum(history[:2]) / 2)
    evals = [r for r in records if "eval_bits_per_byte" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["final"] is True
    assert evals[0]["eval_bits_per_byte"] > 0 and "loss" in evals[0]  # the evaluation joins its step's record
    assert (out / "metrics.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert main(["plot", str(out), "--output", str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"mambakit plot: error: {tmp_path}: no metrics.jsonl (is it a `mambakit train` "
                                       "run directory?)\n")


def test_a_resumed_run_drops_the_records_past_its_checkpoint(tmp_path):
    cfg = _tiny(tmp_path, save_every=2)
    train(cfg, stop_at_step=3)  # records 1..3 and the final evaluation; checkpoints at 2 and 3
    records = read_metrics(cfg.out_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a") as f:  # as if a killed run had logged steps 4 and 5
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n{\"step\": 6")
    train(cfg, resume=True)
    steps = [r["step"] for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6] and 9.0 not in [r["loss"] for r in read_metrics(cfg.out_dir) if "loss" in r]


# ---------------------------------------------------------------- the op paths under DDP and FSDP2 (one process)


@contextlib.contextmanager
def _one_process_group():
    """A gloo group of one process, in this process (the wrappers need a group; nothing is sent)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _paths(model: torch.nn.Module, ids: torch.Tensor) -> Counter:
    """(op, backend) -> calls over one bf16-autocast forward and backward, as the trainer runs a step."""
    with record_backends() as seen:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        logits.float().square().mean().backward()
    return seen


@pytest.mark.parametrize("layer, fused_op", [pytest.param("mamba1", "mamba1_inner", id="mamba1"),
                                             pytest.param("mamba2", "mamba2_inner", id="mamba2")])
def test_ddp_and_fsdp2_take_the_same_op_paths_as_one_bare_process(layer, fused_op):
    """The wrappers must leave the mixers on their fused op: a mixer that falls back to the separate ops (a
    parameter that is not a plain tensor, a hook a wrapper puts on out_proj) runs about 3x slower on the GPU.
    Checked under a one-process gloo group for the DDP wrapper, FSDP2 as wrap_model shards, and FSDP2 with the bf16
    parameter policy that wrap_model uses on CUDA. The backend is CPU's automatic one ("torch"): which op a mixer
    calls does not depend on it, and on CUDA the same op runs its Triton kernels."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = TrainConfig(layer=layer, d_model=16, n_layer=2, d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=16,
                      batch_size=2)
    ids = torch.randint(0, 64, (2, 16))
    paths = {}
    with _one_process_group():
        for case in ("plain", "ddp", "fsdp", "fsdp-bf16-params"):
            torch.manual_seed(0)
            model = MambaLM(model_config(cfg, 64))
            if case in ("ddp", "fsdp"):
                # world_size 2: a one-process run is 'not distributed' to wrap_model, which would return the model
                model = wrap_model(model, cfg.replace(parallel=case), DistInfo(0, 2, 0), torch.device("cpu"))
            elif case == "fsdp-bf16-params":
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for block in model.backbone.layers:
                    fully_shard(block, mp_policy=policy)
                fully_shard(model, mp_policy=policy)
            paths[case] = _paths(model, ids)
            assert all(p.grad is not None for p in model.parameters()), case
    # one fused mixer op per block (it calls the separate ops inside on this backend), one add + norm per block
    # and the final norm
    assert paths["plain"][(fused_op, "torch")] == 2 and paths["plain"][("add_rms_norm", "torch")] == 3
    for case in ("ddp", "fsdp", "fsdp-bf16-params"):
        assert paths[case] == paths["plain"], case


def test_the_recorded_paths_show_a_mixer_that_left_its_fused_op():
    """The check above can fail: a forward hook on one out_proj sends that mixer through the separate ops."""
    cfg = TrainConfig(layer="mamba2", d_model=16, n_layer=2, d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=16,
                      batch_size=2)
    model = MambaLM(model_config(cfg, 64))
    ids = torch.randint(0, 64, (2, 16))
    plain = _paths(model, ids)
    model.backbone.layers[1].mixer.out_proj.register_forward_hook(lambda module, args, out: out)
    hooked = _paths(model, ids)
    assert plain[("mamba2_inner", "torch")] == 2 and hooked[("mamba2_inner", "torch")] == 1
    assert hooked[("ssd", "torch")] == plain[("ssd", "torch")] == 2  # the hooked mixer calls the SSD itself


@pytest.mark.parametrize("reshard, kept", [pytest.param(False, True, id="kept-until-backward"),
                                           pytest.param(True, False, id="resharded-after-forward")])
def test_fsdp_reshard_after_forward_follows_the_config(reshard, kept):
    """fsdp_reshard_after_forward False keeps a block's gathered parameters from its forward to its backward;
    True (the default) puts the shards (DTensor) back after the forward. After the backward both are sharded."""
    from torch.distributed.tensor import DTensor

    cfg = TrainConfig(layer="mamba2", d_model=16, n_layer=2, d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=16,
                      batch_size=2, parallel="fsdp", fsdp_reshard_after_forward=reshard)
    assert TrainConfig().fsdp_reshard_after_forward is True
    with _one_process_group():
        model = wrap_model(MambaLM(model_config(cfg, 64)), cfg, DistInfo(0, 2, 0), torch.device("cpu"))
        logits = model(torch.randint(0, 64, (2, 16)))
        weight = model.backbone.layers[0].mixer.out_proj.weight
        assert isinstance(weight, DTensor) is not kept
        logits.square().mean().backward()
        assert all(isinstance(p, DTensor) and p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("rms_norm", [pytest.param(True, id="add-rms-norm-op"), pytest.param(False, id="layer-norm")])
def test_fsdp2_blocks_return_no_view(rms_norm):
    """FSDP2 makes a block's inputs views (its pre-forward autograd Function) and warns when a block returns a
    view: the first block must not hand its input back as the residual (the fused add + norm op and the unfused
    path both return a new tensor). torch 2.13 warns "FSDP2-wrapped module (FSDPBlock) returned a view tensor"."""
    import warnings

    cfg = TrainConfig(layer="mamba2", d_model=16, n_layer=2, d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=16,
                      batch_size=2, parallel="fsdp")
    config = dataclasses.replace(model_config(cfg, 64), rms_norm=rms_norm)
    with _one_process_group():
        model = wrap_model(MambaLM(config), cfg, DistInfo(0, 2, 0), torch.device("cpu"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(torch.randint(0, 64, (2, 16))).square().mean().backward()
    assert not [w for w in caught if "view tensor" in str(w.message)], [str(w.message) for w in caught]
    assert all(p.grad is not None for p in model.parameters())


def test_fsdp2_adamw_is_foreach_and_the_fused_kernel_would_give_the_same_steps():
    """build_optimizer over FSDP2's sharded (DTensor) parameters is not fused (host calls, see its comment); the
    fused kernel does accept DTensors: three steps of each give the same parameters (CPU, gloo, one process)."""
    from torch.distributed.tensor import DTensor

    cfg = TrainConfig(layer="mamba2", d_model=16, n_layer=2, d_state=8, expand=2, headdim=8, chunk_size=16, seqlen=16,
                      batch_size=2, parallel="fsdp", lr=1e-2, warmup_steps=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    trained = {}
    with _one_process_group():
        for fused in (False, True):
            torch.manual_seed(0)
            model = wrap_model(MambaLM(model_config(cfg, 64)), cfg, DistInfo(0, 2, 0), torch.device("cpu"))
            assert all(isinstance(p, DTensor) for p in model.parameters())
            opt = build_optimizer(model, cfg)
            assert not opt.defaults["fused"]
            initial = [p.full_tensor().clone() for p in model.parameters()]
            if fused:
                opt = torch.optim.AdamW(opt.param_groups, lr=opt.defaults["lr"], betas=opt.defaults["betas"], fused=True)
            for _ in range(3):
                model(ids).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            trained[fused] = [p.full_tensor() for p in model.parameters()]
            assert not any(torch.equal(a, b) for a, b in zip(initial, trained[fused]) if a.dim() > 1)
    for a, b in zip(trained[False], trained[True]):
        assert_close(b, a, rel=1e-5)
