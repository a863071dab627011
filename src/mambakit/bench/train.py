"""`mambakit bench train`: one training step (forward, backward, AdamW) of Mamba-1, Mamba-2 and a same-size
Transformer against seqlen, at a fixed number of tokens per step: tokens/s and peak CUDA memory.

On CUDA the step runs under bf16 autocast with float32 parameters (how `mambakit train` trains); on CPU in
float32. The batch is tokens_per_step / seqlen rows (at least one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .models import MODELS, build_model, model_shape, n_params
from .timing import is_out_of_memory, median_ms, peak_memory_bytes


@dataclass
class TrainSettings:
    seqlens: list[int]
    tokens_per_step: int
    repeats: int


def train_settings(device: torch.device, quick: bool) -> TrainSettings:
    if quick:
        return TrainSettings(seqlens=[32, 64], tokens_per_step=128, repeats=2)
    if device.type == "cuda":
        return TrainSettings(seqlens=[512, 2048, 8192, 32768], tokens_per_step=32768, repeats=5)
    return TrainSettings(seqlens=[256, 1024], tokens_per_step=2048, repeats=2)


def run_train(device: torch.device, quick: bool, log: Callable[[str], None] = print) -> dict:
    s = train_settings(device, quick)
    shape = model_shape(quick)
    rows, notes, params = [], [], {}
    autocast = device.type == "cuda"
    for name in MODELS:
        model = build_model(name, shape, device, torch.float32).train()
        params[name] = n_params(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for L in s.seqlens:
            batch = max(1, s.tokens_per_step // L)
            ids = torch.randint(0, shape.vocab_size, (batch, L + 1), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(ids[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                ms = median_ms(step, device, repeats=s.repeats)
                peak = peak_memory_bytes(step, device)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                notes.append(f"{name} stopped at seqlen {L}: out of memory")
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                break
            row = {"model": name, "seqlen": L, "batch": batch, "step_ms": ms, "tokens_per_s": batch * L / (ms * 1e-3),
                   "peak_mb": None if peak is None else peak / 2 ** 20}
            rows.append(row)
            log(f"{name:12s} seqlen {L:6d} x {batch:3d}: {ms:9.1f} ms/step  {row['tokens_per_s']:10.0f} tok/s")
        model = opt = None  # frees them (a del would confuse pyflakes over the closure above)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": asdict(s), "shape": asdict(shape), "params": params, "rows": rows, "notes": notes,
            "precision": "bf16 autocast, float32 parameters" if autocast else "float32"}


def plot_train(result: dict, out_dir, device_name: str) -> list[str]:
    from .report import line_panels

    rows = result["rows"]
    panels = [("training throughput (tokens/s)", rows, "tokens_per_s")]
    if any(r["peak_mb"] is not None for r in rows):
        panels.append(("peak memory (MB)", rows, "peak_mb"))
    line_panels(out_dir / "train_throughput.png", panels, x="seqlen", series="model", ylabel="", logy=True,
                title=f"mambakit bench train ({device_name}; {result['settings']['tokens_per_step']} tokens a step)",
                ncols=len(panels))
    return ["train_throughput.png"]
