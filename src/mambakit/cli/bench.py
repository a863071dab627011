"""`mambakit bench`: time the ops, training, generation, long prompts or CPU weight formats; write JSON + PNG plots."""

from __future__ import annotations

import argparse
import functools
import shlex

from .errors import Parser, UsageError

SUMMARY = "benchmark kernels, training, generation, long-prompt prefill or quantized CPU decoding; JSON + PNG plots"

EXAMPLES = """\
examples:
  mambakit bench kernels --quick --device cpu --out /tmp/bench
      the whole pipeline at tiny sizes, seconds on a CPU (numbers meaningless)
  mambakit bench kernels --device cuda
      scan / SSD / SDPA attention against seqlen 512 ... 256K, forward and forward+backward, floors, memory
  mambakit bench generate --device cuda
      decoding throughput against batch size: Mamba-1, Mamba-2, a same-size Transformer (and peers)
  mambakit bench train --device cuda
  mambakit bench prefill --device cuda
      prefill tokens/s and peak memory of one long prompt (4K, 32K, 256K tokens): Mamba-1, Mamba-2, a Transformer
  mambakit bench generate --device cpu --no-peers
      only mambakit's models (transformers' pure-PyTorch Mamba-2 decoding can take many minutes on a CPU)
  mambakit bench quantize --model runs/shakespeare
      CPU decoding ms/token in float32, bfloat16 and int8 (130M shape), and the checkpoint's bits per byte and
      greedy agreement in each

writes DIR/<benchmark>.json (rows, command, device, versions, date) and DIR/<benchmark>_*.png (default DIR:
results/bench). Peers (mamba_ssm, fla, mambapy, transformers) are timed when importable and named in the JSON's
notes when not. docs/benchmarks.md reads the plots."""


def build_parser(prog: str = "mambakit bench") -> Parser:
    from ..bench import BENCHMARKS

    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("what", choices=BENCHMARKS, metavar="BENCHMARK", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default: cuda when available), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a seconds-long run of the whole pipeline")
    p.add_argument("--out", default="results/bench", metavar="DIR", help="output directory (default results/bench)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="kernels, generate: also time mamba_ssm, mambapy, fla, transformers where importable "
                        "(default: on)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="quantize: a trained checkpoint for bits per byte and agreement (default: a random tiny model)")
    return p


def main(what: str, device: str = "auto", quick: bool = False, out: str = "results/bench",
         model: str | None = None, peers: bool = True) -> int:
    """Run benchmark `what` and write its JSON and plots to `out`; returns 0.

    Examples:
        mambakit bench kernels --quick --device cpu --out /tmp/bench
        mambakit bench generate --device cuda
    """
    from ..bench import run_bench
    from ..training import resolve_device

    try:
        dev = resolve_device("cpu" if what == "quantize" and device == "auto" else device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if what == "quantize" and dev.type != "cpu":
        raise UsageError("quantize measures CPU decoding: use --device cpu")
    if model is not None and what != "quantize":
        raise UsageError("--model is for `mambakit bench quantize`")
    command = shlex.join(["mambakit", "bench", what, f"--device={dev.type}"] + (["--quick"] if quick else [])
                         + ([f"--model={model}"] if model else []) + ([] if peers else ["--no-peers"]))
    log = functools.partial(print, flush=True)  # progress shows as it comes, also when piped to a file
    for path in run_bench(what, dev, quick=quick, out=out, model=model, command=command, log=log, peers=peers):
        print(f"wrote {path}")
    return 0
