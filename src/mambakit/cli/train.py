"""`mambakit train`: train a Mamba language model from a recipe, with a config file and flags overriding settings.

Every `TrainConfig` field is a flag, derived from the dataclass: the flags below with their own checks
(kept from before), and for every other field `--field-name VALUE` (VALUE read as a YAML scalar:
`--eval-every 100`, `--time-budget-s null`, `--plot false`), and for the MambaConfig fields a run may
set, `--model.field-name VALUE` (`--model.d-intermediate 256`, `--model.ssm-cfg "{d_conv: 3}"`).
Precedence: the recipe (or, with --resume, the run's own settings) < `--config FILE` (YAML, read and
type-checked by OmegaConf against the dataclass) < flags. `--print-config` writes the resolved config
as YAML and exits; every checkpoint holds the same YAML (config.yaml), so `--config` of it repeats a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Any

from .errors import Parser, UsageError, check_writable_dir, non_negative_int, positive_int, seed_type

SUMMARY = "train a Mamba language model (default: byte-level, on the built-in Shakespeare corpus)"

EXAMPLES = """\
examples:
  mambakit train
      the default recipe: a byte-level Mamba-2 LM on 36 Shakespeare plays, about 5 minutes on a
      2-core CPU (it stops itself after 9 minutes: --time-budget), checkpoint in ./runs/shakespeare
  mambakit train --max-steps 200 --out runs/quick
  mambakit train --data my_texts/ --layer mamba1 --d-model 256 --n-layer 4 --time-budget 30m
      the recipe's settings on your data, checkpoint in ./runs/my_texts
  mambakit train --data corpus.jsonl --tokenizer 20B_tokenizer.json --seqlen 512 --batch-size 8
  mambakit train --arch transformer++ --lr 6e-3 --out runs/tpp
      the Transformer++ baseline (rotary, SwiGLU, RMSNorm, no biases) on the same recipe
  mambakit train --resume --out runs/quick
      continue a run that stopped (time budget, Ctrl-C, SIGTERM, a kill) from its newest complete checkpoint
  mambakit train --out runs/quick --overwrite
      start again in a directory that holds a run (without --overwrite or --resume that is refused)
  mambakit train --recipe tiny --grad-accum 4 --log-every 1 --logger tensorboard --print-config > run.yaml
  mambakit train --config run.yaml --lr 1e-3 --out runs/lr1e-3
      a config file (every field optional), flags override it; `--print-config` writes the resolved one
  mambakit train --init-from state-spaces/mamba-130m-hf --data my_texts/ --lora-rank 8
      fine-tune a trained model on your text: LoRA adapters (or, without --lora-rank, every weight); the run
      directory holds the merged model and the adapter in peft's layout; step 0 scores the model as loaded
  mambakit train --task chat --init-from runs/shakespeare --data chats.jsonl --out runs/chat
      fine-tune on conversations ({"messages": [...]} per line): only the assistant's tokens are scored; the
      chat template and its stop strings are saved with the model (mambakit generate --model runs/chat --chat)
  torchrun --nproc-per-node 2 -m mambakit.cli train --recipe shakespeare --device cuda
      data-parallel on 2 GPUs; --batch-size is per process (and micro-step: x --grad-accum)
  torchrun --nproc-per-node 8 -m mambakit.cli train --config run.yaml --parallel fsdp
      FSDP2: parameters, gradients and optimizer state sharded per block; checkpoints through
      torch.distributed.checkpoint, which resume on any number of processes with the same global batch

data: .txt/.md, .jsonl ("text" field), .parquet ("text" column, needs pyarrow), FASTA (.fa/.fasta/.fna),
each optionally .gz, .xz or .bz2, or a directory of them. Without --data, the built-in Shakespeare corpus.

checkpoints: DIR/checkpoints/step-N/ (complete units, the newest --keep-checkpoints kept), the newest
model (and its config.yaml) also at the top of DIR for `mambakit generate --model DIR`. DIR/metrics.jsonl
gets a record every --log-every steps (loss, lr, grad_norm, tokens_per_s; eval_bits_per_byte on
evaluations), DIR/metrics.png the curves at the end (`mambakit plot DIR` redraws them). Ctrl-C or SIGTERM saves one and
exits (130 / 143); a second Ctrl-C exits at once. A NaN or infinite loss stops the run (exit 1)
without saving over the last good checkpoint, unless --skip-nonfinite. The check runs on the device:
that step and every later one are left unapplied, and the run stops at the next --log-every record,
naming the step."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _duration(text: str) -> float:
    """Seconds from "600", "90s", "10m" or "1.5h"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s, 10m or 1.5h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _scalar(text: str) -> Any:
    """A derived flag's value as YAML reads it ("3" -> 3, "null" -> None, "{d_conv: 3}" -> a dict); OmegaConf then
    checks it against the field's type."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _text(text: str) -> str | None:
    """A text field's value as given ("yes" stays "yes", "007" stays "007"); "null" means None."""
    return None if text == "null" else text


# the fields whose flags keep their own names and checks (the command's flags before the derived ones)
_OWN_FLAGS = {"recipe", "data", "tokenizer", "out_dir", "max_steps", "time_budget_s", "d_model", "n_layer", "layer",
              "seqlen", "batch_size", "lr", "seed", "device", "on_nonfinite", "keep_checkpoints", "progress",
              "recompute", "grad_accum", "parallel", "log_every", "save_every", "logger", "init_from", "lora_rank",
              "chat_template", "cuda_graph"}
# the model's shape: a fine-tuning run (--init-from) takes it from the loaded model
_SHAPE_FIELDS = ("d_model", "n_layer", "layer", "d_state", "expand", "headdim", "chunk_size")
# what may change when a run is resumed: nothing that changes a step's numbers (batch_size, grad_accum and the
# parallel layout only with the same global batch, which the run checks)
_RESUMABLE = {"out_dir", "time_budget_s", "device", "progress", "recompute", "cuda_graph", "loss", "on_nonfinite",
              "keep_checkpoints",
              "log_every", "save_every", "logger", "plot", "eval_every", "eval_tokens", "eval_batch_size",
              "final_eval_tokens", "batch_size", "grad_accum", "parallel", "fsdp_mixed_precision",
              "fsdp_reshard_after_forward", "sample_prompt",
              "sample_tokens", "sample_temperature", "sample_top_k", "autocast",
              # where the base of a fine-tune now lies: a LoRA run checks its weights' fingerprint on resume
              "init_from"}


def _layer_name(text: str) -> str:
    """A mixer name in any spelling -> the config's one ("mamba1" -> "Mamba1"); other names pass to `choices`."""
    from ..models.mixers import canonical_mixer_name  # imported here: the parser itself loads no torch

    try:
        return canonical_mixer_name(text)
    except ValueError:
        return text


def build_parser(prog: str = "mambakit train") -> Parser:
    from ..training.config import MODEL_OVERRIDES, TrainConfig
    from ..training.recipes import RECIPES

    # only the flags given end up in the namespace: what was not given comes from the config file or recipe
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES, argument_default=argparse.SUPPRESS)
    p.add_argument("--recipe", help=f"named settings to start from: {', '.join(RECIPES)} (default: shakespeare)")
    p.add_argument("--config", metavar="FILE", action="append",
                   help="YAML settings (any TrainConfig fields, `model:` for MambaConfig fields) over the recipe; "
                        "flags override them; may be given more than once")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    p.add_argument("--data", metavar="PATH", help="training data: a file or a directory (default: built-in Shakespeare)")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json (default: raw bytes, vocab 256; with "
                   "--init-from, the model's own)")
    p.add_argument("--init-from", metavar="MODEL", help="fine-tune: start from this model (a `mambakit train` run, a "
                   "mamba_ssm or Hugging Face folder, or a Hub id); its shape and tokenizer are the run's, and the "
                   "recipe defaults to `finetune` (lr 3e-4) or, with --lora-rank, `lora` (lr 1e-3)")
    p.add_argument("--lora-rank", type=non_negative_int, metavar="N", help="with --init-from: train peft LoRA adapters "
                   "of rank N on in_proj, x_proj, dt_proj (--lora-targets) instead of every weight (needs peft: the "
                   "`train` extra)")
    p.add_argument("--task", choices=("text", "dna", "chat"), help="text (default); dna: FASTA genomes (--data, "
                   "default Debian's ragout-examples), one token per base (A C G T N), reverse-complement "
                   "augmentation; chat: --data is conversations (.jsonl of {\"messages\": [...]} or {\"prompt\", "
                   "\"completion\"}), rendered with the model's chat template, only the assistant's tokens scored")
    p.add_argument("--chat-template", metavar="FILE", help="with --task chat: a Jinja chat template to render the "
                   "conversations with (saved with the model), or 'default'; without it the tokenizer's own, else "
                   "mambakit's default (role headers, turns ending in <|end|>, which generation then stops at)")
    p.add_argument("--out", "--out-dir", dest="out_dir", metavar="DIR", help="run directory (default: ./runs/<recipe>)")
    p.add_argument("--max-steps", type=positive_int, metavar="N", help="optimizer steps; the LR schedule spans them")
    p.add_argument("--time-budget", dest="time_budget_s", type=_duration, metavar="T",
                   help="stop gracefully (evaluate, save) after T: seconds, or 90s / 10m / 1.5h")
    p.add_argument("--d-model", type=positive_int, metavar="N", help="model width")
    p.add_argument("--n-layer", type=positive_int, metavar="N", help="number of Mamba blocks")
    p.add_argument("--layer", type=_layer_name, choices=("Mamba1", "Mamba2"),
                   help="mixer: Mamba1 (S6 scan) or Mamba2 (SSD); any case (mamba1, mamba-2) is accepted")
    p.add_argument("--arch", dest="layer", type=_layer_name, choices=("Mamba1", "Mamba2", "transformer++", "gpt3"),
                   help="the model: --layer's mixers, or a Transformer baseline: transformer++ (rotary, SwiGLU, "
                        "RMSNorm, no biases) or gpt3, with heads of the recipe's headdim")
    p.add_argument("--seqlen", type=positive_int, metavar="N", help="tokens per training window")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="windows per micro-step (per process)")
    p.add_argument("--grad-accum", type=positive_int, metavar="N",
                   help="micro-steps per optimizer step: the numbers of an N times larger batch (default 1)")
    p.add_argument("--lr", type=_positive_float, metavar="LR", help="peak learning rate")
    p.add_argument("--seed", type=seed_type, metavar="S", help="seed for initialisation and data order")
    p.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default) or fsdp (FSDP2, sharded checkpoints)")
    p.add_argument("--log-every", type=positive_int, metavar="N", help="steps between metrics.jsonl records")
    p.add_argument("--save-every", type=non_negative_int, metavar="N",
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--logger", choices=("none", "tensorboard"),
                   help="tensorboard: also write TensorBoard scalars into DIR/tensorboard (the `train` extra)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (default ./runs/<recipe>)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in --out even if it holds one (deletes it)")
    p.add_argument("--skip-nonfinite", dest="on_nonfinite", action="store_const", const="skip",
                   help="skip a step whose loss or gradient norm is NaN or infinite instead of stopping the run")
    p.add_argument("--keep-checkpoints", type=positive_int, metavar="N",
                   help="complete checkpoints kept in DIR/checkpoints (default 2)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.add_argument("--recompute", action="store_const", const=True,
                   help="recompute each mixer's conv, scan and norm in the backward: activation memory per layer "
                        "shrinks to its projections' inputs and outputs (2.6x / 4.2x less for Mamba-1 / Mamba-2)")
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", action="store_const", const=True,
                       help="replay each optimizer step from one CUDA graph after 3 eager steps (the default on one "
                            "CUDA device; this flag makes anything else an error): one launch per step")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_const", const=False,
                       help="launch every step's kernels from Python (the eager step; e.g. to profile it)")
    derived = p.add_argument_group("every other TrainConfig field (VALUE is read as YAML, checked against the type)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _OWN_FLAGS or f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _text if f.type in ("str", "str | None") else _scalar
        derived.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, metavar="VALUE",
                             help=f"{f.type} (TrainConfig default: {default!r})")
    model = p.add_argument_group("MambaConfig fields (TrainConfig.model)")
    for name in MODEL_OVERRIDES:
        model.add_argument(f"--model.{name.replace('_', '-')}", dest=f"model.{name}", type=_scalar, metavar="VALUE")
    return p


def _resolve(base, files: list[str], flags: dict[str, Any]):
    """base < each config file < flags, merged and type-checked by OmegaConf against TrainConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..training import TrainConfig

    layers = [OmegaConf.structured(base)]
    for name in files:
        try:
            layers.append(OmegaConf.load(name))
        except (OSError, OmegaConfBaseException, ValueError) as err:
            raise UsageError(f"--config {name}: cannot read it ({' '.join(str(err).split())})") from None
    nested: dict[str, Any] = {}
    for key, value in flags.items():
        if key.startswith("model."):
            nested.setdefault("model", {})[key.split(".", 1)[1]] = value
        else:
            nested[key] = value
    layers.append(OmegaConf.create(nested))
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
    except OmegaConfBaseException as err:
        raise UsageError(" ".join(str(err).split())) from None
    try:
        return TrainConfig(**merged)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _file_recipe(files: list[str]) -> str | None:
    """The recipe a config file names (its `recipe:`), when it is one of the named recipes."""
    from ..training.recipes import RECIPES

    name = None
    for path in files:
        value = _file_field([path], "recipe")
        if isinstance(value, str) and value in RECIPES:
            name = value
    return name


def main(*, resume: bool = False, overwrite: bool = False, config: list[str] | None = None,
         print_config: bool = False, **settings: Any) -> int:
    """Train (or resume) a run; returns the exit status. `settings`: the TrainConfig fields given as flags
    (out_dir, max_steps, ...; "model.<name>" for MambaConfig fields).

    Examples:
        mambakit train
        mambakit train --max-steps 200 --out runs/quick
        mambakit train --data my_texts/ --layer mamba1 --d-model 256 --n-layer 4 --time-budget 30m
        mambakit train --resume --out runs/quick
        mambakit train --task dna --data genomes/ --seqlen 1024
        mambakit train --task chat --init-from runs/shakespeare --data chats.jsonl --out runs/chat
        mambakit train --config run.yaml --grad-accum 4
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mambakit")
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _main(resume, overwrite, list(config or []), print_config, settings)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _main(resume: bool, overwrite: bool, files: list[str], print_config: bool, settings: dict[str, Any]) -> int:
    from ..data import DataError
    from ..training import (
        TrainConfig,
        TrainingDiverged,
        default_out_dir,
        get_recipe,
        holds_run,
        resolve_checkpoint,
        resolve_device,
        train,
    )

    task = settings.pop("task", "text")
    if task != "chat" and "chat_template" in settings:
        raise UsageError("--chat-template renders conversations: give --task chat too")
    if task == "chat" and not resume:
        if "data" not in settings:
            raise UsageError("--task chat needs --data: a .jsonl / .json file (or a folder of them) of conversations, "
                             "one {\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": "
                             "\"assistant\", ...}]} per line")
        settings["chat"] = True
    if task == "dna" and not resume:  # the task picks the data source and the tokenizer, nothing else
        if "tokenizer" in settings:
            raise UsageError("--task dna tokenizes one base per token: leave out --tokenizer")
        settings["tokenizer"] = "nucleotides"
        if "data" not in settings:
            settings["data"] = _default_genomes()
    recipe = settings.get("recipe")
    checkpoint = None
    if resume and overwrite:
        raise UsageError("give either --resume (continue the run in --out) or --overwrite (replace it), not both")
    for name in files:
        if not Path(name).is_file():
            raise UsageError(f"--config {name}: file not found")
    if resume:
        out = settings.get("out_dir")
        out_dir = Path(out) if out else Path("runs") / (recipe or "shakespeare")
        # with --resume, --recipe only names the default directory
        fixed = [k for k in settings if k != "recipe" and k.split(".")[0] not in _RESUMABLE]
        if fixed:
            flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
            raise UsageError(f"{flags} cannot be combined with --resume: the run's settings come from its checkpoint "
                             f"in {out_dir}")
        try:
            checkpoint = resolve_checkpoint(out_dir)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
        base = TrainConfig.from_dict(checkpoint.state["config"])
        cfg = _resolve(base, files, {k: v for k, v in settings.items() if k != "recipe"})
        cfg = cfg.replace(out_dir=str(out_dir))
        # the run's settings come from its checkpoint: a flag that would change what is trained is refused
        changed = [f.name for f in dataclasses.fields(TrainConfig)
                   if getattr(cfg, f.name) != getattr(base, f.name) and f.name not in _RESUMABLE]
        if changed:
            raise UsageError(f"the config file's {', '.join(changed)} cannot be combined with --resume: the run's "
                             f"settings come from its checkpoint in {out_dir}")
        check_writable_dir(out_dir, "--out")
    else:
        fine_tune = "init_from" in settings or _file_field(files, "init_from") is not None
        if fine_tune:
            _check_fine_tune_flags(settings)
        default = ("lora" if settings.get("lora_rank") or _file_field(files, "lora_rank") else "finetune") \
            if fine_tune else "shakespeare"
        try:
            base = get_recipe(recipe or _file_recipe(files) or default)
        except KeyError as err:
            raise UsageError(err.args[0]) from None
        if fine_tune and "tokenizer" not in settings and _file_field(files, "tokenizer") is None:
            base = base.replace(tokenizer="init")  # the model's own tokenizer
        cfg = _resolve(base, files, settings)
        if (missing := cfg.missing_init_from()) is not None:
            raise UsageError(missing.replace("init_from", "--init-from").replace("lora_rank", "--lora-rank"))
        if cfg.lora_rank:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise UsageError("--lora-rank trains peft's LoRA adapters: pip install 'mambakit[train]' (or peft)")
        if cfg.init_from and not Path(cfg.init_from).is_dir():
            from ..checkpoints.hub import looks_like_hub_id

            if not looks_like_hub_id(cfg.init_from):
                raise UsageError(f"--init-from {cfg.init_from}: no such model directory (nor a Hub id)")
        if cfg.data is not None and cfg.data != base.data:
            # the run is named after its data, and its sample starts a document of that data, not the recipe's
            cfg = cfg.replace(recipe=_run_name(cfg.data) if cfg.recipe == base.recipe else cfg.recipe,
                              sample_prompt="" if cfg.sample_prompt == base.sample_prompt else cfg.sample_prompt)
        cfg.out_dir = str(Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg))
        if cfg.init_from and Path(cfg.init_from).is_dir():  # the shape of the model it loads (config only)
            from ..checkpoints import CheckpointError, load_config
            from ..training.finetune import describe_model

            try:
                cfg = describe_model(cfg, load_config(cfg.init_from))
            except (CheckpointError, OSError, ValueError) as err:
                raise UsageError(f"--init-from {cfg.init_from}: {err}") from None
        if print_config:
            print(cfg.to_yaml(), end="")
            return 0
        if cfg.data is not None and not Path(cfg.data).exists():
            raise UsageError(f"data path not found: {cfg.data}")
        if cfg.tokenizer not in ("bytes", "nucleotides", "init") and not Path(cfg.tokenizer).exists():
            raise UsageError(f"tokenizer file not found: {cfg.tokenizer}")
        if holds_run(cfg.out_dir) and not overwrite:
            raise UsageError(f"{cfg.out_dir} holds a run already: continue it with --resume, replace it with "
                             "--overwrite, or choose another --out")
        check_writable_dir(cfg.out_dir, "--out")
    if print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph captures the step on a CUDA device; this run is on {device} "
                         "(--device cuda, or leave --cuda-graph off)")
    if overwrite:
        _remove_run(Path(cfg.out_dir))
    try:
        result = train(cfg, resume=resume, checkpoint=checkpoint, handle_signals=True, adapt_cpu_threads=True)
    except DataError as err:
        raise UsageError(str(err)) from None
    except TrainingDiverged as err:
        print(f"mambakit train: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # a resume onto a different global batch or layout
        if not resume:
            raise
        raise UsageError(str(err)) from None
    if result.interrupted:
        return {"SIGINT": 130, "SIGTERM": 143}[result.interrupted]
    return 0


def _file_field(files: list[str], name: str) -> Any:
    """The value the last of the config files that sets `name` gives it (None when none does)."""
    import yaml

    value = None
    for path in files:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # _resolve reports it
        if isinstance(data, dict) and data.get(name) is not None:
            value = data[name]
    return value


def _check_fine_tune_flags(settings: dict[str, Any]) -> None:
    """A fine-tuning run's model is the one it loads: flags that would size a new one are refused. (A config file's
    model fields are not: a run's own config.yaml holds them all, and the run rewrites them from the loaded model.)"""
    shape = [k for k in settings if k in _SHAPE_FIELDS or k.startswith("model.")]
    if shape:
        names = ", ".join("--" + k.replace("_", "-") for k in shape)
        raise UsageError(f"{names}: a fine-tuning run (--init-from) trains the model it loads, with that model's "
                         "shape; leave these out")


def _default_genomes() -> str:
    """Debian's bacterial genomes (ragout-examples), the data of `--task dna` without --data."""
    from ..data.dna import DEBIAN_GENOMES

    if not DEBIAN_GENOMES.is_dir():
        raise UsageError(f"--task dna needs FASTA files: give --data PATH (.fa/.fasta/.fna, optionally .gz/.xz), or "
                         f"install Debian's genomes with `apt-get install ragout-examples` ({DEBIAN_GENOMES})")
    return str(DEBIAN_GENOMES)


def _run_name(data: str) -> str:
    """runs/<name> for a run on `data`: the file name without extensions ("plays.txt.gz" -> plays), or the directory
    name as it is ("my_texts/" -> my_texts, "E.Coli" -> E.Coli)."""
    path = Path(data.rstrip("/\\"))
    name = path.name if path.is_dir() else path.name.split(".")[0]
    return name or "custom"


def _remove_run(out_dir: Path) -> None:
    """Delete what `mambakit train` wrote in out_dir (checkpoints, the published model, metrics); nothing else."""
    import shutil

    from ..training.checkpoint import CHECKPOINTS, PUBLISHED, TRAIN_STATE, remove_strays

    remove_strays(out_dir)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    for name in PUBLISHED + (TRAIN_STATE, "metrics.json", "metrics.jsonl", "metrics.png"):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
