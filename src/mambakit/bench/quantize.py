"""`mambakit bench quantize`: CPU decoding in float32, bfloat16 and int8 weight-only (modules/quantized.py).

Variants: float32; bfloat16 (every weight and activation, `model.to(torch.bfloat16)`); int8 (the linear layers'
weights in int8, the rest float32); bfloat16+int8 (both). For each:
    ms_per_token     greedy decoding at batch 1 after a 16-token prompt, the model's shape (`--quick`: tiny;
                     else the 130M checkpoints' shape, random weights: speed does not depend on their values),
                     decode time = time(n + 1 tokens) - time(1 token), variants interleaved round by round so a
                     busy machine slows all alike; each format eager and with the compiled step
                     (`generate(..., compile=True)`, compile time excluded: it happens in the warm-up)
    bits_per_byte    on the held-out text (built-in Shakespeare's held-out plays) of the checkpoint `--model`
                     (a trained one: a random model's figures say nothing), and its change against float32
    argmax_agreement share of held-out positions whose most likely next token is float32's
    greedy_match     share of greedily generated tokens equal to float32's, position by position (4 prompts
                     from the held-out text, 64 new tokens each): one early difference changes all that follow
    greedy_prefix    mean length of the part of each greedy continuation identical to float32's, as a share
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from ..generation import generate
from ..modules.quantized import quantize_weights
from .models import build_model, model_shape, n_params
from .timing import time_interleaved

VARIANTS = ("float32", "bfloat16", "int8", "bfloat16+int8")
STEPS = ("eager", "compiled")  # how each variant's decode step runs


def convert(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """A copy of the float32 `model` in `variant`."""
    out = copy.deepcopy(model)
    if variant.startswith("bfloat16"):
        out = out.to(torch.bfloat16)
    if variant.endswith("int8"):
        out = quantize_weights(out)
    return out.eval()


def decode_ms_per_token(models: dict[str, torch.nn.Module], vocab: int, new_tokens: int,
                        repeats: int, compile: bool = False) -> dict[str, float]:
    """Greedy ms per new token of each model at batch 1 after a 16-token prompt (prefill excluded); with
    `compile`, through the compiled step (its compile happens in the warm-up round, which is not timed)."""
    prompt = torch.randint(0, vocab, (1, 16))
    variants = {}
    for name, m in models.items():
        variants[f"{name}/long"] = lambda m=m: generate(m, prompt, new_tokens + 1, compile=compile)
        variants[f"{name}/short"] = lambda m=m: generate(m, prompt, 1, compile=compile)
    times = time_interleaved(variants, repeats, warmup=1)
    return {name: max(statistics.median(times[f"{name}/long"]) - statistics.median(times[f"{name}/short"]), 0.0)
            / new_tokens * 1e3 for name in models}


def _same_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean length of the rows' common prefix, as a share of the row length (a, b: (rows, n) token ids)."""
    differ = (a != b).int()
    first = torch.where(differ.any(1), differ.argmax(1), torch.full((a.shape[0],), a.shape[1]))
    return float(first.float().mean() / a.shape[1])


def quality(model: torch.nn.Module, tokenizer, quick: bool) -> list[dict]:
    """bits per byte, argmax agreement and greedy match of every variant of `model` on the held-out text."""
    from ..data import TokenStream, load_corpus
    from ..evaluation import evaluate_bits_per_byte

    _, held_out = load_corpus()
    stream = TokenStream.from_documents(held_out, tokenizer)
    seqlen, batch, max_tokens = (64, 2, 256) if quick else (256, 8, 32768)
    n_new = 8 if quick else 64
    windows = stream.tokens[: 4 * seqlen].long().view(4, seqlen)  # (4, seqlen) held-out text
    prompts = [row[:32].tolist() for row in windows]
    rows, base_argmax, base_greedy, base_bpb = [], None, None, None
    for variant in VARIANTS:
        m = convert(model, variant)
        _, bpb = evaluate_bits_per_byte(m, stream, seqlen, batch, max_tokens)
        with torch.no_grad():
            argmax = m(windows)[..., : tokenizer.vocab_size].argmax(-1)
        greedy = torch.tensor(generate(m, prompts, n_new))
        if variant == "float32":
            base_argmax, base_greedy, base_bpb = argmax, greedy, bpb
        rows.append({"variant": variant, "bits_per_byte": bpb, "bpb_change": bpb - base_bpb,
                     "argmax_agreement": float((argmax == base_argmax).float().mean()),
                     "greedy_match": float((greedy == base_greedy).float().mean()),
                     "greedy_prefix": _same_prefix(greedy, base_greedy),
                     "eval_tokens": max_tokens})
    return rows


def run_quantize(device: torch.device, quick: bool, model_dir: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    if device.type != "cpu":
        raise ValueError(f"bench quantize: measures CPU decoding; got device {device}")
    shape = model_shape(quick)
    new_tokens, repeats = (4, 1) if quick else (16, 3)
    rows, params = [], {}
    for name in ("mamba1", "mamba2"):
        base = build_model(name, shape, device, torch.float32)
        params[name] = n_params(base)
        models = {v: convert(base, v) for v in VARIANTS}
        for step in STEPS:
            ms = decode_ms_per_token(models, shape.vocab_size, new_tokens, repeats, compile=step == "compiled")
            if step == "eager":
                eager_float32 = ms["float32"]
            for v in VARIANTS:
                rows.append({"model": name, "variant": v, "step": step, "ms_per_token": ms[v],
                             "speedup": eager_float32 / max(ms[v], 1e-9)})
                log(f"{name} {v:14s} {step:8s} {ms[v]:8.2f} ms/token ({rows[-1]['speedup']:.2f}x eager float32)")
        del base, models
    result = {"shape": shape.name, "params": params, "new_tokens": new_tokens, "repeats": repeats, "speed": rows}
    if model_dir is not None:
        from ..checkpoints import load_checkpoint_tokenizer
        from ..models import MambaLM

        model = MambaLM.from_pretrained(model_dir, dtype=torch.float32, device=device).eval()
        tokenizer = load_checkpoint_tokenizer(Path(model_dir))
        quality_model = {"checkpoint": str(model_dir), "params": n_params(model)}
    else:
        from ..data import ByteTokenizer

        model = build_model("mamba2", model_shape(True), device, torch.float32)
        tokenizer = ByteTokenizer()
        quality_model = {"checkpoint": None, "params": n_params(model),
                         "note": "a random tiny model: run with --model DIR (a trained checkpoint) for real figures"}
    result["quality_model"] = quality_model
    result["quality"] = quality(model, tokenizer, quick)
    for r in result["quality"]:
        log(f"{r['variant']:14s} {r['bits_per_byte']:.4f} bits/byte ({r['bpb_change']:+.4f}), argmax agreement "
            f"{r['argmax_agreement']:.3f}, greedy match {r['greedy_match']:.3f} (same prefix {r['greedy_prefix']:.3f})")
    return result


def plot_quantize(result: dict, out_dir, device_name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    series = [(name, step) for name in ("mamba1", "mamba2") for step in STEPS]
    width = 0.8 / len(series)
    for i, (name, step) in enumerate(series):
        vals = [next(r["ms_per_token"] for r in result["speed"]
                     if r["model"] == name and r["variant"] == v and r.get("step", "eager") == step)
                for v in VARIANTS]
        compiled = step == "compiled"
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(VARIANTS))], vals, width,
               label=f"{name}, {step} step", color="C0" if name == "mamba1" else "C2", alpha=0.55 if compiled else 1,
               hatch="//" if compiled else None, edgecolor="black" if compiled else None)
    ax.set_xticks(range(len(VARIANTS)), VARIANTS)
    ax.set_ylabel("ms per token (batch 1)")
    ax.set_title(f"CPU decoding by weight format ({result['shape']}; {device_name})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "quantize_decode.png", dpi=110)
    plt.close(fig)
    return ["quantize_decode.png"]
