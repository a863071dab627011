"""What every `mambakit reproduce NAME` run shares: training on generated batches, resumable state, time
budget, evaluation memo, the environment stamp and the results files.

Layout of an output directory (`results/NAME/` by default):

    results.json        rows of measured values + command, device, versions, date, run time, settings
    README.md           the table, how to read it, the command, device, budget
    *.png               plots
    <model>/            trained checkpoints small enough to commit (MambaLM.from_pretrained loads them)
    _state/             resume state (optimizer, step, finished models, cached evaluations); not results:
                        a .gitignore beside results.json keeps it out of git

A run stops cleanly when its time budget is spent (saving the training state of the model in progress) and
returns `UNFINISHED`; the same command with `--resume` continues exactly where it stopped (training batches
are a function of the step, so a resumed run sees the batches an uninterrupted one would). Results files are
written once every model is trained and evaluated. `--resume --steps N` with N above a finished model's steps
trains it on to N steps (the learning rate is constant after warmup, so this equals training N steps at once)
and evaluates it again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.synthetic import IGNORE, SyntheticBatch
from ..models import MambaConfig, MambaLM, build_model

FINISHED, UNFINISHED = 0, 3  # exit statuses of a run: done, or stopped by the time budget (rerun with --resume)
STATE_DIR = "_state"
CLAIMS_DIR = "claims"  # under STATE_DIR: which worker trains which model (reproduce(..., workers=N))


@dataclass
class TrainSettings:
    """Optimisation of one model: AdamW (training.build_optimizer), linear warmup then training.lr_at's cosine to
    lr * min_lr_ratio. The default, as the Mamba paper's synthetic tasks (Appendix E.1): a constant learning rate
    (min_lr_ratio 1) and no weight decay; a constant rate also lets `--steps` extend a finished run exactly."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    beta2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 500  # steps between resume checkpoints (and at the time budget's end)
    log_every: int = 25  # steps between recorded losses (each one is a host sync)
    eval_every: int = 0  # steps between validation evaluations (0: none, so no early stopping)
    target: float | None = None  # early stopping: every validation metric >= target ...
    target_evals: int = 2  # ... at this many consecutive evaluations stops the model before `steps`
    # state passing (Buitrago Ruiz & Gu 2025, "Understanding and Improving Length Generalization in Recurrent Models"):
    # every batch starts from the final recurrent states of the previous one (cut from its graph), so training
    # visits the states of contexts far longer than a row; recurrent (SSM) layers only
    state_passing: bool = False

    def describe(self, rows: list[dict] | None = None) -> str:
        """One line for a README: the optimiser, schedule and budget; with result `rows`, the steps they were
        really trained for (--steps, extended runs)."""
        steps = sorted({r["steps"] for r in rows}) if rows else [self.steps]
        if steps != [self.steps]:
            return dataclasses.replace(self, steps=steps[0]).describe() if len(steps) == 1 else \
                self.describe().replace(f"{self.steps} steps", "the steps in results.json", 1)
        schedule = ("then constant" if self.min_lr_ratio == 1.0
                    else f"then cosine to {self.min_lr_ratio:g} x lr over the {self.steps} steps")
        clip = f"gradient clipping {self.grad_clip:g}" if self.grad_clip > 0 else "no gradient clipping"
        stop, at_most = "", ""
        if self.eval_every and self.target is not None:
            at_most = "at most "
            stop = (f"; stopped early once the validation accuracy is >= {100 * self.target:g}% at {self.target_evals} "
                    f"consecutive evaluations (every {self.eval_every} steps), else the weights of the best "
                    "evaluation are kept")
        return (f"{at_most}{self.steps} steps of {self.batch_size} fresh rows; AdamW (beta2 {self.beta2:g}), lr "
                f"{self.lr:g} after a {self.warmup_steps}-step linear warmup {schedule}, weight decay "
                f"{self.weight_decay:g}, {clip}, bf16 autocast on CUDA{stop}"
                + ("; state passing (each batch starts from the previous batch's final states)"
                   if self.state_passing else ""))

    def train_config(self):
        from ..training import TrainConfig

        return TrainConfig(lr=self.lr, warmup_steps=self.warmup_steps, max_steps=self.steps, weight_decay=self.weight_decay,
                           min_lr_ratio=self.min_lr_ratio, beta2=self.beta2, grad_clip=self.grad_clip)


@dataclass
class ModelSpec:
    """One row of an experiment: `key` names its state and checkpoint folder, `label` its table row."""

    key: str
    label: str
    config: MambaConfig
    train: TrainSettings
    save_checkpoint: bool = True  # copy the trained model to <out>/<key>/ (a few MB at most)
    info: dict = field(default_factory=dict)  # extra columns of the row (mixer, gate, d_state, ...)


def environment(device: torch.device) -> dict:
    """Device name and library versions, for results.json and the README."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": version("triton"), "mambakit": version("mambakit"),
            "python": platform.python_version()}


def batch_seed(seed: int, step: int) -> int:
    """The generator seed of training batch `step`: a pure function, so a resumed run draws the same batches."""
    return (seed * 1_000_003 + step) % (2 ** 63)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over the scored positions: logits (B, T, V_padded), targets (B, T) with IGNORE."""
    return F.cross_entropy(logits[..., :vocab_size].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def correct_and_count(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """(argmax hits, scored positions) of logits (B, T, V_padded) against targets (B, T)."""
    scored = targets != IGNORE
    hits = (logits[..., :vocab_size].argmax(-1) == targets) & scored
    return int(hits.sum()), int(scored.sum())


class Run:
    """One invocation of an experiment: output paths, device, time budget, resumable training and evaluation.

    Example:
        >>> run = Run("induction-heads", Path("results/induction-heads"), device=torch.device("cuda"),
        ...           quick=False, resume=True, time_budget_s=420, command="mambakit reproduce induction-heads")
        >>> for spec in specs:
        ...     model = run.train(spec, lambda step, g: induction_heads(64, 256, generator=g), logits_to_keep=1)
        ...     if model is None: continue      # the time budget, or another worker's model: later
        >>> if not run.results_ready(): return run.unfinished()
    """

    def __init__(self, name: str, out: Path, device: torch.device, quick: bool, resume: bool,
                 time_budget_s: float | None, command: str, progress: bool = True, steps: int | None = None,
                 worker: int | None = None, cuda_graph: bool = True):
        self.name = name
        self.out = Path(out)
        self.device = device
        self.quick = quick
        self.progress = progress and worker is None
        self.command = command
        self.steps_override = steps
        # worker: one of `reproduce(..., workers=N)`'s processes. It shares the state folder with the others,
        # trains (and evaluates) only the models it claims first, never writes run.json or the results.
        self.worker = worker
        # on CUDA, every training step of a model replays one captured CUDA graph (training.GraphedTrainStep, the
        # rate read from a tensor): the same computation, without the host's launch cost per kernel
        self.cuda_graph = cuda_graph
        self.incomplete = False  # some model or evaluation was left for later (time budget, another worker)
        self._claimed: set[str] = set()
        self.t_start = time.monotonic()
        self.time_budget_s = time_budget_s
        self.deadline = None if time_budget_s is None else self.t_start + time_budget_s
        self.state = self.out / STATE_DIR
        if not resume and worker is None and self.state.exists():
            shutil.rmtree(self.state)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.out / ".gitignore").write_text(f"{STATE_DIR}/\n")
        self._meta_path = self.state / "run.json"
        meta = _read_json(self._meta_path) or {}
        if meta and meta.get("quick") != quick:
            raise ValueError(f"{self.out}: the saved state is from a {'--quick' if meta['quick'] else 'full-size'} run; "
                             "rerun without --resume to start over")
        self._elapsed_before = float(meta.get("elapsed_s", 0.0))
        self._pieces = int(meta.get("pieces", 0)) + 1
        self._save_meta()

    # ---------------------------------------------------------------- time

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def elapsed_s(self) -> float:
        """Seconds spent on this experiment over all invocations (resumed pieces add up)."""
        return self._elapsed_before + time.monotonic() - self.t_start

    def _save_meta(self) -> None:
        if self.worker is None:  # the parent of the workers keeps the run's time
            _write_json(self._meta_path, {"quick": self.quick, "elapsed_s": self.elapsed_s(), "pieces": self._pieces})

    def unfinished(self) -> int:
        self._save_meta()
        if self.worker is None:
            print(f"mambakit reproduce {self.name}: time budget spent; state saved in {self.state}. "
                  "Run the same command with --resume to continue.", file=sys.stderr)
        return UNFINISHED

    def with_steps(self, s: dict) -> dict:
        """An experiment's settings with s["steps"] replaced by --steps when given, for the experiments whose every
        model trains s["steps"] steps: what their README and results.json say, and what schedules derived from
        the step count (dna-context's sequence-length warm-up) use, is then the run's real budget."""
        return s if self.steps_override is None else {**s, "steps": self.steps_override}

    def results_ready(self) -> bool:
        """Whether every model and evaluation the experiment asked for is there, so that its results can be
        written (never in a worker: the parent writes them). An experiment's loop goes on past a model that
        returned None (the time budget, or another worker's) and asks this once at its end."""
        return not self.incomplete and self.worker is None

    # ---------------------------------------------------------------- workers

    def _claim(self, key: str) -> bool:
        """Whether this process may work on model `key` (train it, evaluate it): always outside workers; a worker
        claims it by creating _state/claims/<key> (atomic: one worker wins) and keeps it until it exits."""
        if self.worker is None or key in self._claimed:
            return True
        path = self.state / CLAIMS_DIR / key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, f"worker {self.worker}, pid {os.getpid()}\n".encode())
        os.close(fd)
        self._claimed.add(key)
        sys.stderr.write(f"[worker {self.worker}] {self.name}: {key}\n")  # one write: workers share the stream
        sys.stderr.flush()
        return True

    def release_claims(self) -> None:
        """Remove this worker's claims (a claimed model left unfinished is resumed by the next invocation)."""
        for key in self._claimed:
            (self.state / CLAIMS_DIR / key).unlink(missing_ok=True)
        self._claimed.clear()

    # ---------------------------------------------------------------- training

    def train(self, spec: ModelSpec, make_batch: Callable[[int, torch.Generator], SyntheticBatch],
              logits_to_keep: int = 0, autocast: bool = True,
              validate: Callable[[MambaLM], dict[str, float]] | None = None,
              recipe_extra: dict | None = None) -> MambaLM | None:
        """Train `spec`'s model on make_batch(step, generator) batches (or load it if already trained).

        Returns the trained model in eval mode, or None when the time budget ran out first (the training
        state is then saved for --resume). logits_to_keep: only the last k positions are scored (0: all).
        bf16 autocast on CUDA when `autocast`. A model finished with fewer steps than asked for trains on from
        its saved state (and its cached evaluations are dropped), unless it stopped early. validate: see `fit`,
        whose loop this is, with the masked cross-entropy of the batch's targets as the loss. recipe_extra: what
        else decides the trained weights besides the config (e.g. a length curriculum), recorded with it, so that a
        state saved under another value is trained again rather than resumed.

        Determinism: the initialisation is drawn after torch.manual_seed(seed) and batch `step` from
        batch_seed(seed, step), so on the CPU a run is a function of its seed. On CUDA it is not bit-exact:
        the Triton selective-scan backward sums dA and dD over its programs (batch rows, channel blocks, time
        segments) with float32 atomics in an order that varies (dB, dC too where programs share a replica), and
        torch's embedding backward uses atomics; runs of one seed drift apart by rounding.
        """
        vocab = spec.config.vocab_size

        def loss(model: torch.nn.Module, batch: SyntheticBatch, states) -> torch.Tensor:
            # cache= only with state passing: a TransformerLM (lm-scaling) takes no recurrent states
            logits = (model(batch.inputs, logits_to_keep=logits_to_keep) if states is None
                      else model(batch.inputs, cache=states, logits_to_keep=logits_to_keep))
            targets = batch.targets[:, -logits_to_keep:] if logits_to_keep else batch.targets
            return masked_loss(logits, targets, vocab)

        # a MambaLM, or a TransformerLM for a TransformerConfig
        return self.fit(spec.key, lambda: build_model(spec.config, device=self.device), spec.train, make_batch, loss,
                        load=lambda folder: MambaLM.from_pretrained(folder / "model", device=self.device),
                        save=lambda model, folder: model.save_pretrained(folder / "model"), autocast=autocast,
                        validate=validate, recipe={**spec.config.to_dict(), **(recipe_extra or {})})

    def fit(self, key: str, build: Callable[[], torch.nn.Module], settings: TrainSettings,
            make_batch: Callable[[int, torch.Generator], Any], loss_fn: Callable[..., torch.Tensor], *,
            load: Callable[[Path], torch.nn.Module], save: Callable[[torch.nn.Module, Path], None],
            autocast: bool = True, validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
            recipe: dict | None = None) -> torch.nn.Module | None:
        """The one resumable training loop: `train` (language models) and `dna_audio_common.train_module` (any
        nn.Module) call it. Returns the model in eval mode, or None when the time budget ran out first (the
        training state is then saved in _state/<key>/train.pt for --resume).

        build() makes the model, after torch.manual_seed(settings.seed). make_batch(step, generator) gives batch
        `step` as a pure function of it (a resumed run sees the batches an uninterrupted one would): a
        SyntheticBatch or a tuple of tensors, moved to the run's device. loss_fn(model, batch, states) is its
        loss, under bf16 autocast on CUDA when `autocast`; states is None, or with `settings.state_passing` the
        previous batch's final recurrent states (an InferenceCache cut from its graph, zeros at the start) for
        the model to start from. AdamW, warmup and schedule are `settings`' (--steps overrides the step count).
        When done, save(model, folder) stores the weights and done.json the record; a later call
        load(folder)s them instead (a model finished with fewer steps than asked for trains on, unless it
        stopped early; its cached evaluations are then dropped).

        validate(model) -> {metric: accuracy} runs every `settings.eval_every` steps (model in eval mode,
        inference mode, no autocast) on a validation set of the caller's (not the test set); once every metric
        is >= `settings.target` at `settings.target_evals` consecutive evaluations the model stops early. A model
        that never gets there ends as the weights of its best evaluation (the highest lowest metric; the latest
        of equals), not of its last step: past the point where the training loss is ~0, a constant learning rate
        lets what the training length does not constrain drift (induction heads' accuracy at 2^20 went 94% ->
        34% -> 59% over 4,500 more steps of one Mamba). The history is kept in done.json (`val_history`,
        `early_stop_step`, `selected_step`: the step whose weights were kept).

        The state remembers what it was trained with (recipe.json: `settings` but its step count, and `recipe`,
        e.g. the model config): when either has changed since, the model's state and evaluations are dropped and
        it trains again, so that an edited experiment never reports a model of the old recipe. A state from
        before recipe.json is taken as it is.
        """
        from ..training import build_optimizer, lr_at

        folder = self.state / key
        if self.steps_override is not None:
            settings = dataclasses.replace(settings, steps=self.steps_override)
        trained_with = json.loads(json.dumps({"settings": {k: v for k, v in dataclasses.asdict(settings).items()
                                                           if k != "steps"}, "recipe": recipe}))
        stale = _read_json(folder / "recipe.json") not in (None, trained_with)
        done = None if stale else _read_json(folder / "done.json")
        if done is not None and (done["steps"] >= settings.steps or done.get("early_stop_step") is not None):
            return load(folder).eval()
        if self.out_of_time() or not self._claim(key):
            self.incomplete = True
            return None
        if stale:
            print(f"mambakit reproduce {self.name}: {key}'s settings changed since its state was saved; "
                  "training it again", file=sys.stderr)
            shutil.rmtree(folder)
        if stale or done is not None:  # a changed or extended model: its evaluations are out of date
            (folder / "done.json").unlink(missing_ok=True)
            shutil.rmtree(self.state / "evals" / key, ignore_errors=True)
        _write_json(folder / "recipe.json", trained_with)
        cfg = settings.train_config()
        torch.manual_seed(settings.seed)
        model = build().to(self.device)
        optimizer = build_optimizer(model, cfg)
        step, losses, train_s, val_history, states, best = 0, [], 0.0, [], None, None
        resume_file = folder / "train.pt"
        if resume_file.exists():
            saved = torch.load(resume_file, map_location=self.device, weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            step, losses, train_s = saved["step"], saved["losses"], saved["train_s"]
            val_history, states, best = saved.get("val_history", []), saved.get("states"), saved.get("best")
        early_stop = None
        use_autocast = autocast and self.device.type == "cuda"
        graphed = None
        # state passing through the graph: every replay starts from carried["states"] (tensors that outlive the
        # graph), trains on a copy of them as the eager steps do, and writes its final states back into them
        carried: dict[str, Any] = {"states": None, "step": None}
        if self.cuda_graph and self.device.type == "cuda":
            from ..training.cuda_graph import GraphedTrainStep

            def graph_loss(m, b):
                if not settings.state_passing:
                    return loss_fn(m, b, None)
                carried["step"] = _passed_states(m, carried["states"], _batch_rows(b))
                return loss_fn(m, b, carried["step"])

            def carry_states():
                rows = carried["states"].batch_size
                carried["states"].index_copy_(torch.arange(rows, device=self.device), carried["step"])

            # the rate lives in a tensor the graph reads: one graph serves the warm-up and any schedule
            graphed = GraphedTrainStep(model, optimizer, graph_loss, grad_clip=settings.grad_clip,
                                       autocast_dtype=torch.bfloat16 if use_autocast else None,
                                       after_step=carry_states if settings.state_passing else None,
                                       scheduled_lr=True)
        model.train()
        bar = _progress(self.progress, total=settings.steps, initial=step, desc=f"{self.name} {key}")
        t0 = time.monotonic()
        pending = []  # losses not yet read back (reading each step would sync the GPU every step)
        while step < settings.steps:
            if self.out_of_time():
                break
            batch = make_batch(step, torch.Generator().manual_seed(batch_seed(settings.seed, step)))
            batch = batch.to(self.device) if hasattr(batch, "to") else tuple(b.to(self.device) for b in batch)
            if graphed is not None:
                if settings.state_passing and carried["states"] is None:  # the resumed run's states, carried on
                    carried["states"] = _passed_states(model, states, _batch_rows(batch))
                graphed.set_lr(lr_at(step, cfg))
                loss = graphed.step(batch)  # one graph replay per step (after its eager warm-up calls)
                states = carried["states"]
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                if settings.state_passing:
                    states = _passed_states(model, states, _batch_rows(batch))
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    loss = loss_fn(model, batch, states)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(loss.detach().float())
            if step % settings.log_every == 0 or step == settings.steps:
                value = float(torch.stack(pending).mean())
                pending.clear()
                if not math.isfinite(value):
                    raise RuntimeError(f"{key}: the training loss became {value} at step {step}")
                losses.append([step, value])
                bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            if validate is not None and settings.eval_every and step % settings.eval_every == 0:
                metrics = _validated(model, validate)
                val_history.append([step, metrics])
                measured = [v for v in metrics.values() if v is not None]
                bar.set_postfix(loss=losses[-1][1] if losses else None, val=min(measured) if measured else None)
                score = _lowest(metrics)
                if best is None or score >= best["score"]:
                    best = {"step": step, "score": score,
                            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                if _target_met(val_history, settings):
                    early_stop = step
                    break
            if step % settings.save_every == 0 and step < settings.steps:
                self._save_training(resume_file, model, optimizer, step, losses, train_s + time.monotonic() - t0,
                                    val_history, states, best)
        bar.close()
        train_s += time.monotonic() - t0
        # kept: --steps may extend it
        self._save_training(resume_file, model, optimizer, step, losses, train_s, val_history, states, best)
        if step < settings.steps and early_stop is None:
            self.incomplete = True
            return None
        selected = step
        if early_stop is None and best is not None and best["step"] != step:
            model.load_state_dict(best["model"])  # the best evaluation's weights, not the last step's
            selected = best["step"]
        model.eval()
        save(model, folder)
        _write_json(folder / "done.json", {"steps": step, "train_s": train_s, "losses": losses,
                                           "final_loss": losses[-1][1] if losses else None,
                                           "params": sum(p.numel() for p in model.parameters()),
                                           "seed": settings.seed, "val_history": val_history,
                                           "early_stop_step": early_stop, "selected_step": selected,
                                           "cuda_graph": None if graphed is None else {
                                               "captures": graphed.captures, "replays": graphed.replays,
                                               "failed": graphed.disabled}})
        self._save_meta()
        return model

    def _save_training(self, path: Path, model, optimizer, step: int, losses: list, train_s: float,
                       val_history: list, states=None, best: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # the passed states too: a resumed state-passing run continues from the states it stopped with
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                    "train_s": train_s, "val_history": val_history, "best": best,
                    "states": None if states is None else _passed_states(model, states, states.batch_size)}, tmp)
        tmp.replace(path)  # atomic: a run killed while saving keeps the previous state
        self._save_meta()

    def trained_model(self, spec: ModelSpec) -> MambaLM:
        """The saved model of a finished `spec` (run.train returned it once), in eval mode."""
        return MambaLM.from_pretrained(self.state / spec.key / "model", device=self.device).eval()

    def training_record(self, spec: ModelSpec) -> dict:
        """steps, train_s, final_loss, losses, params of a trained model."""
        return _read_json(self.state / spec.key / "done.json")

    def export_checkpoint(self, spec: ModelSpec, model: MambaLM) -> str | None:
        """Copy the trained model to <out>/<key>/ when the spec asks for it; returns the folder name."""
        if not spec.save_checkpoint:
            return None
        model.save_pretrained(self.out / spec.key)
        return spec.key

    # ---------------------------------------------------------------- evaluation

    def cached(self, spec: ModelSpec | str, name: str, compute: Callable[[], dict]) -> dict | None:
        """compute() once per trained model (memoised in _state/evals/<key>/<name>.json; `spec` a ModelSpec or
        the key given to `fit`); None when out of time before it, or when it would not finish in the time left
        (`eval_fits`): the next piece does it. Extending the model drops it."""
        key = spec if isinstance(spec, str) else spec.key
        path = self.state / "evals" / key / f"{name}.json"
        value = _read_json(path)
        if value is not None:
            return value
        if self.out_of_time() or not self.eval_fits(name) or not self._claim(key):
            self.incomplete = True
            return None
        t0 = time.monotonic()
        value = compute()
        _write_json(path.with_name(f"{name}.time.json"), {"seconds": round(time.monotonic() - t0, 3)})
        _write_json(path, value)
        self._save_meta()
        return value

    def eval_fits(self, name: str) -> bool:
        """Whether evaluation `name` should finish before the deadline, judged by the longest one of that name
        timed in this run so far (any model, any piece; _state/evals/<key>/<name>.time.json). Starting one that
        would overrun puts the piece past its budget, and past the device call's limit a killed process loses the
        evaluation; it is left to the next piece instead, unless it could never fit in a budget (then it runs)."""
        if self.deadline is None:
            return True
        longest = max((float((_read_json(p) or {}).get("seconds", 0.0))
                       for p in (self.state / "evals").glob(f"*/{name}.time.json")), default=0.0)
        return longest > self.time_budget_s or time.monotonic() + longest <= self.deadline

    # ---------------------------------------------------------------- results

    def write_results(self, rows: list[dict], settings: dict, readme: str) -> Path:
        """results.json (rows + stamp) and README.md (`readme`, then the stamp); returns results.json's path."""
        env = environment(self.device)
        stamp = {"experiment": self.name, "command": self.command, **env,
                 "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "run_time_s": round(self.elapsed_s(), 1), "pieces": self._pieces, "quick": self.quick}
        _write_json(self.out / "results.json", {**stamp, "settings": settings, "rows": rows})
        versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "mambakit", "python") if env[k])
        footer = (f"\n## How these numbers were produced\n\n```\n{self.command}\n```\n\n"
                  f"- device: {env['device']}\n- versions: {versions}\n- date: {stamp['date']}\n"
                  f"- run time: {stamp['run_time_s']:.0f} s in {self._pieces} invocation(s) (training + evaluation)\n"
                  "- times (run time, train s) are wall clock on a device shared with whatever else ran on it (this "
                  "run's workers, other runs): not speed measurements\n"
                  + ("- **quick mode**: tiny settings that test the pipeline; the numbers mean nothing\n"
                     if self.quick else ""))
        (self.out / "README.md").write_text(readme.rstrip() + "\n" + footer)
        self._save_meta()
        return self.out / "results.json"


def _passed_states(model, previous, batch_size: int):
    """A fresh cache (generation.allocate_cache) holding `previous`'s states without their autograd graph: the
    next batch starts from them and backpropagates into them, not through them (truncated backprop through time).
    Zero states when `previous` is None."""
    from ..generation import allocate_cache

    states = allocate_cache(model, batch_size)
    if previous is not None:
        with torch.no_grad():
            states.index_copy_(torch.arange(batch_size, device=states.layers[0].ssm_state.device), previous)
    return states


def _batch_rows(batch) -> int:
    """Rows of a batch: a SyntheticBatch's inputs, or a tuple's first tensor."""
    return (batch.inputs if hasattr(batch, "inputs") else batch[0]).shape[0]


def _validated(model, validate: Callable[[torch.nn.Module], dict]) -> dict[str, float | None]:
    """validate(model) in eval and inference mode (a metric it left unmeasured stays None); the model is back in
    training mode afterwards."""
    model.eval()
    try:
        with torch.inference_mode():
            return {name: None if value is None else float(value) for name, value in validate(model).items()}
    finally:
        model.train()


def _lowest(metrics: dict) -> float:
    """An evaluation's score: its lowest metric; one left unmeasured (None) makes it -1, below any accuracy."""
    return min(-1.0 if v is None else v for v in metrics.values())


def _target_met(val_history: list, settings: TrainSettings) -> bool:
    """Whether the last `target_evals` evaluations all have every metric >= target (a metric the validation left
    unmeasured, None, is not met)."""
    if settings.target is None or len(val_history) < settings.target_evals:
        return False
    return all(_lowest(m) >= settings.target for _, m in val_history[-settings.target_evals:])


def curriculum_length(step: int, stages, full: int) -> int:
    """Row length of training batch `step` under a length curriculum: the (length, steps) `stages` in turn, then
    `full` to the end (so `--steps N` extends a model at the full length). A pure function of the step, as resuming
    needs."""
    end = 0
    for length, steps in stages:
        end += steps
        if step < end:
            return length
    return full


def seeded(spec: ModelSpec, seed: int) -> ModelSpec:
    """`spec` trained from `seed` (initialisation and batches): its own state folder `<key>-seed<seed>`."""
    return dataclasses.replace(spec, key=f"{spec.key}-seed{seed}", train=dataclasses.replace(spec.train, seed=seed))


def spread(values: list[float]) -> dict:
    """median, min and max of per-seed values (the median of an even count is the mean of the middle two)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def median_index(values: list[float]) -> int:
    """Index of the value at the (lower) median: the seed whose checkpoint represents the row."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(values) - 1) // 2]


def context_verdict(series: dict[str, dict[int, float]], selective: str, baseline: str, unit: str) -> str:
    """What a lower-is-better metric does as the training context grows, per model, and whether the Mamba paper's
    claim holds: the selective model's value falls from the shortest context to the longest, by more than the
    time-invariant baseline's (or the baseline's rises more). Markdown lines, then the verdict.

    Args:
        series: {model label: {context: value}}; selective, baseline: two of its labels; unit: e.g. "bits per sample".

    Example:
        >>> context_verdict({"Mamba": {1024: 3.7, 4096: 3.6}, "S4D": {1024: 3.6, 4096: 3.6}}, "Mamba", "S4D", "ppl")
    """
    lines, change = [], {}
    for label, values in series.items():
        seen = [values[L] for L in sorted(values)]
        if len(seen) < 2:
            continue
        steps = [b - a for a, b in zip(seen, seen[1:])]
        trend = ("falls at every longer context" if all(d < 0 for d in steps) else
                 "rises at every longer context" if all(d > 0 for d in steps) else "does not move one way")
        best = min(values, key=values.get)
        change[label] = seen[-1] - seen[0]
        lines.append(f"- {label}: {seen[0]:.3f} -> {seen[-1]:.3f} {unit} ({change[label]:+.3f}); it {trend} "
                     f"(best at 2^{int(math.log2(best))}).")
    mine, theirs = change.get(selective), change.get(baseline)
    if mine is None or theirs is None:
        return "\n".join(lines)
    if mine < 0 and mine < theirs:
        verdict = (f"The paper's claim holds here: {selective} improves with longer training context, more than "
                   f"{baseline}.")
    elif mine < theirs:
        verdict = (f"The paper's claim does not hold at this budget and on this data: longer training context does not "
                   f"improve {selective}; it only loses less than {baseline}.")
    else:
        verdict = (f"The paper's claim does not hold at this budget and on this data: {selective} gains no more from "
                   f"longer training context than {baseline}.")
    return "\n".join(lines + ["", verdict])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def loss_plot(path: Path, curves: dict[str, list], title: str) -> None:
    """Training loss against step for each model (log scale)."""
    fig, ax = figure(figsize=(6, 4))
    for label, losses in curves.items():
        if losses:
            steps, values = zip(*losses)
            ax.plot(steps, values, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy on scored positions)")
    save_plot(fig, path, ax, title)


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **subplots_kwargs):
    """(Figure, axes) drawn off screen: matplotlib's object API, so the caller's pyplot backend is left alone.
    subplots_kwargs go to Figure.subplots (squeeze, sharey, ...)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots_kwargs)


def save_plot(fig, path: Path, ax=None, title: str | None = None, legend: bool = True) -> None:
    """The ending every results plot shares: `ax`'s title and small legend, a tight layout, a PNG at 120 dpi."""
    if ax is not None:
        if title is not None:
            ax.set_title(title)
        if legend:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)
