"""`mambakit reproduce NAME`: rerun one of the papers' synthetic experiments and write results/NAME/."""

from __future__ import annotations

import shlex
import sys

from .errors import Parser, UsageError, positive_int
from .train import _duration

SUMMARY = "rerun a paper's experiment (synthetic tasks, language models, DNA, audio; see --help) into results/NAME/"

EXAMPLES = """\
examples:
  mambakit reproduce induction-heads --quick --out /tmp/ih
      the whole pipeline with tiny settings, seconds on a CPU (numbers meaningless)
  mambakit reproduce spoken-digits --device cuda --time-budget 7m --resume
      DNA and audio (dna-context, dna-species, spoken-digits, audio-context): genomes from Debian's
      ragout-examples, clips from `mambakit data spoken-digits`; --quick needs neither
  mambakit reproduce selective-copying --device cuda
      full size (Mamba paper Table 1 at L = 4096): writes results/selective-copying/
  mambakit reproduce mqar --device cuda --time-budget 7m --resume
      at most 7 minutes, then save the state and exit with status 3; rerun the same command until it exits 0
  mambakit reproduce induction-heads --device cuda --workers 4
      four models at a time, one process each, on the same GPU (the host-bound small models leave it idle)

writes results/NAME/results.json, README.md, PNG plots and the small trained checkpoints; _state/ (resume
state) is not a result and is git-ignored."""


def build_parser(prog: str = "mambakit reproduce") -> Parser:
    from ..reproduce import EXPERIMENTS

    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--quick", action="store_true", help="tiny settings: a seconds-long CPU run of the whole pipeline")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: results/NAME; with --quick, mambakit-reproduce-quick-NAME in the "
                        "temporary directory, so quick numbers never land on the committed ones)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in DIR/_state (else start over)")
    p.add_argument("--time-budget", type=_duration, metavar="T",
                   help="stop cleanly after T (600, 90s, 10m, 1.5h), saving the state; exit status 3")
    p.add_argument("--steps", type=positive_int, metavar="N", help="override every model's training steps")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="train up to N models at once, one process each (selective-copying, induction-heads, mqar, "
                        "ablations; pays where the host sets the pace, as in induction heads and MQAR; default 1)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run every training step eagerly (default on CUDA: the constant-rate steps replay one "
                        "captured CUDA graph, the same computation without the host's per-kernel launches)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(name: str, quick: bool = False, device: str = "auto", out: str | None = None, resume: bool = False,
         time_budget: float | None = None, steps: int | None = None, progress: bool = True, workers: int = 1,
         cuda_graph: bool = True) -> int:
    """Run experiment `name`; returns 0 when the results are written, 3 when the time budget stopped it first.

    Examples:
        mambakit reproduce induction-heads --quick --out /tmp/ih
        mambakit reproduce induction-heads --device cuda --workers 6 --time-budget 7m --resume
    """
    from ..reproduce import FINISHED, default_out, reproduce
    from ..reproduce.worker import WorkerError

    command = shlex.join(["mambakit", "reproduce", name] + (["--quick"] if quick else [])
                         + ([f"--steps={steps}"] if steps else []) + ([f"--device={device}"] if device != "auto" else [])
                         + ([f"--workers={workers}"] if workers > 1 else []))
    try:
        status = reproduce(name, out, quick=quick, device=device, resume=resume, time_budget_s=time_budget,
                           steps=steps, progress=progress, command=command, workers=workers,
                           cuda_graph=cuda_graph)
    except ValueError as err:  # an unusable device, a state from another kind of run, workers for a serial one
        raise UsageError(str(err)) from None
    except WorkerError as err:  # the workers' own logs are above; this says what to do
        print(f"mambakit reproduce: error: {err}", file=sys.stderr)
        return 1
    if status == FINISHED:
        print(f"mambakit reproduce {name}: results in {default_out(name, quick) if out is None else out}")
    return status
