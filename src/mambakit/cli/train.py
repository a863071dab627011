"""`mambakit train`: train a Mamba language model from a recipe, with flags overriding single settings."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import Parser, UsageError, check_writable_dir, seed_type

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
  torchrun --nproc-per-node 2 -m mambakit.cli train --recipe shakespeare --device cuda
      data-parallel on 2 GPUs; --batch-size is per process

data: .txt/.md, .jsonl ("text" field), .parquet ("text" column, needs pyarrow), FASTA (.fa/.fasta/.fna),
each optionally .gz, or a directory of them. Without --data, the built-in Shakespeare corpus.

checkpoints: DIR/checkpoints/step-N/ (complete units, the newest --keep-checkpoints kept), the newest
model also at the top of DIR for `mambakit generate --model DIR`. Ctrl-C or SIGTERM saves one and
exits (130 / 143); a second Ctrl-C exits at once. A NaN or infinite loss stops the run (exit 1)
without saving over the last good checkpoint, unless --skip-nonfinite."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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


def build_parser(prog: str = "mambakit train") -> Parser:
    from ..training.recipes import RECIPES

    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("--recipe", help=f"named settings to start from: {', '.join(RECIPES)} (default: shakespeare)")
    p.add_argument("--data", metavar="PATH", help="training data: a file or a directory (default: built-in Shakespeare)")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json (default: raw bytes, vocab 256)")
    p.add_argument("--task", choices=("text", "dna"), help="text (default) or dna: FASTA genomes (--data, default "
                   "Debian's ragout-examples), one token per base (A C G T N), reverse-complement augmentation")
    p.add_argument("--out", metavar="DIR", help="checkpoint directory (default: ./runs/<recipe>)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps; the LR schedule spans them")
    p.add_argument("--time-budget", type=_duration, metavar="T",
                   help="stop gracefully (evaluate, save) after T: seconds, or 90s / 10m / 1.5h")
    p.add_argument("--d-model", type=_positive_int, metavar="N", help="model width")
    p.add_argument("--n-layer", type=_positive_int, metavar="N", help="number of Mamba blocks")
    p.add_argument("--layer", choices=("mamba1", "mamba2"), help="mixer: mamba1 (S6 scan) or mamba2 (SSD)")
    p.add_argument("--arch", dest="layer", choices=("mamba1", "mamba2", "transformer++", "gpt3"),
                   help="the model: --layer's mixers, or a Transformer baseline: transformer++ (rotary, SwiGLU, "
                        "RMSNorm, no biases) or gpt3, with heads of the recipe's headdim")
    p.add_argument("--seqlen", type=_positive_int, metavar="N", help="tokens per training window")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="windows per step (per process)")
    p.add_argument("--lr", type=_positive_float, metavar="LR", help="peak learning rate")
    p.add_argument("--seed", type=seed_type, metavar="S", help="seed for initialisation and data order")
    p.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (default ./runs/<recipe>)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in --out even if it holds one (deletes it)")
    p.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip a step whose loss or gradient norm is NaN or infinite instead of stopping the run")
    p.add_argument("--keep-checkpoints", type=_positive_int, metavar="N",
                   help="complete checkpoints kept in DIR/checkpoints (default 2)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--recompute", action="store_true", default=None,
                   help="recompute each mixer's conv, scan and norm in the backward: activation memory per layer "
                        "shrinks to its projections' inputs and outputs (2.6x / 4.2x less for Mamba-1 / Mamba-2)")
    return p


def main(recipe: str | None = None, data: str | None = None, tokenizer: str | None = None, out: str | None = None,
         max_steps: int | None = None, time_budget: float | None = None, d_model: int | None = None,
         n_layer: int | None = None, layer: str | None = None, seqlen: int | None = None, batch_size: int | None = None,
         lr: float | None = None, seed: int | None = None, device: str | None = None, resume: bool = False,
         progress: bool = True, recompute: bool | None = None, overwrite: bool = False,
         skip_nonfinite: bool | None = None, keep_checkpoints: int | None = None, task: str | None = None) -> int:
    """Train (or resume) a run; returns the exit status.

    Examples:
        mambakit train
        mambakit train --max-steps 200 --out runs/quick
        mambakit train --data my_texts/ --layer mamba1 --d-model 256 --n-layer 4 --time-budget 30m
        mambakit train --resume --out runs/quick
        mambakit train --task dna --data genomes/ --seqlen 1024
    """
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

    # Flags that change what is trained; with --resume the run's own settings (in its checkpoint) apply.
    if task == "dna" and not resume:  # the task picks the data source and the tokenizer, nothing else
        if tokenizer is not None:
            raise UsageError("--task dna tokenizes one base per token: leave out --tokenizer")
        tokenizer = "nucleotides"
        data = data if data is not None else _default_genomes()
    run_flags = {"recipe": recipe, "data": data, "tokenizer": tokenizer, "max_steps": max_steps, "d_model": d_model,
                 "n_layer": n_layer, "layer": layer, "seqlen": seqlen, "batch_size": batch_size, "lr": lr, "seed": seed}
    given = {k: v for k, v in run_flags.items() if v is not None}
    checkpoint = None
    if resume and overwrite:
        raise UsageError("give either --resume (continue the run in --out) or --overwrite (replace it), not both")
    if resume:
        out_dir = Path(out) if out else Path("runs") / (recipe or "shakespeare")
        given.pop("recipe", None)  # with --resume, --recipe only names the default directory
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"{flags} cannot be combined with --resume: the run's settings come from its checkpoint "
                             f"in {out_dir}")
        try:
            checkpoint = resolve_checkpoint(out_dir)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
        cfg = TrainConfig.from_dict(checkpoint.state["config"]).replace(out_dir=str(out_dir))
        check_writable_dir(out_dir, "--out")
    else:
        try:
            cfg = get_recipe(recipe or "shakespeare")
        except KeyError as err:
            raise UsageError(err.args[0]) from None
        changes = {k: v for k, v in given.items() if k != "recipe"}
        if data is not None and cfg.data != data:
            # the run is named after its data, and its sample starts a document of that data, not the recipe's
            changes.update(recipe=_run_name(data), sample_prompt="")
        if skip_nonfinite:
            changes["on_nonfinite"] = "skip"
        if keep_checkpoints is not None:
            changes["keep_checkpoints"] = keep_checkpoints
        try:
            cfg = cfg.replace(**changes)
        except ValueError as err:
            raise UsageError(str(err)) from None
        cfg.out_dir = str(Path(out) if out else default_out_dir(cfg))
        if data is not None and not Path(data).exists():
            raise UsageError(f"data path not found: {data}")
        if tokenizer not in (None, "nucleotides") and not Path(tokenizer).exists():
            raise UsageError(f"tokenizer file not found: {tokenizer}")
        if holds_run(cfg.out_dir) and not overwrite:
            raise UsageError(f"{cfg.out_dir} holds a run already: continue it with --resume, replace it with "
                             "--overwrite, or choose another --out")
        check_writable_dir(cfg.out_dir, "--out")
    if resume and (skip_nonfinite or keep_checkpoints is not None):
        cfg = cfg.replace(**({"on_nonfinite": "skip"} if skip_nonfinite else {}),
                          **({"keep_checkpoints": keep_checkpoints} if keep_checkpoints is not None else {}))
    cfg = cfg.replace(progress=progress)
    if time_budget is not None:
        cfg = cfg.replace(time_budget_s=time_budget)
    if device is not None:
        cfg = cfg.replace(device=device)
    if recompute is not None:
        cfg = cfg.replace(recompute=recompute)
    try:
        resolve_device(cfg.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if overwrite:
        _remove_run(Path(cfg.out_dir))
    try:
        result = train(cfg, resume=resume, checkpoint=checkpoint, handle_signals=True, adapt_cpu_threads=True)
    except DataError as err:
        raise UsageError(str(err)) from None
    except TrainingDiverged as err:
        print(f"mambakit train: error: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        return {"SIGINT": 130, "SIGTERM": 143}[result.interrupted]
    return 0


def _default_genomes() -> str:
    """Debian's bacterial genomes (ragout-examples), the data of `--task dna` without --data."""
    from ..data.dna import DEBIAN_GENOMES

    if not DEBIAN_GENOMES.is_dir():
        raise UsageError(f"--task dna needs FASTA files: give --data PATH (.fa/.fasta/.fna, optionally .gz/.xz), or "
                         f"install Debian's genomes with `apt-get install ragout-examples` ({DEBIAN_GENOMES})")
    return str(DEBIAN_GENOMES)


def _run_name(data: str) -> str:
    """runs/<name> for a run on `data`: the file or directory name without extensions ("my_texts/" -> my_texts)."""
    name = Path(data.rstrip("/\\")).name.split(".")[0]
    return name or "custom"


def _remove_run(out_dir: Path) -> None:
    """Delete what `mambakit train` wrote in out_dir (checkpoints, the published model, metrics); nothing else."""
    import shutil

    from ..training.checkpoint import CHECKPOINTS, TRAIN_STATE, remove_strays

    remove_strays(out_dir)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json", "train_config.json",
                 TRAIN_STATE, "metrics.json"):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
