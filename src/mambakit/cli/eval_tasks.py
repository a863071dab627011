"""`mambakit eval --model DIR --tasks NAMES`: zero-shot (or few-shot) tasks through lm-evaluation-harness.

The `eval` command (cli/eval.py) adds these flags with `add_task_arguments(parser)` and hands the parsed
arguments to `run_tasks(args)` when --tasks is given. The model is mambakit's lm-eval model "mambakit"
(mambakit.evaluation.lm_eval); tasks are lm-eval's names (lambada_openai, hellaswag, piqa, arc_easy, ...; their
datasets come from the Hugging Face Hub through lm-eval) or tasks of your own: a folder of task YAML files named
with --include-path. Needs the `lm_eval` extra: pip install 'mambakit[lm_eval]'.

examples:
  mambakit eval --model runs/shakespeare --tasks my_task --include-path my_tasks/ --device cpu
  mambakit eval --model state-spaces/mamba-130m-hf --tasks lambada_openai,hellaswag,piqa --device cuda
  mambakit eval --model out/tpp --tasks arc_easy --num-fewshot 5 --limit 200 --output results/arc.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UsageError, check_writable_file

__all__ = ["add_task_arguments", "run_tasks"]


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Add `flag` unless the eval command defines it already (--device, --batch-size are shared with --data mode)."""
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kwargs)


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of documents or a fraction, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The lm-eval flags of `mambakit eval`: --tasks, --include-path, --num-fewshot, --limit, --max-length, --output,
    and --device, --batch-size, --dtype unless the parser has them."""
    _add(parser, "--tasks", metavar="NAMES",
         help="lm-eval task names, comma-separated (lambada_openai,hellaswag,...), run on --model through lm-eval")
    _add(parser, "--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    _add(parser, "--num-fewshot", type=int, metavar="N", help="in-context examples per prompt (default: the task's)")
    _add(parser, "--limit", type=_limit, metavar="N",
         help="at most N documents per task (a fraction below 1: that share); for quick checks, not for reporting")
    _add(parser, "--max-length", type=int, default=2048, metavar="N", help="context tokens per prediction (default 2048)")
    _add(parser, "--output", metavar="FILE", help="also write lm-eval's results (without samples) as JSON to FILE")
    _add(parser, "--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    _add(parser, "--batch-size", type=int, default=16, metavar="N", help="rows per model call (default 16)")
    _add(parser, "--dtype", metavar="DTYPE", help="float32, bfloat16, ... (default: the checkpoint's)")


def run_tasks(args: argparse.Namespace | None = None, **flags) -> int:
    """Evaluate args.model on args.tasks with lm-evaluation-harness; print lm-eval's table; returns 0.

    `args` is the parsed namespace; an eval `main(**flags)` may pass its keyword arguments instead (model, tasks,
    include_path, num_fewshot, limit, max_length, output, device, batch_size, dtype).

    Examples:
        mambakit eval --model runs/shakespeare --tasks my_task --include-path my_tasks/
        mambakit eval --model state-spaces/mamba-130m-hf --tasks lambada_openai,piqa --device cuda
    """
    if args is None:
        args = argparse.Namespace(**flags)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        import mambakit.evaluation.lm_eval  # noqa: F401  registers the "mambakit" model
    except ImportError as err:
        raise UsageError(f"--tasks needs lm-evaluation-harness ({err}): pip install 'mambakit[lm_eval]'") from None

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks needs at least one task name (comma-separated)")
    include = getattr(args, "include_path", None)
    if include is not None and not Path(include).is_dir():
        raise UsageError(f"--include-path {include}: not a directory")
    output = getattr(args, "output", None)
    if output is not None:
        check_writable_file(output, "--output")
    # indexing lm-eval's own ~15000 task configs takes half a minute on a small CPU: tasks that are all in
    # --include-path are looked up there alone
    manager = TaskManager(include_path=include, include_defaults=False) if include is not None else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {unknown}" + (f" (not in lm-eval nor in {include})" if include else
                                                                  " (your own tasks: --include-path DIR)"))
    model_args = {"pretrained": args.model, "device": getattr(args, "device", None) or "auto",
                  "batch_size": getattr(args, "batch_size", None) or 16,
                  "max_length": getattr(args, "max_length", None) or 2048}
    if getattr(args, "dtype", None):
        model_args["dtype"] = args.dtype
    model_args_text = ",".join(f"{k}={v}" for k, v in model_args.items())
    results = lm_eval.simple_evaluate(model="mambakit", model_args=model_args_text, tasks=tasks,
                                      num_fewshot=getattr(args, "num_fewshot", None), limit=getattr(args, "limit", None),
                                      task_manager=manager, log_samples=False)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output is not None:
        Path(output).write_text(json.dumps({k: results[k] for k in ("results", "configs", "versions", "n-shot",
                                                                    "config") if k in results},
                                           indent=1, default=str) + "\n")
    return 0
