"""Per-step records of a run: out_dir/metrics.jsonl, optionally TensorBoard scalars, and the loss / bits-per-byte plot.

metrics.jsonl holds one JSON object per line, written and flushed as the run goes (a `tail -f` follows it,
and a run killed at any moment leaves every record before the kill):

    {"step": 10, "loss": 4.71, "lr": 0.003, "grad_norm": 0.93, "tokens_per_s": 8410.2}
    {"step": 250, ..., "eval_loss": 1.62, "eval_bits_per_byte": 2.34, "eval_tokens": 32768}

`loss` and `grad_norm` are the means over the steps since the previous record (one step with
--log-every 1); `lr` is the last of those steps' learning rate; `tokens_per_s` counts the global batch
(every process) over the wall time since the previous record. An evaluation adds `eval_*` keys to the
record of its step (the final evaluation gets a record of its own if its step was already written).
Non-finite numbers are written as null (strict JSON). A resumed run first drops the records past its
checkpoint's step, so the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["METRICS_JSONL", "PLOT_PNG", "MetricsWriter", "read_metrics", "plot_metrics"]

METRICS_JSONL = "metrics.jsonl"
PLOT_PNG = "metrics.png"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records to `out_dir`/metrics.jsonl (and TensorBoard scalars with logger="tensorboard"); rank 0 only.

    Example:
        >>> writer = MetricsWriter("runs/x", resume_step=None)
        >>> writer.write({"step": 1, "loss": 5.5, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_s": 900.0})
        >>> writer.close()
    """

    def __init__(self, out_dir: str | Path, *, resume_step: int | None, logger: str = "none"):
        self.path = Path(out_dir) / METRICS_JSONL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            # records past the checkpoint were made by steps that the resumed run does again
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run's lifetime)
        self._tensorboard = None
        if logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self._tensorboard = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        record = {k: _finite_or_none(v) for k, v in record.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, global_step=record["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir`/metrics.jsonl (a last line cut short by a kill is skipped)."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the training loss and the held-out bits per byte of `run_dir`/metrics.jsonl against the step into a
    PNG (default `run_dir`/metrics.png); returns its path. Needs matplotlib (`pip install 'mambakit[train]'`).

    Example:
        >>> plot_metrics("runs/shakespeare")
        PosixPath('runs/shakespeare/metrics.png')
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no records in {run_dir / METRICS_JSONL}: nothing to plot")
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_bits_per_byte"]) for r in records if r.get("eval_bits_per_byte") is not None]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), lw=1.2)
    ax_loss.set(xlabel="step", ylabel="training loss (nats / token)", title="training loss")
    if evals:
        ax_bpb.plot(*zip(*evals), marker="o", lw=1.2)
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="held-out bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / PLOT_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
