"""`mambakit convert`: rewrite a checkpoint directory in another format (mambakit, mamba_ssm, Hugging Face)."""

from __future__ import annotations

import argparse
import re
import sys

from .errors import Parser, UsageError

SUMMARY = "convert a checkpoint between the mambakit, mamba_ssm and Hugging Face formats"

EXAMPLES = """\
examples:
  mambakit convert mamba-130m-hf mamba-130m --to mambakit
      a transformers checkpoint (MambaForCausalLM / Mamba2ForCausalLM) into mambakit's format
  mambakit convert state-spaces/mamba-130m-hf mamba-130m --to mambakit --revision main
      a Hugging Face Hub id: fetched into huggingface_hub's cache first (pip install 'mambakit[hub]')
  mambakit convert runs/shakespeare runs/shakespeare-hf --to hf
      a trained model for transformers' AutoModelForCausalLM (its tokenizer.json goes along)
  mambakit convert state-spaces-mamba2-130m mamba2-130m-hf --to hf --max-shard-size 2GB
  mambakit convert mamba-130m mamba-130m-ref --to mamba_ssm --dtype bfloat16
      config.json + pytorch_model.bin, as mamba_ssm's MambaLMHeadModel.from_pretrained reads them

formats:
  mambakit    config.json (mamba_ssm's fields) + model.safetensors
  mamba_ssm   config.json + pytorch_model.bin (state-spaces/mamba-*, state-spaces/mamba2-*)
  hf          transformers config.json + model.safetensors (or shards + index), generation_config.json
SRC may be in any of them, a local directory or a Hub id (HF_HUB_OFFLINE=1: the cache only). The weights are
copied exactly unless --dtype casts them; the tokenizer files are copied as they are."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """Bytes from "5GB", "500MB", "2GiB" or a plain number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser(prog: str = "mambakit convert") -> Parser:
    from ..checkpoints import FORMATS

    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("src", metavar="SRC", help="checkpoint directory or Hugging Face Hub id to read (any format)")
    p.add_argument("dst", metavar="DST", help="directory to write (created if missing)")
    p.add_argument("--to", required=True, choices=FORMATS, help="format to write")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="cast the weights; auto keeps the stored dtype")
    p.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                   help="split the safetensors weights into shards of at most SIZE (mambakit, hf); default one file")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub id SRC (default main)")
    return p


def main(src: str, dst: str, to: str, dtype: str = "auto", max_shard_size: int | None = None,
         revision: str | None = None) -> int:
    """Convert checkpoint `src` into format `to` in `dst`; returns the exit status.

    Examples:
        mambakit convert mamba-130m-hf mamba-130m --to mambakit
        mambakit convert runs/shakespeare runs/shakespeare-hf --to hf
    """
    import torch

    from ..checkpoints import CheckpointError, convert_checkpoint

    try:
        out = convert_checkpoint(src, dst, to=to, dtype=None if dtype == "auto" else getattr(torch, dtype),
                                 max_shard_size=max_shard_size, revision=revision)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    except OSError as err:  # e.g. DST under a file or on a read-only filesystem (a full disk is a CheckpointError)
        raise UsageError(f"cannot write {dst}: {err.strerror or err}") from None
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"wrote {out} in the {to} format: {', '.join(files)}", file=sys.stderr)
    return 0
