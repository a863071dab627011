"""The training loop: AdamW, warmup + cosine, grad clipping, periodic held-out bits per byte, checkpoints, torchrun.

Shapes:
    batch     windows per step on this process (TrainConfig.batch_size)
    seqlen    tokens per window fed to the model (a window holds seqlen + 1 tokens)
    vocab     the tokenizer's vocabulary (the model's logits are padded to a multiple of 8)

One step: inputs (batch, seqlen) -> logits (batch, seqlen, padded vocab) -> mean cross-entropy over
the real vocabulary -> backward (DDP averages gradients over processes) -> clip -> AdamW step at
lr_at(step). Everything that decides a step's numbers (weights, optimizer moments, the sampler's
generator, the step count) is in the checkpoint, so a resumed run repeats an uninterrupted one.

Nothing is lost (see checkpoint.py for the checkpoint layout):
    - a step whose loss or gradient norm is not finite stops the run with `TrainingDiverged` before the
      optimizer applies it, and nothing is saved over the last good checkpoint (cfg.on_nonfinite="skip"
      skips such steps instead);
    - with handle_signals, the first SIGINT / SIGTERM ends the run at the next step boundary with a
      checkpoint (TrainResult.interrupted names the signal); a second one exits at once;
    - metrics.json is strict JSON: a non-finite number is written as null.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import (ByteTokenizer, HFTokenizer, RandomWindows, WindowBatch, eval_target_count, load_token_streams,
                    split_window)
from ..evaluation import evaluate_bits_per_byte, token_nll_sum
from .checkpoint import Checkpoint, remove_strays, resolve_checkpoint, save_checkpoint
from .config import TrainConfig, lr_at, model_config
from .cpu_threads import CPUThreadGovernor
from .distributed import DistInfo, all_reduce_mean, destroy_distributed, dist_info_from_env, init_distributed

__all__ = ["TrainResult", "TrainingDiverged", "train", "build_optimizer", "resolve_device", "forward_backward",
           "default_out_dir"]

_MAX_SKIPPED_IN_A_ROW = 20  # with on_nonfinite="skip": more non-finite steps in a row than this is divergence


class TrainingDiverged(RuntimeError):
    """A training step's loss or gradient norm was not finite (NaN or infinite); nothing was saved over
    the last good checkpoint. `step` is the step that failed (1-based), `checkpoint_step` the last saved one."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


@dataclass
class TrainResult:
    """What a call to `train` did (rank 0's view; losses are averaged over processes)."""

    step: int  # optimizer steps done in total (including before a resume)
    losses: list[float]  # training loss of every step since step 0
    evals: list[dict] = field(default_factory=list)  # {"step", "loss", "bpb", "tokens"} per held-out evaluation
    val_loss: float | None = None  # final held-out nats per token
    val_bpb: float | None = None  # final held-out bits per byte
    elapsed_s: float = 0.0  # wall time of this call
    stopped_by_budget: bool = False
    out_dir: str = ""
    sample: str | None = None
    interrupted: str | None = None  # "SIGINT" or "SIGTERM" when a signal ended the run (checkpoint saved, no final eval)
    skipped_steps: int = 0  # non-finite steps skipped (cfg.on_nonfinite == "skip")


def default_out_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else Path("runs") / cfg.recipe


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch.device (ValueError if unusable).

    Example:
        >>> resolve_device("auto")          # device(type='cpu') on a machine without CUDA
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r} ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _no_decay_ids(model: torch.nn.Module) -> set[int]:
    """Parameters kept out of weight decay: those marked `_no_weight_decay` (A_log, D, dt_bias),
    vectors (norm weights, biases) and embeddings (tied to the output head)."""
    ids = {id(p) for p in model.parameters() if getattr(p, "_no_weight_decay", False) or p.dim() < 2}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            ids.add(id(module.weight))
    return ids


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on `_no_decay_ids` (fused on CUDA).

    The learning rate is set by the loop at every step from `lr_at(step, cfg)`.

    Example:
        >>> opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    no_decay = _no_decay_ids(model)
    params = list(dict.fromkeys(model.parameters()))  # tied weights appear once
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), fused=fused)


def forward_backward(model: torch.nn.Module, window: torch.Tensor | WindowBatch, vocab_size: int,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seqlen + 1) window, backpropagated. Returns the detached loss.

    A `WindowBatch` (data.split_window) carries inputs, targets and the seq_idx of packed documents, which
    the model gets so that its state restarts at each document boundary; a plain tensor runs without resets.

    Under DistributedDataParallel the backward averages the gradients over processes, so with
    equal per-rank batches the result is the gradient of the mean over the global batch.

    Example:
        >>> loss = forward_backward(model, sampler.next_batch(), vocab_size=256)   # grads now in .grad
    """
    inputs, targets, seq_idx = window if isinstance(window, WindowBatch) else split_window(window, None)
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(inputs) if seq_idx is None else model(inputs, seq_idx=seq_idx)  # (batch, seqlen, padded vocab)
    loss = token_nll_sum(logits, targets, vocab_size) / targets.numel()
    loss.backward()
    return loss.detach()


def _load_data(cfg: TrainConfig):
    """Tokenizer, (train, held-out) document counts and their token streams (from the token cache)."""
    if cfg.tokenizer == "nucleotides":  # `--task dna`: FASTA genomes, one token per base (data/dna.py)
        from ..data.dna import load_dna_corpus

        tokenizer, (train_records, val_records), train, val = load_dna_corpus(cfg.data, cfg.val_fraction)
        return tokenizer, (len(train_records), len(val_records)), train, val
    tokenizer = ByteTokenizer() if cfg.tokenizer == "bytes" else HFTokenizer(cfg.tokenizer)
    streams = load_token_streams(cfg.data, tokenizer, val_fraction=cfg.val_fraction, token_cache=cfg.token_cache,
                                 num_proc=cfg.tokenize_procs, streaming=cfg.streaming, text_column=cfg.text_column,
                                 progress=cfg.progress)
    return tokenizer, (streams.documents["train"], streams.documents["val"]), streams.train, streams.val


def _build_or_resume(cfg: TrainConfig, vocab: int, device: torch.device, sampler: RandomWindows,
                     checkpoint: Checkpoint | None):
    """A fresh model and optimizer at step 0, or everything restored from a verified checkpoint."""
    from ..models import MambaLM, build_model

    if checkpoint is None:
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        model = build_model(model_config(cfg, vocab)).to(device)
        return model, build_optimizer(model, cfg), 0, {"losses": [], "evals": []}
    state = checkpoint.state
    model = MambaLM.from_pretrained(checkpoint.path, device=device)
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    # after from_pretrained, whose fresh initialisation draws from the global generator
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return model, optimizer, state["step"], state["history"]


class _Printer:
    """Prints on the main process only, through tqdm when a bar is showing (so lines do not tear it)."""

    def __init__(self, info: DistInfo):
        self.info, self.bar = info, None

    def __call__(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def train(cfg: TrainConfig, *, resume: bool = False, stop_at_step: int | None = None,
          checkpoint: Checkpoint | None = None, handle_signals: bool = False,
          adapt_cpu_threads: bool = False) -> TrainResult:
    """Train (or resume) the run described by `cfg`; write checkpoints into `cfg.out_dir` (default runs/<recipe>).

    Args:
        cfg: the run. On resume, the caller passes the TrainConfig stored in the checkpoint
            (`load_train_state(dir)["config"]`), changing at most time_budget_s, device, progress.
        resume: continue from the newest complete checkpoint in out_dir (`resolve_checkpoint`): same
            weights, optimizer, sampler and step.
        stop_at_step: stop (evaluate, save) after this step without changing the schedule,
            as the time budget does; for interrupting a run deterministically.
        checkpoint: with resume, the checkpoint to continue from, if the caller has resolved it already.
        handle_signals: the first SIGINT / SIGTERM stops at the next step boundary and saves (the
            command-line tool's behaviour); a second one exits at once. Main thread, single process only.
        adapt_cpu_threads: on CPU, set torch's thread count to the cores other processes leave idle and
            keep adjusting it (cpu_threads.CPUThreadGovernor; restored at the end). The thread count can
            change the last bits of float sums: leave it off for bit-exact reproducibility.
    Raises:
        TrainingDiverged: a non-finite loss or gradient norm (cfg.on_nonfinite == "stop").

    Under torchrun (RANK/WORLD_SIZE set) every process calls this; each reads different windows,
    gradients are averaged by DistributedDataParallel, and only rank 0 prints and writes.

    Example:
        >>> from mambakit.training import default_recipe, train
        >>> result = train(default_recipe().replace(max_steps=200, out_dir="runs/short"))
        >>> result.val_bpb
    """
    t_start = time.perf_counter()
    info = dist_info_from_env()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    created_group = init_distributed(info, device)
    say = _Printer(info)
    out_dir = default_out_dir(cfg)
    autocast_dtype = torch.bfloat16 if (cfg.autocast == "bf16" and device.type == "cuda") else None
    threads_before = torch.get_num_threads()
    governor = CPUThreadGovernor(enabled=adapt_cpu_threads and device.type == "cpu" and not info.distributed)
    signals = _SignalStop(enabled=handle_signals and not info.distributed)
    try:
        if info.distributed and not info.is_main:
            torch.distributed.barrier()  # rank 0 builds the token cache first; the others then read it
        tokenizer, (n_train_docs, n_val_docs), train_stream, val_stream = _load_data(cfg)
        if info.distributed and info.is_main:
            torch.distributed.barrier()
        doc_eos = tokenizer.eos_id if cfg.reset_at_eos else None  # seq_idx restarts the state at each EOS
        sampler = RandomWindows(train_stream, cfg.seqlen, cfg.batch_size, cfg.seed, info.rank, info.world_size)
        vocab = tokenizer.vocab_size
        if resume and checkpoint is None:
            checkpoint = resolve_checkpoint(out_dir)
        if resume and info.is_main:
            remove_strays(out_dir)
        model, optimizer, step, history = _build_or_resume(cfg, vocab, device, sampler, checkpoint if resume else None)
        saved_step = step if resume else None  # the step of the newest checkpoint on disk
        raw_model = model
        for module in raw_model.modules():  # activation recomputation is a training setting, not a weight
            if hasattr(module, "recompute"):
                module.recompute = cfg.recompute
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        n_params = sum(p.numel() for p in dict.fromkeys(raw_model.parameters()))
        say(f"mambakit train: recipe {cfg.recipe}: {cfg.layer}, d_model {cfg.d_model}, {cfg.n_layer} layers, "
            f"{n_params / 1e6:.2f}M parameters, on {device}"
            + (f" x {info.world_size} processes" if info.distributed else ""))
        say(f"data: {cfg.data or 'built-in Shakespeare'}: {n_train_docs} documents, {len(train_stream):,} tokens "
            f"for training; {n_val_docs} held out, {len(val_stream):,} tokens; tokenizer {tokenizer!r}")
        if resume:
            say(f"resuming from {checkpoint.path} at step {step}")

        def evaluate(max_tokens: int | None) -> dict:
            loss, bpb = evaluate_bits_per_byte(raw_model, val_stream, cfg.seqlen, cfg.eval_batch_size, max_tokens,
                                               autocast_dtype=autocast_dtype, rank=info.rank, world_size=info.world_size,
                                               reset_at_eos=cfg.reset_at_eos)
            return {"step": step, "loss": loss, "bpb": bpb, "tokens": eval_target_count(val_stream, max_tokens)}

        pending: list[torch.Tensor] = []  # losses not yet copied to the host (avoids a sync per step on GPU)

        def flush_losses() -> None:
            if pending:
                history["losses"].extend(all_reduce_mean(torch.stack(pending), info).tolist())
                pending.clear()

        def save() -> bool:
            """Write a checkpoint of this step, unless the newest one on disk is of this step already."""
            nonlocal saved_step
            flush_losses()
            if step == saved_step:
                return False
            if info.is_main:
                save_checkpoint(out_dir, model=raw_model, tokenizer=tokenizer, optimizer=optimizer,
                                sampler_state=sampler.state_dict(), step=step, config=cfg, history=history,
                                keep=cfg.keep_checkpoints)
            saved_step = step
            return True

        # ---- loop
        tokens_per_step = cfg.batch_size * cfg.seqlen * info.world_size
        bar = None
        if info.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, desc="train")
            say.bar = bar
        stopped_by_budget = False
        skipped = skipped_in_a_row = 0
        t_loop, step0 = time.perf_counter(), step
        model.train()
        while step < cfg.max_steps and (stop_at_step is None or step < stop_at_step) and not signals.received:
            if cfg.time_budget_s is not None and _out_of_time(t_start, cfg.time_budget_s, info, step, cfg.log_every):
                stopped_by_budget = True
                break
            governor.update()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window = split_window(sampler.next_batch().to(device, non_blocking=True), doc_eos)  # (batch, seqlen) x 3
            loss = forward_backward(model, window, vocab, autocast_dtype)
            pending.append(loss)
            # the total norm is computed even without clipping (an infinite max norm scales by exactly 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # one host sync per step: a non-finite step must be caught before the optimizer applies it
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            if info.distributed:
                finite = all_reduce_mean(finite.float(), info) == 1.0
            if bool(finite):
                optimizer.step()
                skipped_in_a_row = 0
            else:
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                if cfg.on_nonfinite == "stop" or skipped_in_a_row > _MAX_SKIPPED_IN_A_ROW:
                    flush_losses()
                    raise _diverged(step + 1, float(loss), float(grad_norm), saved_step, out_dir, cfg, skipped_in_a_row)
                say(f"step {step + 1}: non-finite loss ({float(loss):.4g}) or gradient norm ({float(grad_norm):.4g}): "
                    "step skipped")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                flush_losses()
                if bar is not None:
                    tok_s = (step - step0) * tokens_per_step / (time.perf_counter() - t_loop)
                    bar.set_postfix(loss=f"{history['losses'][-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                record = evaluate(cfg.eval_tokens)
                history["evals"].append(record)
                say(f"step {step}: held-out {record['loss']:.4f} nats/token, {record['bpb']:.3f} bits/byte "
                    f"({record['tokens']:,} tokens)")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save()
        if bar is not None:
            bar.close()
            say.bar = None
        flush_losses()
        train_s = time.perf_counter() - t_loop
        if signals.received:
            # no final evaluation: whoever sent the signal wants the process gone soon
            save()
            say(f"{signals.received} at step {step}/{cfg.max_steps}: checkpoint saved in {out_dir}; continue with "
                f"`mambakit train --resume --out {out_dir}`")
            return TrainResult(step=step, losses=list(history["losses"]), evals=list(history["evals"]),
                               elapsed_s=time.perf_counter() - t_start, out_dir=str(out_dir),
                               interrupted=signals.received, skipped_steps=skipped)
        if stopped_by_budget:
            say(f"time budget of {cfg.time_budget_s:g} s reached at step {step}/{cfg.max_steps}: stopping "
                f"(continue with --resume)")

        # ---- final evaluation, checkpoint, sample
        final = evaluate(cfg.final_eval_tokens)
        history["evals"].append(final)
        saved = save()
        result = TrainResult(step=step, losses=list(history["losses"]), evals=list(history["evals"]),
                             val_loss=final["loss"], val_bpb=final["bpb"], stopped_by_budget=stopped_by_budget,
                             out_dir=str(out_dir), skipped_steps=skipped)
        steps_done = step - step0
        say(f"trained {steps_done} steps ({step}/{cfg.max_steps}) in {train_s:.1f} s, "
            f"{steps_done * tokens_per_step / max(train_s, 1e-9):,.0f} tokens/s"
            + (f"; {skipped} non-finite steps skipped" if skipped else ""))
        say(f"held-out: {final['loss']:.4f} nats/token, {final['bpb']:.3f} bits/byte ({final['tokens']:,} tokens)")
        say(f"saved to {out_dir}" if saved else f"checkpoint of step {step} already in {out_dir}")
        if info.is_main and cfg.sample_tokens > 0:
            result.sample = _sample(raw_model, tokenizer, cfg)
            say(f"sample (temperature {cfg.sample_temperature:g}):\n{cfg.sample_prompt}{result.sample}")
        result.elapsed_s = time.perf_counter() - t_start
        if info.is_main:
            metrics = {"step": step, "max_steps": cfg.max_steps, "val_loss": final["loss"], "val_bpb": final["bpb"],
                       "val_tokens": final["tokens"], "train_s": train_s, "wall_s": result.elapsed_s,
                       "stopped_by_budget": stopped_by_budget, "skipped_steps": skipped,
                       "final_train_loss": history["losses"][-1] if history["losses"] else None}
            write_metrics(out_dir / "metrics.json", metrics)
        return result
    finally:
        signals.restore()
        if governor.enabled:
            torch.set_num_threads(threads_before)
        destroy_distributed(created_group)


def _diverged(step: int, loss: float, grad_norm: float, saved_step: int | None, out_dir: Path, cfg: TrainConfig,
              in_a_row: int) -> TrainingDiverged:
    kept = (f"the last checkpoint (step {saved_step}) in {out_dir} is untouched" if saved_step is not None
            else "no checkpoint was written")
    what = (f"{in_a_row} steps in a row had a non-finite loss or gradient norm" if in_a_row > 1
            else f"loss {loss:.4g}, gradient norm {grad_norm:.4g}")
    hint = "lower the learning rate (--lr)" + ("" if cfg.on_nonfinite == "skip" else
                                               ", or skip such steps with --skip-nonfinite")
    return TrainingDiverged(f"training diverged at step {step} ({what}); stopped without saving: {kept}; {hint}",
                            step, saved_step)


def _json_safe(obj):
    """obj with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_metrics(path: Path, metrics: dict) -> None:
    """Write `metrics` as strict JSON (non-finite numbers as null), atomically (temporary file + os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _SignalStop:
    """SIGINT / SIGTERM handlers for a run: the first asks the loop to stop at the next step boundary (it then
    saves and returns); a second exits at once (KeyboardInterrupt for SIGINT, SystemExit(143) for SIGTERM)."""

    _CODES = {"SIGINT": 130, "SIGTERM": 143}

    def __init__(self, enabled: bool):
        self.received: str | None = None
        self._previous = {}
        if not enabled or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"\n{name}: stopping after this step and saving a checkpoint (again to exit at once)", flush=True)
            return
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(self._CODES[name])

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _out_of_time(t_start: float, budget_s: float, info: DistInfo, step: int, every: int) -> bool:
    """Whether the time budget is spent. Under torchrun all ranks must stop at the same step:
    rank 0's clock decides, broadcast every `every` steps (not every step: each broadcast is a sync)."""
    if not info.distributed:
        return time.perf_counter() - t_start > budget_s
    if step % every:
        return False
    import torch.distributed as dist

    flag = torch.tensor([float(time.perf_counter() - t_start > budget_s)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _sample(model: torch.nn.Module, tokenizer, cfg: TrainConfig) -> str:
    from ..generation import generate

    prompt = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(cfg.sample_prompt)
    new = generate(model, [prompt], cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                   eos_token_id=tokenizer.eos_id, seed=cfg.seed)[0]
    if new and new[-1] == tokenizer.eos_id:  # the document ended: drop the separator itself
        new = new[:-1]
    return tokenizer.decode(new)
