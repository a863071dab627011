"""`mambakit plot RUN_DIR`: draw a run's training loss and held-out bits per byte (from metrics.jsonl) into a PNG."""

from __future__ import annotations

from pathlib import Path

from .errors import Parser, UsageError

SUMMARY = "plot a training run's loss and held-out bits per byte (RUN_DIR/metrics.jsonl -> metrics.png)"

EXAMPLES = """\
examples:
  mambakit plot runs/shakespeare
      writes runs/shakespeare/metrics.png (what `mambakit train` draws at the end of a run)
  mambakit plot runs/shakespeare --output loss.png

needs matplotlib: pip install 'mambakit[train]'"""


def build_parser(prog: str = "mambakit plot") -> Parser:
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `mambakit train` (holds metrics.jsonl)")
    p.add_argument("--output", metavar="PNG", help="where to write the plot (default: RUN_DIR/metrics.png)")
    return p


def main(run_dir: str, output: str | None = None) -> int:
    """Draw RUN_DIR/metrics.jsonl; prints the PNG's path. Returns the exit status.

    Examples:
        mambakit plot runs/shakespeare
        mambakit plot runs/shakespeare --output loss.png
    """
    from ..training.metrics import METRICS_JSONL, plot_metrics

    if not (Path(run_dir) / METRICS_JSONL).is_file():
        raise UsageError(f"{run_dir}: no {METRICS_JSONL} (is it a `mambakit train` run directory?)")
    try:
        path = plot_metrics(run_dir, output)
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'mambakit[train]'") from None
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    print(path)
    return 0
