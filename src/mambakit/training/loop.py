"""The training loop: AdamW, warmup + cosine, grad clipping, gradient accumulation, periodic held-out bits per byte,
checkpoints, metrics.jsonl, torchrun (DDP or FSDP2).

Shapes:
    batch     windows per micro-step on this process (TrainConfig.batch_size)
    accum     micro-steps per optimizer step (TrainConfig.grad_accum)
    seqlen    tokens per window fed to the model (a window holds seqlen + 1 tokens)
    vocab     the tokenizer's vocabulary (the model's logits are padded to a multiple of 8)

One step: the sampler draws (accum * batch, seqlen + 1) windows for this process; each micro-batch runs
inputs (batch, seqlen) -> logits (batch, seqlen, padded vocab) -> mean cross-entropy over the real
vocabulary -> backward, the gradients summing up (synced across processes on the last micro-step only:
DDP's no_sync, FSDP2's set_requires_gradient_sync) -> divide by accum -> clip -> AdamW step at
lr_at(step). The sampler draws the windows of the whole global batch from one generator, so
N processes x accum micro-steps x batch windows read exactly the windows of one process with
N x accum x batch: the same numbers up to float summation order. Everything that decides a step's
numbers (weights, optimizer moments, the sampler's generator, the step count) is in the checkpoint,
so a resumed run repeats an uninterrupted one; an FSDP2 checkpoint (torch.distributed.checkpoint)
also resumes on another number of processes with the same global batch.

`Run` holds a run's state and does its parts (`step`, `evaluate`, `save`, `finish`); `train` drives it.
Messages go to the `logging` logger "mambakit.training" on rank 0 only (`mambakit train` shows them
on stdout); per-step numbers go to out_dir/metrics.jsonl (metrics.py).

Nothing is lost (see checkpoint.py for the checkpoint layout):
    - a step whose loss or gradient norm is not finite is never applied: the run stops with `TrainingDiverged`
      and nothing is saved over the last good checkpoint (cfg.on_nonfinite="skip" skips such steps instead).
      With fused AdamW (CUDA, and the CPU over plain tensors) the check stays on the device: `found_inf` leaves
      parameters, moments and step counts untouched, and with "stop" a sticky flag keeps every later step
      unapplied too, so the host reads the flags only where it reads the losses (each metrics record,
      evaluation, checkpoint and the end of the run) and queues the next step while the GPU runs this one. The
      outcome is the eager read's: the same steps skipped, the same step named in the error. An optimizer that
      cannot skip on the device (FSDP2's foreach AdamW) reads the flag after every step, before applying it;
    - with handle_signals, the first SIGINT / SIGTERM ends the run at the next step boundary with a
      checkpoint (TrainResult.interrupted names the signal); a second one exits at once;
    - metrics.json is strict JSON: a non-finite number is written as null.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import IGNORE_INDEX, ByteTokenizer, HFTokenizer, RandomWindows, WindowBatch, load_token_streams, split_window
from ..evaluation import evaluate_stream, token_nll_sum
from .checkpoint import (
    Checkpoint,
    keep_own_implementation,
    load_sharded_state,
    remove_strays,
    resolve_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .config import TrainConfig, lr_at, model_config
from .cpu_threads import CPUThreadGovernor
from .distributed import (
    DistInfo,
    all_reduce_mean,
    destroy_distributed,
    dist_info_from_env,
    init_distributed,
    wrap_model,
)
from .metrics import MetricsWriter, plot_metrics

__all__ = ["Run", "TrainResult", "TrainingDiverged", "train", "build_optimizer", "resolve_device", "forward_backward",
           "default_out_dir"]

log = logging.getLogger("mambakit.training")

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


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters kept out of weight decay: those marked `_no_weight_decay` (A_log, D, dt_bias),
    vectors (norm weights, biases) and embeddings (tied to the output head). By name, because FSDP2 replaces
    the parameter objects (and their marks) while keeping their names."""
    names = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False) or p.dim() < 2}
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            names.add(f"{prefix}.weight" if prefix else "weight")
    return names


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, no_decay: set[str] | None = None) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on `no_decay_names(model)` (fused over plain tensors).

    The learning rate is set by the loop at every step from `lr_at(step, cfg)`. Pass `no_decay` (computed
    before wrapping) for a model that FSDP2 has sharded.

    Example:
        >>> opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    no_decay = no_decay_names(model) if no_decay is None else no_decay
    named = list(dict((id(p), (n, p)) for n, p in model.named_parameters()).values())  # tied weights appear once
    groups = [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]
    param = named[0][1]
    # Fused on CUDA over plain tensors. FSDP2's sharded parameters (param.data a DTensor) go through foreach:
    # the fused kernel accepts DTensors too (same result: tests/test_training_scale.py), but over them it made
    # more host calls per step than foreach (19.4k vs 12.6k, BENCHMARKS.md "Host work"), and FSDP2 steps are
    # host-bound. `benchmarks/gpu_parallel.py --cases fsdp fsdp-fusedopt` compares the two on a GPU.
    # The CPU takes the fused kernel too: it skips a non-finite step on its own (`found_inf`), as on CUDA.
    fused = param.device.type in ("cuda", "cpu") and type(param.data) is torch.Tensor
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), fused=fused)


def autocast_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of TrainConfig.autocast on `device`: bf16 on CUDA for "bf16" and "bf16+cpu", on a CPU
    for "bf16+cpu" only (with a warning when the CPU has no native bf16 matmul, where it runs slower), else None."""
    if setting == "none" or (device.type != "cuda" and setting != "bf16+cpu"):
        return None
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("autocast bf16+cpu: this CPU has no native bf16 matrix instructions (AVX512-BF16 / AMX), so "
                    "bf16 steps may be slower than float32 ones (--autocast bf16 keeps a CPU in float32)")
    return torch.bfloat16


def forward_backward(model: torch.nn.Module, window: torch.Tensor | WindowBatch, vocab_size: int,
                     autocast_dtype: torch.dtype | None = None, chunked_loss: bool = True,
                     scored_only: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seqlen + 1) window, backpropagated. Returns the detached loss.

    With `scored_only` the targets set to IGNORE_INDEX (data.split_window's `scored` mask: a conversation's
    non-assistant tokens) are left out, and the mean is over the others (per micro-batch).

    A `WindowBatch` (data.split_window) carries inputs, targets and the seq_idx of packed documents, which
    the model gets so that its state restarts at each document boundary; a plain tensor runs without resets.

    Under DistributedDataParallel the backward averages the gradients over processes, so with
    equal per-rank batches the result is the gradient of the mean over the global batch.
    With `chunked_loss` a MambaLM computes the loss itself (`model(inputs, targets=...)`, ops.linear_cross_entropy:
    no (batch, seqlen, vocab) logits); otherwise, and for other models, the loss is taken from the whole logits.

    Example:
        >>> loss = forward_backward(model, sampler.next_batch(), vocab_size=256)   # grads now in .grad
    """
    inputs, targets, seq_idx = window if isinstance(window, WindowBatch) else split_window(window, None)
    extra = {} if seq_idx is None else {"seq_idx": seq_idx}
    # the mean over the scored targets: all of them, or those a conversation's mask left (IGNORE_INDEX elsewhere;
    # a batch with none scores 0); the same number either way for a batch without a mask
    n_scored = (targets != IGNORE_INDEX).sum().clamp_min(1) if scored_only else targets.numel()
    own_loss = chunked_loss and _scores_targets(model)
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if own_loss:
            # the model's own loss (ops.linear_cross_entropy): never the (batch, seqlen, vocab) logits
            loss = model(inputs, targets=targets, vocab_size=vocab_size, reduction="sum", **extra) / n_scored
        else:
            logits = model(inputs, **extra)  # (batch, seqlen, padded vocab)
    if not own_loss:
        loss = token_nll_sum(logits, targets, vocab_size) / n_scored
    loss.backward()
    return loss.detach()


def _scores_targets(model: torch.nn.Module) -> bool:
    """Whether `model` (or the MambaLM inside a DDP / compile wrapper) takes `targets=` and returns the loss."""
    from ..models import MambaLM  # training imports the models where it uses them (as Run does)

    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return isinstance(inner, MambaLM)


def _load_data(cfg: TrainConfig, checkpoint: Checkpoint | None = None):
    """Tokenizer, (train, held-out) document counts, their token streams (from the token cache) and, for a
    conversation set (cfg.chat), the held-out conversations (else None). A resumed run reads tokenizer "init" from
    its checkpoint (which holds it), not from init_from again."""
    if cfg.tokenizer == "nucleotides":  # `--task dna`: FASTA genomes, one token per base (data/dna.py)
        from ..data.dna import load_dna_corpus

        tokenizer, (train_records, val_records), train, val = load_dna_corpus(cfg.data, cfg.val_fraction)
        return tokenizer, (len(train_records), len(val_records)), train, val, None
    if cfg.tokenizer == "init" and checkpoint is not None:
        from ..checkpoints import load_checkpoint_tokenizer

        tokenizer = load_checkpoint_tokenizer(checkpoint.path)
    elif cfg.tokenizer == "init":  # the tokenizer saved with the model a fine-tuning run starts from
        from .finetune import init_tokenizer

        tokenizer = init_tokenizer(cfg)
    else:
        tokenizer = ByteTokenizer() if cfg.tokenizer == "bytes" else HFTokenizer(cfg.tokenizer)
    if cfg.chat:  # conversations: the assistant's tokens scored (stream.scored), rendered with a chat template
        from ..data.conversations import conversation_streams, unreached_scored

        if cfg.data is None:
            raise ValueError("chat fine-tuning needs data: a .jsonl / .json file (or a folder of them) of "
                             "conversations, {\"messages\": [{\"role\": ..., \"content\": ...}, ...]} per line")
        chats = conversation_streams(cfg.data, tokenizer, cfg.val_fraction, template=cfg.chat_template,
                                     train_loss=cfg.chat_loss, progress=cfg.progress)
        # saved with every checkpoint (checkpoints.save_checkpoint_fields): generate --chat and serve render
        # prompts as the model was trained, and stop where its turns end
        tokenizer.chat_template = chats.template
        tokenizer.stop_strings = tuple(dict.fromkeys((*getattr(tokenizer, "stop_strings", ()), *chats.stop_strings)))
        far, scored, longest = unreached_scored(chats.train, cfg.seqlen)
        if far:
            log.warning(f"{far:,} of the {scored:,} assistant tokens ({100 * far / scored:.1f}%) lie more than "
                        f"seqlen = {cfg.seqlen} tokens into their conversation and are never trained (windows start "
                        f"where a conversation starts; the longest has {longest:,} tokens): raise --seqlen to train "
                        "on them")
        return tokenizer, (chats.n_train, chats.n_val), chats.train, chats.val, chats.val_conversations
    streams = load_token_streams(cfg.data, tokenizer, val_fraction=cfg.val_fraction, token_cache=cfg.token_cache,
                                 num_proc=cfg.tokenize_procs, streaming=cfg.streaming, text_column=cfg.text_column,
                                 progress=cfg.progress)
    return tokenizer, (streams.documents["train"], streams.documents["val"]), streams.train, streams.val, None


class Run:
    """One training run (this process's part of it): model, optimizer, data, step count, outputs.

    `step()` does one optimizer step and what falls on it (a metrics record, an evaluation, a
    checkpoint); `evaluate()` scores the held-out stream; `save()` writes a checkpoint; `finish()`
    evaluates, saves, samples and returns the `TrainResult`; `close()` gives back what the run took
    (signal handlers, CPU threads, the process group). `train()` is the usual driver:

        run = Run(cfg)
        try:
            while (reason := run.stop_reason()) is None:
                run.step()
            result = run.finish(reason)
        finally:
            run.close()

    The arguments are those of `train`.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, checkpoint: Checkpoint | None = None,
                 handle_signals: bool = False, adapt_cpu_threads: bool = False):
        self.t_start = time.perf_counter()
        if (missing := cfg.missing_init_from()) is not None:
            raise ValueError(missing)
        self.cfg = cfg
        self.info = info = dist_info_from_env()
        device = resolve_device(cfg.device)
        if device.type == "cuda" and info.distributed:
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.out_dir = default_out_dir(cfg)
        self.autocast_dtype = autocast_dtype_for(cfg.autocast, device)
        self.sharded = cfg.parallel == "fsdp"  # checkpoints through torch.distributed.checkpoint
        if cfg.cuda_graph and (device.type != "cuda" or info.distributed):
            raise ValueError("cuda_graph: a training step is captured as a CUDA graph on one process with a CUDA "
                             f"device; this run has {device}" + (f" and {info.world_size} processes"
                                                                 if info.distributed else "")
                             + " (leave --cuda-graph off)")
        self._created_group = init_distributed(info, device)
        self.governor = CPUThreadGovernor(enabled=adapt_cpu_threads and device.type == "cpu" and not info.distributed)
        self.signals = _SignalStop(enabled=handle_signals and not info.distributed)
        self.metrics: MetricsWriter | None = None
        self.bar = None
        self._exit = contextlib.ExitStack()
        try:
            self._setup(resume, checkpoint)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    @property
    def _unit(self) -> str:
        return "bits/base" if self.cfg.tokenizer == "nucleotides" else "bits/byte"  # --task dna: one byte per base

    def _say(self, msg: str, level: int = logging.INFO) -> None:
        if self.info.is_main:
            log.log(level, msg)

    def _setup(self, resume: bool, checkpoint: Checkpoint | None) -> None:
        cfg, info = self.cfg, self.info
        if resume and checkpoint is None:
            checkpoint = resolve_checkpoint(self.out_dir)
        if info.distributed and not info.is_main:
            torch.distributed.barrier()  # rank 0 builds the token cache first; the others then read it
        self.tokenizer, (n_train_docs, n_val_docs), train_stream, self.val_stream, self.val_chats = _load_data(
            cfg, checkpoint if resume else None)
        if info.distributed and info.is_main:
            torch.distributed.barrier()
        self.doc_eos = self.tokenizer.eos_id if cfg.reset_at_eos else None  # seq_idx restarts the state at each EOS
        self.vocab = self.tokenizer.vocab_size
        # one draw per optimizer step covers every micro-step of every process (see the module docstring)
        self.sampler = RandomWindows(train_stream, cfg.seqlen, cfg.batch_size * cfg.grad_accum, cfg.seed, info.rank,
                                     info.world_size)
        if resume and info.is_main:
            remove_strays(self.out_dir)
        checkpoint = checkpoint if resume else None
        self._build(checkpoint)
        # cuda_graph None: on wherever it can be (the check in __init__ refused an explicit True elsewhere)
        can_graph = self.device.type == "cuda" and not info.distributed
        # with "stop": set by the first non-finite step, it keeps every later one unapplied until the host reads it
        self._halt = torch.zeros((), dtype=torch.bool, device=self.device) if cfg.on_nonfinite == "stop" else None
        self.graph = self._graphed_step() if cfg.cuda_graph or (cfg.cuda_graph is None and can_graph) else None
        self.saved_step = self.global_step if resume else None  # the step of the newest checkpoint on disk
        self.step0 = self.global_step
        self.skipped = self.skipped_in_a_row = 0
        # (step, loss, grad norm, finite) of the steps not yet read on the host (see `_flush`)
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._norms: list[float] = []  # gradient norms since the last record
        # tokens/s of each record's window of steps: their median is the steady rate, which the first windows'
        # kernel compiles and the windows holding an evaluation do not move
        self._window_rates: list[float] = []
        self._record_step, self._record_time = self.global_step, time.perf_counter()
        self.t_loop = time.perf_counter()  # tokens/s at the end counts the steps' time, not the setup's
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seqlen * info.world_size
        if info.is_main:
            self.metrics = MetricsWriter(self.out_dir, resume_step=self.global_step if resume else None,
                                         logger=cfg.logger)
        # a DTensor counts its global size; LoRA's adapters are not counted (the banner gives them)
        n_params = sum(p.numel() for n, p in dict((id(p), (n, p)) for n, p in self.model.named_parameters()).values()
                       if ".lora_" not in n)
        how = ""
        if info.distributed:
            how = f" x {info.world_size} processes ({'FSDP2' if self.sharded else 'DDP'})"
        # the mixer built (--model.ssm-cfg may name another than --layer); a Transformer baseline has none
        mc = self.model_config
        mixer = mc.layer if hasattr(mc, "ssm_cfg") else mc.arch
        start = f", from {cfg.init_from}" if cfg.init_from else ""
        if self.adapter is not None:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            from .finetune import adapted_layers

            start += (f", LoRA rank {cfg.lora_rank} on {', '.join(adapted_layers(self.adapter))} "
                      f"({trainable / 1e6:.3f}M parameters trained)")
        self._say(f"mambakit train: recipe {cfg.recipe}: {mixer}, d_model {mc.d_model}, {mc.n_layer} layers, "
                  f"{n_params / 1e6:.2f}M parameters{start}, on {self.device}{how}"
                  + (f", {cfg.grad_accum} micro-steps per step" if cfg.grad_accum > 1 else ""))
        docs = ("conversation" if cfg.chat else "document") + ("" if n_train_docs == 1 else "s")
        scored = "" if train_stream.scored is None or cfg.chat_loss == "all" else \
            f" ({float(train_stream.scored.float().mean()):.0%} of them the assistant's, the only ones scored)"
        self._say(f"data: {cfg.data or 'built-in Shakespeare'}: {n_train_docs} {docs}, {len(train_stream):,} "
                  f"tokens for training{scored}; {n_val_docs} held out, {len(self.val_stream):,} tokens; tokenizer "
                  f"{self.tokenizer!r}")
        if checkpoint is not None:
            self._say(f"resuming from {checkpoint.path} at step {self.global_step}")
        elif cfg.init_from:  # where fine-tuning starts: the loaded model on the held-out text, as step 0
            result = self.evaluate(cfg.eval_tokens)
            self.history["evals"].append(result)
            if self.metrics is not None:
                self.metrics.write({"step": 0, "eval_loss": result["loss"], "eval_bits_per_byte": result["bpb"],
                                    "eval_tokens": result["tokens"]})
            self._say(f"step 0 ({cfg.init_from} as loaded): held-out {result['loss']:.4f} nats/token, "
                      f"{result['bpb']:.3f} {self._unit} ({result['tokens']:,} tokens)")
            self._record_time = self.t_loop = time.perf_counter()
        if info.is_main and cfg.progress:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
                            desc="train")
            # log lines go through the bar's write, so that they do not tear it
            self._exit.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("mambakit")]))

    def _build(self, checkpoint: Checkpoint | None) -> None:
        """A fresh model and optimizer at step 0 (initialised, or init_from's), or everything restored from a
        verified checkpoint (a LoRA run: init_from's base and the checkpoint's adapter)."""
        from ..models import MambaLM, build_model

        cfg, info = self.cfg, self.info
        sharded_ckpt = checkpoint is not None and checkpoint.state["optimizer"] is None
        self.adapter = None  # the peft model around self.raw_model in a LoRA run
        self.init_fingerprint = None
        if cfg.init_from and (checkpoint is None or cfg.lora_rank):
            model = self._init_model(checkpoint)
        elif cfg.init_from and sharded_ckpt:  # a fine-tune's shape is its checkpoint's, not the TrainConfig's
            from ..checkpoints import load_config

            model = build_model(load_config(checkpoint.path)).to(self.device)
        elif checkpoint is None or sharded_ckpt:
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
            model = build_model(model_config(cfg, self.vocab)).to(self.device)
        else:
            model = MambaLM.from_pretrained(checkpoint.path, device=self.device).train()
        for module in model.modules():  # activation recomputation is a training setting, not a weight
            if hasattr(module, "recompute"):
                module.recompute = cfg.recompute
        self.model_config = model.config
        no_decay = no_decay_names(model)
        self.raw_model = model
        self.model = wrap_model(model, cfg, info, self.device)  # FSDP2 shards `model` itself, DDP wraps it
        self.optimizer = build_optimizer(self.raw_model, cfg, no_decay)
        self.global_step, self.history = 0, {"losses": [], "evals": []}
        if checkpoint is None:
            return
        state = checkpoint.state
        global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        if state.get("global_batch", global_batch) != global_batch:
            raise ValueError(f"resume: the checkpoint's steps read {state['global_batch']} windows (batch_size x "
                             f"grad_accum x processes); this run reads {cfg.batch_size} x {cfg.grad_accum} x "
                             f"{info.world_size} = {global_batch}: change --batch-size or --grad-accum to match")
        if sharded_ckpt:
            load_sharded_state(checkpoint.path, self.raw_model, self.optimizer)
        elif self.sharded and info.distributed:
            raise ValueError(f"resume: {checkpoint.path} was written without --parallel fsdp; resume it with "
                             "--parallel ddp")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        keep_own_implementation(self.optimizer)  # a checkpoint of another machine's run steps as this machine's
        self.sampler.load_state_dict(state["sampler"])
        # after from_pretrained, whose fresh initialisation draws from the global generator
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.global_step, self.history = state["step"], state["history"]

    def _init_model(self, checkpoint: Checkpoint | None) -> torch.nn.Module:
        """init_from's model (with LoRA adapters, and a resumed run's adapter weights, when lora_rank > 0)."""
        from .finetune import add_lora, describe_model, load_adapter, load_init_model, weights_fingerprint

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the adapters' initialisation
        model = load_init_model(cfg, self.device)
        if self.vocab > model.config.padded_vocab_size:
            raise ValueError(f"init_from {cfg.init_from}: the tokenizer's vocabulary ({self.vocab}) is larger than "
                             f"the model's ({model.config.padded_vocab_size}); fine-tune with the model's own "
                             "tokenizer (tokenizer 'init')")
        if checkpoint is None:
            self.cfg = cfg = describe_model(cfg, model.config)
            if cfg.tokenizer != "init":
                self._check_tokenizer()
        if not cfg.lora_rank:
            return model
        self.init_fingerprint = weights_fingerprint(model)
        if checkpoint is not None:
            saved = (checkpoint.state.get("init") or {}).get("fingerprint")
            if saved != self.init_fingerprint:
                raise ValueError(f"resume: the base model in {cfg.init_from} is not the one this LoRA run started "
                                 "from (its weights changed); restore it, or start a new run")
        self.adapter = add_lora(model, cfg)
        if checkpoint is not None:
            load_adapter(self.adapter, checkpoint.path)
        return model

    def _graphed_step(self):
        """The optimizer step as a `CapturedStep` (cfg.cuda_graph): `_graph_body` eagerly for 3 steps, then replayed
        (None where cuda_graph is left to the run and the optimizer is not fused AdamW).

        What the eager step reads on the host becomes a tensor the graph reads: the learning rate (one CUDA tensor
        in every param group, refilled before each step) and the non-finite check (fused AdamW's `found_inf`: the
        kernel leaves parameters, moments and step counts untouched when it is set; the loop still reads the flag
        after the step, to count, skip or stop as the eager loop does)."""
        from .cuda_graph import CapturedStep

        if not self.device_checks:
            if self.cfg.cuda_graph is None:
                return None
            raise ValueError("cuda_graph: the step is captured with fused AdamW, which these parameters do not take")
        self._prepare_optimizer_for_graph()
        return CapturedStep(self._graph_body, self.device, warmup=3,
                            on_failure=lambda: self.optimizer.zero_grad(set_to_none=True))

    def _prepare_optimizer_for_graph(self) -> None:
        """Capturable AdamW whose every param group reads the rate from one tensor on the device (`self._lr`)."""
        from .cuda_graph import scheduled_rate

        # a checkpoint says what an eager run says (a rate as a number, not capturable): it resumes anywhere
        self._lr = scheduled_rate(self.optimizer, self.device)
        self._lr.fill_(lr_at(self.global_step, self.cfg))

    def _graph_body(self, windows: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What a captured step does: zero-grad (captured: the gradients land in the graph's own tensors), the
        micro-steps, clipping, and an AdamW step that `found_inf` turns off on the GPU. -> (loss, grad norm, finite)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, grad_norm, finite = self._gradients(windows, *(masks or (None, None)))
        self._step_unless_nonfinite(finite)
        return loss, grad_norm, finite

    @property
    def device_checks(self) -> bool:
        """Whether a non-finite step is left unapplied on the device (fused AdamW's `found_inf`), so that the host
        reads the flags in batches (`_flush`) rather than after every step."""
        return all(group.get("fused") for group in self.optimizer.param_groups)

    def _step_unless_nonfinite(self, finite: torch.Tensor) -> None:
        """The fused AdamW step, left unapplied on the device (parameters, moments, step counts) when `finite` is
        False or, with on_nonfinite "stop", when any earlier step since the last read was not finite (`_halt`)."""
        skip = ~finite
        if self._halt is not None:
            self._halt.logical_or_(skip)
            skip = self._halt
        self.optimizer.found_inf = skip.float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def _check_tokenizer(self) -> None:
        """Warn when a fine-tuning run tokenizes otherwise than the model it loads was trained to read."""
        from ..checkpoints import CheckpointError
        from ..data.token_cache import tokenizer_fingerprint
        from .finetune import init_tokenizer

        try:
            own = init_tokenizer(self.cfg)
        except CheckpointError:  # the model came without a tokenizer: nothing to compare with
            return
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(self.tokenizer):
            self._say(f"tokenizer {self.cfg.tokenizer!r} ({self.tokenizer!r}) is not the one saved with "
                      f"{self.cfg.init_from} ({own!r}): the model's embeddings were trained on that one's ids "
                      "(tokenizer 'init' uses it)", logging.WARNING)

    # ------------------------------------------------------------------ the parts of a run

    def stop_reason(self, stop_at_step: int | None = None) -> str | None:
        """Why the loop should stop before the next step ("max_steps", "stop_at_step", "time_budget", "SIGINT",
        "SIGTERM"), or None to go on."""
        cfg = self.cfg
        if self.global_step >= cfg.max_steps:
            return "max_steps"
        if stop_at_step is not None and self.global_step >= stop_at_step:
            return "stop_at_step"
        if self.signals.received:
            return self.signals.received
        if cfg.time_budget_s is not None and _out_of_time(self.t_start, cfg.time_budget_s, self.info,
                                                           self.global_step, cfg.log_every):
            return "time_budget"
        return None

    def _micro_step(self, window: torch.Tensor, scored: torch.Tensor | None, starts: torch.Tensor | None,
                    last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are synced across processes on the last one only."""
        if self.info.distributed and self.sharded:
            self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        elif self.info.distributed and not last:
            sync = self.model.no_sync()
        else:
            sync = contextlib.nullcontext()
        with sync:
            if scored is not None:  # a conversation stream: its masks (data.split_window)
                scored = scored.to(self.device, non_blocking=True)
                starts = starts.to(self.device, non_blocking=True)
            batch = split_window(window.to(self.device, non_blocking=True), self.doc_eos, scored, starts)
            return forward_backward(self.model, batch, self.vocab, self.autocast_dtype,
                                    chunked_loss=self.cfg.loss == "chunked", scored_only=scored is not None)

    def step(self) -> None:
        """One optimizer step (grad_accum micro-steps), then its record, evaluation and checkpoint when due.

        Raises TrainingDiverged on a non-finite loss or gradient norm (cfg.on_nonfinite == "stop")."""
        cfg, info = self.cfg, self.info
        self.governor.update()
        lr = lr_at(self.global_step, cfg)
        if self.graph is not None:
            self._lr.fill_(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        # (grad_accum * batch, seqlen + 1) windows; of conversations also their bool masks, else None
        windows, scored, starts = self.sampler.next_batch_masked()
        applied = None  # whether the step applied, when read on the host (else the device decides, found_inf)
        if self.graph is not None:
            # the whole step on the GPU, where AdamW skips a non-finite one (found_inf)
            loss, grad_norm, finite = self.graph(windows, *(() if scored is None else (scored, starts)))
        else:
            loss, grad_norm, finite = self._gradients(windows, scored, starts)
            if info.distributed:
                finite = all_reduce_mean(finite.float(), info) == 1.0
            if self.device_checks:
                self._step_unless_nonfinite(finite)
            else:
                applied = bool(finite)  # a host sync: this optimizer cannot skip a step on the device
                if applied:
                    self.optimizer.step()
            # (a graph's gradients are its own tensors, overwritten by each replay)
            self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((self.global_step + 1, loss, grad_norm, finite if applied is None else None))
        self.global_step += 1
        step = self.global_step
        if applied is not None:
            self._count_step(step, applied, loss, grad_norm)
        record = {}
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = self._train_record(lr)
        if self.bar is not None:
            self.bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            self._flush()  # a run that diverged stops before evaluating
            result = self.evaluate(cfg.eval_tokens)
            self.history["evals"].append(result)
            record.update(step=step, eval_loss=result["loss"], eval_bits_per_byte=result["bpb"],
                          eval_tokens=result["tokens"])
            self._say(f"step {step}: held-out {result['loss']:.4f} nats/token, {result['bpb']:.3f} bits/byte "
                      f"({result['tokens']:,} tokens)")
        if record and self.metrics is not None:
            self.metrics.write(record)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            self.save()

    def _gradients(self, windows: torch.Tensor, scored: torch.Tensor | None,
                   starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The micro-steps of one step's (grad_accum * batch, seqlen + 1) windows, their gradients averaged and
        clipped in p.grad. -> (mean loss, total gradient norm before clipping, whether both are finite), detached,
        on the device."""
        cfg = self.cfg
        micro = windows.split(cfg.batch_size)  # grad_accum x (batch, seqlen + 1)
        masks = [(None, None)] * len(micro) if scored is None else list(zip(scored.split(cfg.batch_size),
                                                                           starts.split(cfg.batch_size)))
        losses = [self._micro_step(w, *masks[i], last=i == len(micro) - 1) for i, w in enumerate(micro)]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        if len(micro) > 1:
            # each micro-step added the gradient of its own mean; the step's is the mean over the global batch
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(len(micro))
        # the total norm is computed even without clipping (an infinite max norm scales by exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.detach()
        return loss, grad_norm, torch.isfinite(loss) & torch.isfinite(grad_norm)

    def _peak_memory(self) -> str:
        """The device's peak allocated memory over the run (training and evaluation), for the closing line; "" off
        CUDA. A graphed step keeps its activations in the graph's pool between steps: they count here."""
        if self.device.type != "cuda":
            return ""
        return f"; peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 1e9:.2f} GB"

    def _graph_summary(self) -> str:
        """How many steps the CUDA graph ran (cfg.cuda_graph), for the closing line."""
        if self.graph is None:
            return ""
        if self.graph.disabled:
            return "; the step could not be captured as a CUDA graph: every step ran eagerly"
        return f"; {self.graph.replays} steps replayed from a CUDA graph"

    def _flush(self) -> None:
        """Read the steps not yet read on the host (one sync): their losses (averaged over processes) into the
        history, norms into the record, and the non-finite flags the device kept (`device_checks`) in step order
        (`_count_step`). The device left every such step unapplied (see the module docstring), so reading late
        changes nothing but when the run hears of it."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        n = len(pending)
        flagged = [i for i, (*_, finite) in enumerate(pending) if finite is not None]  # None: read at its step
        read = torch.cat([all_reduce_mean(torch.stack([loss.float() for _, loss, _, _ in pending]), self.info),
                          torch.stack([norm.float() for _, _, norm, _ in pending]),
                          *([torch.stack([pending[i][3].float() for i in flagged])] if flagged else [])]).tolist()
        self.history["losses"].extend(read[:n])
        self._norms.extend(read[n:2 * n])
        for i, finite in zip(flagged, read[2 * n:]):
            self._count_step(pending[i][0], bool(finite), read[i], read[n + i])

    def _count_step(self, step: int, finite: bool, loss, norm) -> None:
        """Count step `step` as applied or skipped (non-finite): TrainingDiverged at the first skipped one
        (on_nonfinite "stop") or at the 21st in a row ("skip"), else a warning. loss / norm: floats or tensors."""
        if finite:
            self.skipped_in_a_row = 0
            return
        self.skipped, self.skipped_in_a_row = self.skipped + 1, self.skipped_in_a_row + 1
        if self.cfg.on_nonfinite == "stop" or self.skipped_in_a_row > _MAX_SKIPPED_IN_A_ROW:
            self._flush()  # the history up to this step (under torchrun every process is here: the flag is global)
            raise _diverged(step, float(loss), float(norm), self.saved_step, self.out_dir, self.cfg,
                            self.skipped_in_a_row)
        self._say(f"step {step}: non-finite loss ({float(loss):.4g}) or gradient norm ({float(norm):.4g}): step "
                  "skipped", logging.WARNING)

    def _train_record(self, lr: float) -> dict:
        """The metrics record of the steps since the previous one (and the progress bar's numbers)."""
        self._flush()
        n = self.global_step - self._record_step
        now = time.perf_counter()
        record = {"step": self.global_step, "loss": _mean(self.history["losses"][-n:]) if n else None, "lr": lr,
                  "grad_norm": _mean(self._norms[-n:]) if n else None,
                  "tokens_per_s": n * self.tokens_per_step / max(now - self._record_time, 1e-9)}
        self._norms.clear()
        if n:
            self._window_rates.append(record["tokens_per_s"])
        self._record_step, self._record_time = self.global_step, now
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.history['losses'][-1]:.3f}", lr=f"{lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        return record

    def evaluate(self, max_tokens: int | None) -> dict:
        """Held-out loss and bits per byte on the first `max_tokens` targets (all when None; of a conversation set,
        the assistant's among them): {"step", "loss", "bpb", "tokens"}. Every process calls it."""
        if self.sharded and self.info.distributed:
            # every forward of a sharded model is collective: each process scores every window
            rank, world_size = 0, 1
        else:
            rank, world_size = self.info.rank, self.info.world_size
        result = evaluate_stream(self.raw_model, self.val_stream, self.cfg.seqlen, self.cfg.eval_batch_size,
                                 max_tokens, autocast_dtype=self.autocast_dtype, rank=rank, world_size=world_size,
                                 reset_at_eos=self.cfg.reset_at_eos)
        return {"step": self.global_step, "loss": result.loss, "bpb": result.bits_per_byte, "tokens": result.tokens}

    def save(self) -> bool:
        """Write a checkpoint of this step, unless the newest one on disk is of this step already. Every process
        calls it (with FSDP2 every process writes its shards; otherwise rank 0 writes)."""
        self._flush()
        if self.global_step == self.saved_step:
            return False
        cfg, info = self.cfg, self.info
        common = dict(tokenizer=self.tokenizer, optimizer=self.optimizer, sampler_state=self.sampler.state_dict(),
                      step=self.global_step, config=cfg, history=self.history, keep=cfg.keep_checkpoints,
                      world_size=info.world_size)
        if self.sharded:
            save_sharded_checkpoint(self.out_dir, model=self.raw_model, model_config=self.model_config, rank=info.rank,
                                    **common)
        elif info.is_main and self.adapter is not None:
            from .finetune import merged_model

            # the merged model (loads anywhere, no peft needed), the adapter in peft's layout, the base's fingerprint
            save_checkpoint(self.out_dir, model=merged_model(self.adapter), adapter=self.adapter,
                            init={"from": cfg.init_from, "fingerprint": self.init_fingerprint}, **common)
        elif info.is_main:
            save_checkpoint(self.out_dir, model=self.raw_model, **common)
        self.saved_step = self.global_step
        return True

    def finish(self, reason: str | None = None) -> TrainResult:
        """End the run: evaluate on the whole held-out budget, save, sample, write metrics.json and the plot.
        After a signal (`reason` "SIGINT" / "SIGTERM") only save: whoever sent it wants the process gone soon."""
        cfg, info, step = self.cfg, self.info, self.global_step
        reason = self.signals.received or reason
        self._close_bar()
        self._flush()
        train_s = time.perf_counter() - self.t_loop
        if reason in ("SIGINT", "SIGTERM"):
            self.save()
            self._say(f"{reason} at step {step}/{cfg.max_steps}: checkpoint saved in {self.out_dir}; continue with "
                      f"`mambakit train --resume --out {self.out_dir}`", logging.WARNING)
            return TrainResult(step=step, losses=list(self.history["losses"]), evals=list(self.history["evals"]),
                               elapsed_s=time.perf_counter() - self.t_start, out_dir=str(self.out_dir),
                               interrupted=reason, skipped_steps=self.skipped)
        stopped_by_budget = reason == "time_budget"
        if stopped_by_budget:
            self._say(f"time budget of {cfg.time_budget_s:g} s reached at step {step}/{cfg.max_steps}: stopping "
                      f"(continue with --resume)")
            if step == self.step0:  # nothing trained: say where the time went rather than report an idle run
                self._say(f"no step was trained in the {cfg.time_budget_s:g} s budget: it went to setting up (the "
                          "data, the model, a fine-tune's evaluation of the loaded model) and, on a fresh GPU "
                          "machine, to compiling the kernels (about 15 s for Mamba-1); give a larger --time-budget",
                          logging.WARNING)
        final = self.evaluate(cfg.final_eval_tokens)
        self.history["evals"].append(final)
        if self.metrics is not None:
            self.metrics.write({"step": step, "eval_loss": final["loss"], "eval_bits_per_byte": final["bpb"],
                                "eval_tokens": final["tokens"], "final": True})
        saved = self.save()
        result = TrainResult(step=step, losses=list(self.history["losses"]), evals=list(self.history["evals"]),
                             val_loss=final["loss"], val_bpb=final["bpb"], stopped_by_budget=stopped_by_budget,
                             out_dir=str(self.out_dir), skipped_steps=self.skipped)
        steps_done = step - self.step0
        self._say(f"trained {steps_done} steps ({step}/{cfg.max_steps}) in {train_s:.1f} s, "
                  f"{steps_done * self.tokens_per_step / max(train_s, 1e-9):,.0f} tokens/s"
                  + steady_rate(self._window_rates, cfg.log_every)
                  + self._graph_summary()
                  + (f"; {self.skipped} non-finite steps skipped" if self.skipped else "")
                  + self._peak_memory())
        self._say(f"held-out: {final['loss']:.4f} nats/token, {final['bpb']:.3f} {self._unit} "
                  f"({final['tokens']:,} tokens)")
        self._say(f"saved to {self.out_dir}" if saved else f"checkpoint of step {step} already in {self.out_dir}")
        if info.is_main and cfg.sample_tokens > 0:
            # a sharded model's forward needs every process: sample from the saved (whole) model instead
            model = self.raw_model
            if self.sharded and info.distributed:
                from ..models import MambaLM

                model = MambaLM.from_pretrained(self.out_dir, device=self.device)
            if self.val_chats:  # replies to held-out conversations, beside the held-out answers
                result.sample = _chat_samples(model, self.tokenizer, cfg, self.val_chats)
                self._say(f"held-out conversations, greedy replies:\n{result.sample}")
            else:
                result.sample = _sample(model, self.tokenizer, cfg)
                self._say(f"sample (temperature {cfg.sample_temperature:g}):\n{cfg.sample_prompt}{result.sample}")
        result.elapsed_s = time.perf_counter() - self.t_start
        if info.is_main:
            metrics = {"step": step, "max_steps": cfg.max_steps, "val_loss": final["loss"], "val_bpb": final["bpb"],
                       "val_tokens": final["tokens"], "train_s": train_s, "wall_s": result.elapsed_s,
                       "stopped_by_budget": stopped_by_budget, "skipped_steps": self.skipped,
                       "final_train_loss": self.history["losses"][-1] if self.history["losses"] else None}
            write_metrics(self.out_dir / "metrics.json", metrics)
            if cfg.plot:
                self._plot()
        return result

    def _plot(self) -> None:
        try:
            path = plot_metrics(self.out_dir)
        except ImportError:
            self._say("no plot: matplotlib is not installed (pip install 'mambakit[train]')", logging.WARNING)
            return
        self._say(f"plot: {path}")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._exit.close()

    def close(self, finished: bool = False) -> None:
        """Give back the signal handlers, the CPU thread count and the process group this run took (finished: every
        rank finished its run, so they leave the group together)."""
        self._close_bar()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.signals.restore()
        self.governor.restore()
        if self._created_group:
            # what holds the process group (a DDP wrapper's Reducer, FSDP2's sharded parameters and their optimizer
            # state) goes first: freed after destroy_process_group (when the Run is), gloo's teardown joined
            # threads that never ended (a hung test process) or destroyed joinable ones ("terminate called without
            # an active exception", an aborted rank), session 27
            self.model = self.raw_model = self.optimizer = self.adapter = None
            gc.collect()
        destroy_distributed(self._created_group, finished=finished)
        self._created_group = False


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def steady_rate(window_rates: list[float], log_every: int) -> str:
    """The final report's steady throughput: the median tokens/s of the windows of `log_every` steps between
    metrics records, as " (steady: X tokens/s, the median of N windows of K steps)"; "" with fewer than 3 windows.
    The overall rate beside it counts everything since the loop started: on a fresh GPU the kernels' first
    compiles, and every evaluation.

    Example:
        >>> steady_rate([1000.0, 5000.0, 5200.0, 900.0, 5100.0], 10)
        ' (steady: 5,000 tokens/s, the median of 5 windows of 10 steps)'
    """
    if len(window_rates) < 3:
        return ""
    return (f" (steady: {statistics.median(window_rates):,.0f} tokens/s, the median of {len(window_rates)} windows "
            f"of {log_every} steps)")


def train(cfg: TrainConfig, *, resume: bool = False, stop_at_step: int | None = None,
          checkpoint: Checkpoint | None = None, handle_signals: bool = False,
          adapt_cpu_threads: bool = False) -> TrainResult:
    """Train (or resume) the run described by `cfg`; write checkpoints into `cfg.out_dir` (default runs/<recipe>).

    Args:
        cfg: the run. On resume, the caller passes the TrainConfig stored in the checkpoint
            (`load_train_state(dir)["config"]`), changing at most time_budget_s, device, progress, logging
            and output settings, or batch_size / grad_accum / parallel with the same global batch.
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
    gradients are averaged by DistributedDataParallel (cfg.parallel "ddp") or reduce-scattered by FSDP2
    ("fsdp"), and only rank 0 logs and writes (with FSDP2 every process writes its checkpoint shards).

    Example:
        >>> from mambakit.training import default_recipe, train
        >>> result = train(default_recipe().replace(max_steps=200, out_dir="runs/short"))
        >>> result.val_bpb
    """
    run = Run(cfg, resume=resume, checkpoint=checkpoint, handle_signals=handle_signals,
              adapt_cpu_threads=adapt_cpu_threads)
    finished = False
    try:
        while (reason := run.stop_reason(stop_at_step)) is None:
            run.step()
        result = run.finish(reason)
        finished = True
        return result
    finally:
        run.close(finished=finished)


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
            log.warning(f"{name}: stopping after this step and saving a checkpoint (again to exit at once)")
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


def chat_reply(model: torch.nn.Module, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The model's greedy reply to `messages`, rendered with the tokenizer's chat template as a chat request is,
    ended by a stop id or one of the tokenizer's stop strings (cut there)."""
    from ..data.chat import apply_chat_template
    from ..generation import StopTextFilter, generate

    ids = tokenizer.encode(apply_chat_template(tokenizer, messages, add_generation_prompt=True))
    stop_ids = list(getattr(tokenizer, "stop_ids", ()) or ([] if tokenizer.eos_id is None else [tokenizer.eos_id]))
    stops = list(getattr(tokenizer, "stop_strings", ()) or ())
    new = generate(model, [ids], max_new_tokens, temperature=0.0, eos_token_id=stop_ids or None,
                   stop_strings=stops or None, decode=tokenizer.decode if stops else None)[0]
    if new and new[-1] in stop_ids:
        new = new[:-1]
    shown = StopTextFilter(stops)  # the text before the first stop string
    return shown.push(tokenizer.decode(new)) + shown.flush()


def _chat_samples(model: torch.nn.Module, tokenizer, cfg: TrainConfig, conversations: list[list[dict]],
                  n: int = 3) -> str:
    """Lines "user text -> reply (held out: answer)" for the first assistant turn of the first `n` conversations."""
    lines = []
    for conv in conversations[:n]:
        i = next(k for k, m in enumerate(conv) if m["role"] == "assistant")
        reply = chat_reply(model, tokenizer, conv[:i], max(cfg.sample_tokens, 1))
        lines.append(f"{conv[i - 1]['content']!r} -> {reply!r} (held out: {conv[i]['content']!r})")
    return "\n".join(lines)


def _sample(model: torch.nn.Module, tokenizer, cfg: TrainConfig) -> str:
    from ..generation import generate

    prompt = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(cfg.sample_prompt)
    new = generate(model, [prompt], cfg.sample_tokens, temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                   eos_token_id=tokenizer.eos_id, seed=cfg.seed)[0]
    if new and new[-1] == tokenizer.eos_id:  # the document ended: drop the separator itself
        new = new[:-1]
    return tokenizer.decode(new)
