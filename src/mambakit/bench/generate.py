"""`mambakit bench generate`: decoding throughput against batch size, Mamba-1 and Mamba-2 beside a same-size
Transformer (the Mamba paper's Figure 8, right), and the peers' models when importable.

A row is one (model, batch): a prompt of `prompt_len` random tokens per row, then `new_tokens` greedy tokens.
Decode time = time(generate new_tokens + 1) - time(generate 1), which leaves the prefill out; tokens/s =
batch x new_tokens / decode time. On CUDA the Mamba models replay their decode step from a CUDA graph
(`generate(..., cuda_graph=True)`); the Transformer decodes eagerly (its KV cache grows). Peak CUDA memory is
that of the whole generate call. Peers: transformers' MambaForCausalLM / Mamba2ForCausalLM with the same sizes
(`model.generate`, greedy, its own cache), mamba_ssm's MambaLMHeadModel (CUDA, `cg=True`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..generation import generate
from ..models import TransformerLM
from .models import MODELS, build_model, model_shape, n_params
from .timing import is_out_of_memory, peak_memory_bytes, wall_seconds


@dataclass
class GenerateSettings:
    batches: list[int]
    prompt_len: int
    new_tokens: int
    dtype: str
    repeats: int


def generate_settings(device: torch.device, quick: bool) -> GenerateSettings:
    if quick:
        return GenerateSettings(batches=[1, 2, 4], prompt_len=8, new_tokens=8, dtype="float32", repeats=1)
    if device.type == "cuda":
        return GenerateSettings(batches=[1, 8, 32, 64, 128, 256], prompt_len=128, new_tokens=256, dtype="bfloat16",
                                repeats=3)
    return GenerateSettings(batches=[1, 4, 16], prompt_len=16, new_tokens=16, dtype="float32", repeats=2)


def _hf_model(name: str, shape, device, dtype):
    import transformers

    if name == "mamba1":
        cfg = transformers.MambaConfig(hidden_size=shape.d_model, num_hidden_layers=shape.n_layer,
                                       vocab_size=shape.vocab_size, state_size=16, expand=2, conv_kernel=4)
        return transformers.MambaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    headdim = shape.mamba2.get("headdim", 64)
    cfg = transformers.Mamba2Config(hidden_size=shape.d_model, num_hidden_layers=shape.n_layer,
                                    vocab_size=shape.vocab_size, state_size=shape.mamba2.get("d_state", 128),
                                    head_dim=headdim, num_heads=2 * shape.d_model // headdim, n_groups=1, expand=2,
                                    chunk_size=shape.mamba2.get("chunk_size", 256))
    return transformers.Mamba2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _mamba_ssm_model(name: str, shape, device, dtype):
    from mamba_ssm.models.config_mamba import MambaConfig as RefConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    layer = {"mamba1": "Mamba1", "mamba2": "Mamba2"}[name]
    ssm_cfg = {"layer": layer, **(shape.mamba2 if layer == "Mamba2" else {})}
    return MambaLMHeadModel(RefConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                                      ssm_cfg=ssm_cfg), device=device, dtype=dtype).eval()


def _runner(impl: str, model, device: torch.device) -> Callable[[torch.Tensor, int], object]:
    """(prompt ids (B, P), n new tokens) -> runs greedy generation of exactly n tokens."""
    if impl == "mambakit":
        # the Transformer decodes eagerly: its KV cache grows, which a captured graph would not see
        graphs = device.type == "cuda" and not isinstance(model, TransformerLM)
        return lambda ids, n: generate(model, ids, n, cuda_graph=graphs)
    if impl == "transformers":
        def run(ids, n):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
        return run

    def run_ref(ids, n):  # mamba_ssm: greedy is top_k=1; cg=True captures its decode step
        return model.generate(ids, max_length=ids.shape[1] + n, cg=True, top_k=1)
    return run_ref


def run_generate(device: torch.device, quick: bool, log: Callable[[str], None] = print, peers: bool = True) -> dict:
    s = generate_settings(device, quick)
    shape = model_shape(quick)
    dtype = getattr(torch, s.dtype)
    notes, rows, params = [], [], {}
    candidates = [("mambakit", name) for name in MODELS]
    for impl, module in (("transformers", "transformers"), ("mamba_ssm", "mamba_ssm")):
        if not peers:
            notes.append(f"{impl}: skipped: peers turned off (--no-peers)")
        elif importlib.util.find_spec(module) is None:
            notes.append(f"{impl}: skipped: {module} is not importable")
        elif impl == "mamba_ssm" and device.type != "cuda":
            notes.append("mamba_ssm: skipped: its generation needs CUDA")
        else:
            candidates += [(impl, "mamba1"), (impl, "mamba2")]
    for impl, name in candidates:
        label = name if impl == "mambakit" else f"{impl} {name}"
        try:
            model = build_model(name, shape, device, dtype) if impl == "mambakit" else \
                (_hf_model if impl == "transformers" else _mamba_ssm_model)(name, shape, device, dtype)
        except Exception as err:
            if impl == "mambakit":
                raise
            notes.append(f"{label}: could not be built: {type(err).__name__}: {str(err)[:200]}")
            continue
        params[label] = n_params(model)
        run = _runner(impl, model, device)
        for batch in s.batches:
            ids = torch.randint(0, shape.vocab_size, (batch, s.prompt_len), device=device)
            try:
                run(ids, 2)  # warm-up: compile, capture, allocate
                long = min(wall_seconds(lambda: run(ids, s.new_tokens + 1), device) for _ in range(s.repeats))
                short = min(wall_seconds(lambda: run(ids, 1), device) for _ in range(s.repeats))
                peak = peak_memory_bytes(lambda: run(ids, s.new_tokens + 1), device)
            except Exception as err:
                if impl == "mambakit" and not is_out_of_memory(err):
                    raise
                notes.append(f"{label} stopped at batch {batch}: {type(err).__name__}: {str(err)[:200]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            row = {"model": label, "batch": batch, "decode_s": None, "ms_per_step": None, "tokens_per_s": None,
                   "prefill_and_first_token_s": short, "peak_mb": None if peak is None else peak / 2 ** 20}
            rows.append(row)
            if long <= short:  # a busy machine's noise swallowed the decode time: no figure rather than a wrong one
                notes.append(f"{label} batch {batch}: decode time not measurable (n + 1 tokens took no longer than 1)")
                continue
            decode = long - short
            row.update(decode_s=decode, ms_per_step=decode / s.new_tokens * 1e3,
                       tokens_per_s=batch * s.new_tokens / decode)
            log(f"{label:22s} batch {batch:4d}: {row['ms_per_step']:8.2f} ms/step  {row['tokens_per_s']:10.1f} tok/s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"settings": asdict(s), "shape": asdict(shape), "params": params, "rows": rows, "notes": notes}


def plot_generate(result: dict, out_dir, device_name: str) -> list[str]:
    from .report import line_panels

    rows = result["rows"]
    panels = [("decoding throughput (tokens/s)", rows, "tokens_per_s"),
              ("time per decode step (ms)", rows, "ms_per_step")]
    if any(r["peak_mb"] is not None for r in rows):
        panels.append(("peak memory (MB)", rows, "peak_mb"))
    s = result["settings"]
    line_panels(out_dir / "generate_throughput.png", panels, x="batch", series="model", ylabel="", logy=True,
                title=f"mambakit bench generate ({device_name}; prompt {s['prompt_len']} + {s['new_tokens']} new, "
                      f"{s['dtype']})", ncols=len(panels))
    return ["generate_throughput.png"]
