"""The files a `mambakit bench` run writes: results.json (rows + command, device, versions, date, run time) and
PNG plots (matplotlib, the `bench` extra; drawn off-screen)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """Device name and library versions (the same stamp `mambakit reproduce` writes), the thread count and, where
    the OS tells it, the 1-minute load average when the results are written (this run included): on a shared CPU
    it says how busy the machine was."""
    from ..reproduce.common import environment as stamp

    env = stamp(device)
    env["threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


def write_results(out_dir: Path, name: str, result: dict, *, command: str, device: torch.device,
                  seconds: float) -> Path:
    """out_dir/<name>.json: the result with the command, environment, UTC date and run time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"command": command, **environment(device),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "run_seconds": round(seconds, 1), **result}
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def line_panels(path: Path, panels: Sequence[tuple[str, list[dict], str]], *, x: str, series: str, ylabel: str,
                logy: bool, title: str, ncols: int = 2, logx: bool = True) -> None:
    """One PNG of line plots: each panel (title, rows, y key) draws y against x, one line per value of `series`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (panel_title, rows, key) in zip(axes.flat, panels):
        for label in dict.fromkeys(r[series] for r in rows):
            pts = sorted((r[x], r[key]) for r in rows if r[series] == label and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
