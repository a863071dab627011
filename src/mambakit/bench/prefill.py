"""`mambakit bench prefill`: long prompts. Prefill tokens/s and peak memory against context length, Mamba-1 and
Mamba-2 beside a same-size Transformer (SDPA attention with a KV cache).

A row is one (model, context): one prompt of `context` random tokens at batch 1 through
`generation.prefill(model, ids, tokens_per_call=...)`, which feeds the prompt `tokens_per_call` tokens per model
call and keeps only the last position's logits. A Mamba model's memory is then that of one call whatever the
context (its state is fixed-size); the Transformer's KV cache grows with the context and each call's attention
reads all of it, so its time grows quadratically. Peak CUDA memory is that of the whole prefill above the
weights (None on CPU). A model that runs out of memory stops there, with a note.

Settings: CUDA contexts 4K, 32K, 256K in bfloat16 (issue 18: 32K and 256K), 16K tokens per call; CPU contexts 1K,
4K, 16K in float32; `--quick`: a tiny model at 64 and 256 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..generation import prefill
from .models import MODELS, build_model, model_shape, n_params
from .timing import is_out_of_memory, peak_memory_bytes, wall_seconds


@dataclass
class PrefillSettings:
    contexts: list[int]
    tokens_per_call: int
    dtype: str
    repeats: int


def prefill_settings(device: torch.device, quick: bool) -> PrefillSettings:
    if quick:
        return PrefillSettings(contexts=[64, 256], tokens_per_call=128, dtype="float32", repeats=1)
    if device.type == "cuda":
        return PrefillSettings(contexts=[4096, 32768, 262144], tokens_per_call=16384, dtype="bfloat16", repeats=2)
    return PrefillSettings(contexts=[1024, 4096, 16384], tokens_per_call=2048, dtype="float32", repeats=1)


def run_prefill(device: torch.device, quick: bool, log: Callable[[str], None] = print) -> dict:
    s = prefill_settings(device, quick)
    shape = model_shape(quick)
    notes, rows, params = [], [], {}
    for name in MODELS:
        model = build_model(name, shape, device, getattr(torch, s.dtype))
        params[name] = n_params(model)

        def run(ids):
            return prefill(model, ids, tokens_per_call=s.tokens_per_call)

        for context in s.contexts:
            ids = torch.randint(0, shape.vocab_size, (1, context), device=device)
            try:
                run(ids[:, : min(context, 2 * s.tokens_per_call)])  # warm-up: kernel compiles and autotuning
                seconds = min(wall_seconds(lambda: run(ids), device) for _ in range(s.repeats))
                peak = peak_memory_bytes(lambda: run(ids), device)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                notes.append(f"{name} stopped at context {context}: out of memory ({str(err)[:160]})")
                torch.cuda.empty_cache()
                break
            row = {"model": name, "context": context, "seconds": seconds, "tokens_per_s": context / seconds,
                   "peak_mb": None if peak is None else peak / 2 ** 20}
            rows.append(row)
            memory = "" if peak is None else f", peak {row['peak_mb']:,.0f} MB"
            log(f"{name:12s} context {context:8,d}: {seconds:8.3f} s  {row['tokens_per_s']:12,.0f} tok/s{memory}")
        model = None  # frees it (a del would confuse pyflakes over the closure above)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": asdict(s), "shape": asdict(shape), "params": params, "rows": rows, "notes": notes}


def plot_prefill(result: dict, out_dir, device_name: str) -> list[str]:
    from .report import line_panels

    rows = result["rows"]
    panels = [("prefill throughput (tokens/s)", rows, "tokens_per_s"), ("prefill time (s)", rows, "seconds")]
    if any(r["peak_mb"] is not None for r in rows):
        panels.append(("peak memory above the weights (MB)", rows, "peak_mb"))
    s = result["settings"]
    line_panels(out_dir / "prefill_context.png", panels, x="context", series="model", ylabel="", logy=True,
                title=f"mambakit bench prefill ({device_name}; batch 1, {s['tokens_per_call']} tokens per call, "
                      f"{s['dtype']})", ncols=len(panels))
    return ["prefill_context.png"]
