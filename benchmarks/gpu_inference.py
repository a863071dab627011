"""GPU inference benchmark: Mamba-1 and Mamba-2 at the 130M shape against a Transformer of the same size.

Shape: d_model 768, 24 layers (the Transformer: 12 layers, 12 heads, SwiGLU 2304; 131M parameters against
Mamba's 129M), vocab 50280, bf16 weights, random weights and prompt ids, greedy decoding. The script
prints, in this order:

  0. self-checks, each PASS or FAIL (the exit status is 1 if any fails): CUDA-graphed decoding gives the
     eager tokens; prefill + decode steps reproduce the parallel forward (fp32, small shape); a ragged
     batch prefills each row as if alone (the Triton seq_idx path); the Transformer's cached decode
     reproduces its parallel forward;
  1. batch-1 decode latency, ms/token, with and without CUDA graphs (prompt 128, 256 steps, median of 3);
  2. batch-64 throughput, new tokens/s (prompt 128 + 256 new): end to end through `generate` (prefill
     included) and decode only;
  3. throughput vs batch size at prompt 2048 + 2048 new tokens, batch 1, 2, 4, ... doubling until
     torch.cuda.OutOfMemoryError, --max-batch or the per-model --sweep-budget: prefill time (measured),
     decode ms/step (measured over --sweep-steps graphed steps per segment; a Mamba step costs the same at
     any position, the Transformer's is timed in every 256-position kv bucket), the generation time they
     add up to, and new tokens/s; one full 2048-step decode at batch 8 checks that estimate. A markdown
     table goes to stdout, the plot to OUT_DIR/inference_throughput.png, every figure to
     OUT_DIR/inference_results.json.

Usage (repository root):
    python benchmarks/gpu_inference.py --out-dir /tmp/out          # GPU machine: about 4 minutes on an H100
    python benchmarks/gpu_inference.py --smoke --out-dir /tmp/smoke   # CPU, tiny shapes, no graphs: ~10 s
    python benchmarks/gpu_inference.py --out-dir /tmp/out --skip-sweep --models mamba1
    # issue 18: kernels per token and ms/token of the fused decode step against the step op by op (~2 min)
    python benchmarks/gpu_inference.py --out-dir /tmp/out --skip-sweep --skip-checks --count-kernels \
        --models mamba1 mamba1-unfused mamba2 mamba2-unfused
    # issue 18's batch 64: the step's projections through the many-rows kernel (run again with 0 to compare)
    python benchmarks/gpu_inference.py --out-dir /tmp/out --skip-sweep --models mamba1 mamba2 --rows-matmul-max-rows 128
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformer_baseline import TransformerConfig, TransformerDecoder, TransformerLM, bucket_len  # noqa: E402

from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.generation import CUDAGraphDecoder, allocate_cache, decode_one_token, generate, prefill  # noqa: E402
from mambakit.modules import fusion  # noqa: E402
from mambakit.ops import pdl_mode  # noqa: E402

from mambakit.bench.decode_kernels import count_decode_kernels, format_decode_kernels, profile_decode_kernels  # noqa: E402

# mamba2-bf16state / mamba1-bf16state: the same model decoding from a bfloat16 SSM-state cache (state_dtype; mamba_ssm's
# cache keeps both layers' states in the weights' dtype);
# mamba1-unfused / mamba2-unfused: the same models with the decode step op by op (`fused_step = False`: the step
# before issue 18's fusion), to time both in one run
MODELS = ("mamba1", "mamba2", "mamba2-bf16state", "transformer", "mamba1-unfused", "mamba2-unfused", "mamba1-bf16state")
DEFAULT_MODELS = ("mamba1", "mamba2", "mamba2-bf16state", "transformer")
STATE_DTYPES = {"mamba2-bf16state": torch.bfloat16, "mamba1-bf16state": torch.bfloat16}
UNFUSED = ("mamba1-unfused", "mamba2-unfused")


@dataclass
class Shapes:
    d_model: int = 768
    n_layer: int = 24
    vocab: int = 50280
    m2_headdim: int = 64
    m2_dstate: int = 128
    m2_chunk: int = 256
    tf_layers: int = 12
    tf_heads: int = 12
    tf_ff: int = 2304
    check_d_model: int = 256  # the fp32 consistency checks run a smaller model of the same structure
    check_layers: int = 4
    latency_prompt: int = 128
    latency_steps: int = 256
    batch_tp: int = 64
    prompt: int = 2048
    new_tokens: int = 2048
    bucket: int = 256
    full_check_batch: int = 8


SMOKE = Shapes(d_model=64, n_layer=2, vocab=512, m2_headdim=16, m2_dstate=16, m2_chunk=16, tf_layers=2, tf_heads=4,
               tf_ff=192, check_d_model=64, check_layers=2, latency_prompt=16, latency_steps=16, batch_tp=4,
               prompt=32, new_tokens=32, bucket=8, full_check_batch=2)


# ---- timing -------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- models and a common decoding interface --------------------------------------------------------------


def mamba_model(layer: str, s: Shapes, d_model: int, n_layer: int, device, dtype, fused_step: bool = True) -> MambaLM:
    ssm_cfg = {"layer": layer}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=s.m2_headdim, d_state=s.m2_dstate, chunk_size=s.m2_chunk)
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=s.vocab, ssm_cfg=ssm_cfg)).to(
        device=device, dtype=dtype).eval()
    for block in model.backbone.layers:
        block.mixer.fused_step = fused_step
    return model


def transformer_model(s: Shapes, d_model: int, n_layer: int, n_head: int, d_ff: int, device, dtype) -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=d_ff, vocab_size=s.vocab)
    return TransformerLM(cfg, max_positions=max(s.prompt + s.new_tokens, 1024)).to(device=device, dtype=dtype).eval()


def build(name: str, s: Shapes, device, dtype, small: bool = False):
    d_model, n_layer = (s.check_d_model, s.check_layers) if small else (s.d_model, s.n_layer)
    if name == "transformer":
        n_head = max(1, s.tf_heads * d_model // s.d_model)
        return transformer_model(s, d_model, max(1, n_layer // 2) if small else s.tf_layers, n_head,
                                 3 * d_model, device, dtype)
    return mamba_model("Mamba1" if name.startswith("mamba1") else "Mamba2", s, d_model, n_layer, device, dtype,
                       fused_step=name not in UNFUSED)


class Runner:
    """prefill(ids (B, L)) -> logits (B, V); step(tokens (B,), pos) -> logits (B, V); segments() for timing."""

    def __init__(self, name: str, model, batch: int, max_len: int, graphs: bool, bucket: int, prefill_tokens: int):
        self.name, self.model, self.batch, self.bucket = name, model, batch, bucket
        # prefill memory is bounded by ~prefill_tokens tokens per model call (a multiple of 256 per row)
        self.rows_or_chunk = max(1, prefill_tokens // max_len) if name == "transformer" else \
            max(256, (prefill_tokens // batch) // 256 * 256)
        if name == "transformer":
            self.decoder = TransformerDecoder(model, batch, max_len, bucket=bucket, graphs=graphs)
            self.cache = self.decoder.cache
        else:
            state_dtype = STATE_DTYPES.get(name)
            self.decoder = CUDAGraphDecoder(model, batch, state_dtype=state_dtype) if graphs else None
            self.cache = self.decoder.cache if graphs else allocate_cache(model, batch, state_dtype=state_dtype)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.name == "transformer":
            return self.model.prefill(ids, self.cache, rows_per_call=self.rows_or_chunk)
        _, logits = prefill(self.model, ids, self.cache.reset(), tokens_per_call=self.rows_or_chunk)
        return logits

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if self.name == "transformer":
            return self.decoder(tokens, pos)
        if self.decoder is not None:
            return self.decoder(tokens)
        return decode_one_token(self.model, tokens, self.cache)

    def segments(self, start: int, count: int) -> list[tuple[int, int]]:
        """(first position, steps) runs of equal step cost: one for Mamba, one per kv bucket for the Transformer."""
        if self.name != "transformer":
            return [(start, count)]
        out, pos = [], start
        while pos < start + count:
            end = min(start + count, bucket_len(pos, self.bucket, 1 << 62))
            out.append((pos, end - pos))
            pos = end
        return out


def decode_loop(runner: Runner, logits: torch.Tensor, pos: int, n: int) -> torch.Tensor:
    """n greedy steps from position pos: argmax then step, as generation does."""
    for i in range(n):
        logits = runner.step(logits.argmax(-1), pos + i)
    return logits


def step_seconds(runner: Runner, logits: torch.Tensor, pos: int, n: int, device) -> float:
    """Seconds per greedy decode step at position pos (two warm-up steps first: graph capture, compilation)."""
    logits = decode_loop(runner, logits, pos, 2)
    return timed(lambda: decode_loop(runner, logits, pos + 2, n), device) / n


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- 0. self-checks ----------------------------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.failed: list[str] = []

    def report(self, name: str, ok: bool, detail: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
        if not ok:
            self.failed.append(name)

    def run(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # a crashing check is a failed check; the benchmark goes on
            traceback.print_exc()
            self.report(name, False, f"raised {type(err).__name__}: {err}")


def run_checks(models: dict, names: list[str], s: Shapes, device, dtype, graphs: bool) -> Checks:
    checks = Checks()
    print("\n## 0. self-checks")
    g = torch.Generator().manual_seed(1)
    ragged = [torch.randint(0, s.vocab, (n,), generator=g).tolist() for n in (37, 5, 1, 20)]

    for name in names:
        model = models[name]
        if True:  # on CPU (--smoke) both runners are eager: the check only exercises this code
            def graph_vs_eager(model=model, name=name):
                # the same tokens through both paths (teacher forcing): graph replay runs the eager step's
                # kernels, so the logits should agree to the bit; tokens from argmax of near-flat random-init
                # logits would flip on any difference, so compare logits
                ids = torch.randint(0, s.vocab, (3, 40), device=device)
                logits = {}
                for use in (False, True):
                    runner = Runner(name, model, 3, 48, graphs=use, bucket=16, prefill_tokens=1 << 20)
                    out = [runner.prefill(ids[:, :24])]
                    out += [runner.step(ids[:, pos], pos).clone() for pos in range(24, 40)]
                    logits[use] = torch.stack(out, 1)
                    runner = None
                diff = float((logits[True] - logits[False]).abs().max() / logits[False].abs().max())
                same = float((logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean())
                checks.report(f"{name} CUDA-graph decode == eager", diff <= 1e-2,
                              f"max logit difference {diff:.1e} of max |logit|, argmax agreement {same:.0%} "
                              f"(16 steps, batch 3, {str(dtype)[6:]}{'' if graphs else ', no graphs on CPU'})")
            checks.run(f"{name} CUDA-graph decode == eager", graph_vs_eager)

        def consistency(name=name):
            small = build(name, s, device, torch.float32, small=True)
            ids = torch.randint(0, s.vocab, (2, 48), device=device)
            with torch.inference_mode():
                full = small(ids)[:, 31:47].float()
                runner = Runner(name, small, 2, 64, graphs=False, bucket=16, prefill_tokens=1 << 20)
                logits = [runner.prefill(ids[:, :32])]
                for pos in range(32, 47):
                    logits.append(runner.step(ids[:, pos], pos).clone())
            got = torch.stack(logits, 1)
            rel = float((got - full).abs().max() / full.abs().max())
            bound = 2e-2 if name in STATE_DTYPES else 1e-3  # a bf16 state rounds once per token
            checks.report(f"{name} prefill + decode == parallel forward", rel < bound,
                          f"max error {rel:.2e} of max |logit| (fp32 weights, d_model {s.check_d_model}, "
                          f"16 positions, bound {bound:g})")
        checks.run(f"{name} prefill + decode == parallel forward", consistency)

        if name != "transformer":
            def ragged_rows(name=name):
                small = build(name, s, device, torch.float32, small=True)
                cache, logits = prefill(small, ragged, tokens_per_call=16)
                worst = 0.0
                for i, row in enumerate(ragged):
                    alone, alone_logits = prefill(small, [row], tokens_per_call=16)
                    worst = max(worst, float((logits[i] - alone_logits[0]).abs().max() / alone_logits.abs().max()))
                    for st, st_alone in zip(cache.layers, alone.layers):
                        scale = float(st_alone.ssm_state.abs().max()) + 1e-6
                        worst = max(worst, float((st.ssm_state[i] - st_alone.ssm_state[0]).abs().max()) / scale)
                        worst = max(worst, float((st.conv_state[i] - st_alone.conv_state[0]).abs().max()) /
                                    (float(st_alone.conv_state.abs().max()) + 1e-6))
                checks.report(f"{name} ragged prefill == each row alone", worst < 1e-3,
                              f"max error {worst:.2e} (logits and every state, lengths 37/5/1/20, chunk 16)")
            checks.run(f"{name} ragged prefill == each row alone", ragged_rows)
    return checks


# ---- kernels per decode step -------------------------------------------------------------------------------


def bench_kernel_counts(models: dict, names: list[str], device) -> list[dict]:
    """Kernels of one decode step per Mamba model: the dispatch count (aten ops that launch + Triton launches,
    per layer) and, on CUDA, the device activities torch.profiler records (cuBLAS's own extra kernels included)."""
    print("\n## kernels per decode step (batch 1; dispatched = aten ops that launch + Triton launches)")
    rows = []
    for name in names:
        if name == "transformer":
            continue
        k = count_decode_kernels(models[name], 1)
        row = {"model": name, "dispatched_per_token": k.per_token, "per_layer": k.max_per_layer,
               "outside_layers": k.outside_layers, "layer_ops": dict(k.layer_ops)}
        print("  " + format_decode_kernels(name, k))
        if device.type == "cuda":
            for batch in (1, 64):
                n, by_name, micros = profile_decode_kernels(models[name], batch)
                row[f"profiled_per_token_b{batch}"] = n
                row[f"profiled_us_per_token_b{batch}"] = sum(micros.values())
                row[f"profiled_b{batch}_us_by_kernel"] = {k_: round(v, 2) for k_, v in micros.most_common()}
                if batch == 1:
                    row["profiled_b1_by_kernel"] = dict(by_name)
                    top = ", ".join(f"{v:g}x {k_[:60]}" for k_, v in by_name.most_common(8))
                    print(f"    profiler, batch 1: {n:g} device activities per token; most launched: {top}")
                print(f"    profiler, batch {batch}: {n:g} device activities, {sum(micros.values()):.1f} us of kernels "
                      f"per token; by device time:")
                for k_, v in micros.most_common(12):
                    print(f"      {v:8.1f} us  {by_name[k_]:5g}x  {k_[:100]}")
        rows.append(row)
    print("\n| model | kernels/token (dispatched) | per layer | outside layers | profiled b1 | profiled b64 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dispatched_per_token']} | {r['per_layer']} | {r['outside_layers']} | "
              f"{r.get('profiled_per_token_b1', float('nan')):g} | {r.get('profiled_per_token_b64', float('nan')):g} |")
    return rows


# ---- 1. batch-1 latency ------------------------------------------------------------------------------------


def bench_latency(models: dict, names: list[str], s: Shapes, device, graphs: bool) -> list[dict]:
    print(f"\n## 1. batch-1 decode latency (prompt {s.latency_prompt}, {s.latency_steps} greedy steps, median of 3)")
    rows = []
    for name in names:
        for use_graph in ([False, True] if graphs else [False]):
            max_len = -(-(s.latency_prompt + s.latency_steps) // s.bucket) * s.bucket  # whole kv buckets
            runner = Runner(name, models[name], 1, max_len, use_graph, s.bucket, 1 << 20)
            ids = torch.randint(0, s.vocab, (1, s.latency_prompt), device=device)
            times = []
            for _ in range(3):
                logits = runner.prefill(ids)
                logits = decode_loop(runner, logits, s.latency_prompt, 2)  # capture, compile
                times.append(timed(lambda: decode_loop(runner, logits, s.latency_prompt + 2, s.latency_steps - 4),
                                   device) / (s.latency_steps - 4))
            rows.append({"model": name, "cuda_graph": use_graph, "ms_per_token": statistics.median(times) * 1e3})
            runner = None
            free_memory()
    print("\n| model | CUDA graph | ms/token |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {'yes' if r['cuda_graph'] else 'no'} | {r['ms_per_token']:.3f} |")
    return rows


# ---- 2. batch-64 throughput --------------------------------------------------------------------------------


def bench_batch(models: dict, names: list[str], s: Shapes, device, graphs: bool) -> list[dict]:
    b, new = s.batch_tp, s.latency_steps
    print(f"\n## 2. batch-{b} throughput (prompt {s.latency_prompt} + {new} new tokens, greedy, median of 3)")
    rows = []
    ids = torch.randint(0, s.vocab, (b, s.latency_prompt), device=device)
    for name in names:
        model = models[name]
        runner = Runner(name, model, b, -(-(s.latency_prompt + new) // s.bucket) * s.bucket, graphs, s.bucket, 1 << 20)
        if name == "transformer":
            def gen():
                logits = runner.prefill(ids)
                decode_loop(runner, logits, s.latency_prompt, new - 1)
        else:
            cg = runner.decoder if graphs else False

            def gen():
                generate(model, ids, new, cuda_graph=cg)
        gen()  # warm-up (compilation, the Transformer's bucket graphs)
        t_gen = statistics.median(timed(gen, device) for _ in range(3))
        logits = runner.prefill(ids)
        t_step = step_seconds(runner, logits, s.latency_prompt, min(new - 4, 64), device)
        rows.append({"model": name, "batch": b, "cuda_graph": graphs, "generate_tok_s": b * new / t_gen,
                     "decode_tok_s": b / t_step, "decode_ms_per_step": t_step * 1e3})
        runner = None
        free_memory()
    print("\n| model | batch | end-to-end tok/s (prefill incl.) | decode tok/s | decode ms/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['generate_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
              f"{r['decode_ms_per_step']:.3f} |")
    return rows


# ---- programmatic dependent launch off / on --------------------------------------------------------------


def bench_pdl_ab(models: dict, names: list[str], s: Shapes, device, graphs: bool, batches: list[int]) -> list[dict]:
    """Section 1 (when `batches` holds 1) and section 2 at each larger batch of `batches`, with PDL off, then on,
    twice: CUDA graphs are captured inside each setting, so the replayed steps launch as it says."""
    rows = []
    for rep in range(2):
        for on in (False, True):
            print(f"\n# PDL {'on' if on else 'off'}, round {rep + 1}")
            with pdl_mode(on):
                if 1 in batches:
                    for r in bench_latency(models, names, s, device, graphs):
                        rows.append({"pdl": on, "round": rep + 1, "batch": 1, **r})
                for b in (b for b in batches if b > 1):
                    for r in bench_batch(models, names, replace(s, batch_tp=b), device, graphs):
                        rows.append({"pdl": on, "round": rep + 1, **r})
    print("\n## PDL off / on: ms per token (batch 1, section 1) or per replayed decode step (section 2), each round\n")
    print("| model | batch | CUDA graph | off round 1 | on round 1 | off round 2 | on round 2 | on / off (means) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:  # batch 1: ms per token of section 1; larger batches: the replayed step of section 2
        r["ab_ms"] = r["ms_per_token"] if "ms_per_token" in r else r["decode_ms_per_step"]
    for model, batch, graph in sorted({(r["model"], r["batch"], r["cuda_graph"]) for r in rows}):
        vals = {(r["pdl"], r["round"]): r["ab_ms"] for r in rows
                if (r["model"], r["batch"], r["cuda_graph"]) == (model, batch, graph)}
        off = [v for (p, _), v in vals.items() if not p]
        on = [v for (p, _), v in vals.items() if p]
        cells = " | ".join(f"{vals.get((p, i), float('nan')):.4f}" for i in (1, 2) for p in (False, True))
        print(f"| {model} | {batch} | {'yes' if graph else 'no'} | {cells} | "
              f"{statistics.mean(on) / statistics.mean(off):.3f} |")
    return rows


# ---- 3. throughput vs batch size ---------------------------------------------------------------------------


def measure_batch(name: str, model, batch: int, s: Shapes, device, graphs: bool, steps: int,
                  prefill_tokens: int) -> dict:
    max_len = s.prompt + s.new_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = Runner(name, model, batch, max_len, graphs, s.bucket, prefill_tokens)
    try:
        ids = torch.randint(0, s.vocab, (batch, s.prompt), device=device)
        # warm-up on the full prompt: kernels specialise on the shape (scan segments, chunk tiles), so a
        # shorter warm-up would leave the timed prefill paying Triton compilation (seconds)
        runner.prefill(ids)
        holder = {}
        t_prefill = timed(lambda: holder.update(logits=runner.prefill(ids)), device)
        logits = holder["logits"]
        t_decode, per_step = 0.0, []
        for pos, count in runner.segments(s.prompt, s.new_tokens):
            sec = step_seconds(runner, logits, pos, max(1, min(count - 2, steps)), device)
            per_step.append(sec)
            t_decode += sec * count
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        new = batch * s.new_tokens
        return {"model": name, "batch": batch, "prefill_s": t_prefill, "decode_s": t_decode,
                "decode_ms_per_step": 1e3 * t_decode / s.new_tokens, "total_s": t_prefill + t_decode,
                "tok_s": new / (t_prefill + t_decode), "decode_tok_s": new / t_decode, "peak_gib": peak,
                "step_ms_first_last": [1e3 * per_step[0], 1e3 * per_step[-1]]}
    finally:
        runner = None
        free_memory()


def full_decode_check(name: str, model, s: Shapes, device, graphs: bool, estimate: dict) -> dict:
    """Run all new_tokens steps at one batch size: the measured decode time against the estimate."""
    runner = Runner(name, model, estimate["batch"], s.prompt + s.new_tokens, graphs, s.bucket, 1 << 20)
    try:
        ids = torch.randint(0, s.vocab, (estimate["batch"], s.prompt), device=device)
        logits = runner.prefill(ids)
        # warm-up: one step at the start of every segment captures every graph before the timed run (a
        # Transformer step writes only its own position, which the timed run rewrites before reading it)
        for pos, _ in runner.segments(s.prompt, s.new_tokens):
            runner.step(logits.argmax(-1), pos)
        logits = runner.prefill(ids)
        measured = timed(lambda: decode_loop(runner, logits, s.prompt, s.new_tokens), device)
    finally:
        runner = None
        free_memory()
    return {"model": name, "batch": estimate["batch"], "measured_decode_s": measured,
            "estimated_decode_s": estimate["decode_s"], "ratio": measured / estimate["decode_s"]}


def bench_sweep(models: dict, names: list[str], s: Shapes, device, graphs: bool, max_batch: int, budget_s: float,
                steps: int, prefill_tokens: int) -> tuple[list[dict], dict, list[dict]]:
    print(f"\n## 3. throughput vs batch size (prompt {s.prompt} + {s.new_tokens} new tokens, greedy, "
          f"{'CUDA graphs' if graphs else 'eager'})")
    rows, stops, fulls = [], {}, []
    for name in names:
        model = models[name]
        t_start = time.perf_counter()
        batch, last_s = 1, 0.0
        stop = f"--max-batch {max_batch}"
        while batch <= max_batch:
            elapsed = time.perf_counter() - t_start
            if rows and rows[-1]["model"] == name and elapsed + 2.5 * last_s > budget_s:
                stop = f"time budget ({budget_s:.0f} s per model): batch {batch} not tried"
                break
            t0 = time.perf_counter()
            try:
                row = measure_batch(name, model, batch, s, device, graphs, steps, prefill_tokens)
            except Exception as err:
                if not is_oom(err):
                    traceback.print_exc()
                    stop = f"error at batch {batch}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
                else:
                    stop = f"out of memory at batch {batch}"
                free_memory()
                break
            last_s = time.perf_counter() - t0
            rows.append(row)
            print(f"  {name:11s} batch {batch:5d}: prefill {row['prefill_s']:7.3f} s, decode "
                  f"{row['decode_ms_per_step']:8.3f} ms/step, {row['tok_s']:>11,.0f} tok/s, peak "
                  f"{row['peak_gib']:.1f} GiB  ({last_s:.1f} s)", flush=True)
            batch *= 2
        stops[name] = stop
        own = [r for r in rows if r["model"] == name]
        check_row = next((r for r in own if r["batch"] == s.full_check_batch), None)
        if check_row is not None:
            try:
                fulls.append(full_decode_check(name, model, s, device, graphs, check_row))
            except Exception as err:
                print(f"  full-decode check of {name} failed: {type(err).__name__}: {err}")
    return rows, stops, fulls


def print_sweep(rows: list[dict], stops: dict, fulls: list[dict], s: Shapes) -> list[dict]:
    print("\n| model | batch | prefill s | decode ms/step | generation s | tok/s (new tokens) | decode-only tok/s | "
          "peak GiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['prefill_s']:.3f} | {r['decode_ms_per_step']:.3f} | "
              f"{r['total_s']:.2f} | {r['tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | {r['peak_gib']:.1f} |")
    best = []
    for name, stop in stops.items():
        own = [r for r in rows if r["model"] == name]
        if own:
            best.append({**own[-1], "stopped_by": stop})
    base = next((b for b in best if b["model"] == "transformer"), None)
    print(f"\nLargest batch per model (prompt {s.prompt} + {s.new_tokens} new):\n")
    print("| model | largest batch run | why not larger | tok/s | vs Transformer |\n|---|---|---|---|---|")
    for b in best:
        ratio = f"{b['tok_s'] / base['tok_s']:.1f}x" if base else "n/a"
        print(f"| {b['model']} | {b['batch']} | {b['stopped_by']} | {b['tok_s']:,.0f} | {ratio} |")
    if fulls:
        print("\nEstimate check (all decode steps run once):\n\n| model | batch | measured decode s | estimated | "
              "ratio |\n|---|---|---|---|---|")
        for f in fulls:
            print(f"| {f['model']} | {f['batch']} | {f['measured_decode_s']:.3f} | {f['estimated_decode_s']:.3f} | "
                  f"{f['ratio']:.2f} |")
    return best


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = ("tab:blue", "tab:orange", "tab:red", "tab:gray", "tab:cyan", "tab:olive", "tab:purple")
    for name, color in zip(MODELS, colors):
        own = [r for r in rows if r["model"] == name]
        if not own:
            continue
        xs = [r["batch"] for r in own]
        ax.plot(xs, [r["tok_s"] for r in own], "o-", color=color, label=f"{name} (generation)")
        ax.plot(xs, [r["decode_tok_s"] for r in own], "--", color=color, alpha=0.6, label=f"{name} (decode only)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("new tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="where the PNG plot and the JSON results go")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no CUDA graphs: checks the script")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS),
                        help="mamba1-unfused / mamba2-unfused: the decode step op by op, as before the fused step")
    parser.add_argument("--count-kernels", action="store_true",
                        help="print the kernels of one decode step per model (dispatched per layer; CUDA: profiled)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="largest batch of the sweep (default 2048; smoke 4)")
    parser.add_argument("--sweep-budget", type=float, default=40.0, help="seconds of sweep per model (default 40)")
    parser.add_argument("--sweep-steps", type=int, default=24, help="timed decode steps per segment (default 24)")
    parser.add_argument("--prefill-tokens", type=int, default=1 << 19,
                        help="tokens per prefill call in the sweep, bounds prefill memory (default 2^19)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--rows-matmul-max-rows", type=int, default=None, metavar="N",
                        help="decode steps of 9 to N rows take the many-rows projection kernel "
                             "(ops/norm_linear/triton_rows_matmul.py; default: the library's, off until timed)")
    parser.add_argument("--throughput-batch", type=int, default=None, metavar="B",
                        help="batch of section 2's throughput run (default 64)")
    parser.add_argument("--mamba1-step-max-batch", type=int, default=None, metavar="N",
                        help="Mamba-1 decode steps of 9 to N rows run ops.mamba1_step (default: the library's, "
                             "modules.fusion.MAMBA1_STEP_MAX_BATCH; 8 turns it off)")
    parser.add_argument("--fused-step-max-batch", type=int, default=None, metavar="N",
                        help="decode steps of up to N rows take the block's fused step (norm + in_proj + conv in one "
                             "kernel, the tiled one past 8 rows; default: modules.fusion.FUSED_STEP_MAX_BATCH)")
    parser.add_argument("--pdl-ab", action="store_true",
                        help="after the checks, instead of the sections: the latency and throughput of --ab-batches "
                             "with programmatic dependent launch off, then on, twice (ops.common.pdl_mode)")
    parser.add_argument("--ab-batches", type=int, nargs="+", default=[1, 16, 64], metavar="B",
                        help="batches of --pdl-ab (default 1 16 64; 1: section 1's latency, eager and graphed)")
    args = parser.parse_args()
    if args.mamba1_step_max_batch is not None:
        fusion.MAMBA1_STEP_MAX_BATCH = args.mamba1_step_max_batch
        print(f"Mamba-1 decode steps of 9 to {args.mamba1_step_max_batch} rows run ops.mamba1_step")
    if args.fused_step_max_batch is not None:
        fusion.FUSED_STEP_MAX_BATCH = args.fused_step_max_batch
        print(f"decode steps of up to {args.fused_step_max_batch} rows take the fused step")
    if args.rows_matmul_max_rows is not None:
        from mambakit.ops.norm_linear import rows_policy

        rows_policy.ROWS_MATMUL_MAX_ROWS = args.rows_matmul_max_rows
        print(f"many-rows projection kernel for decode steps of 9 to {args.rows_matmul_max_rows} rows")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        s, device, dtype, graphs = SMOKE, torch.device("cpu"), torch.float32, False
        max_batch = args.max_batch or 4
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU check of this script", file=sys.stderr)
            return 2
        s, device, dtype, graphs = Shapes(), torch.device("cuda"), torch.bfloat16, True
        max_batch = args.max_batch or 2048
    if args.throughput_batch is not None:
        s = replace(s, batch_tp=args.throughput_batch)
    t_start = time.perf_counter()
    print(f"# mambakit inference benchmark, {datetime.date.today()}")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, python {platform.python_version()}, {dtype}, "
          f"{'smoke (tiny shapes)' if args.smoke else 'd_model 768, vocab 50280'}")
    if device.type == "cuda":
        import triton

        print(f"triton {triton.__version__}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB")
    models = {name: build(name, s, device, dtype) for name in args.models}
    for name, model in models.items():
        print(f"  {name}: {n_params(model) / 1e6:.1f}M parameters")

    results: dict = {"date": str(datetime.date.today()), "torch": torch.__version__, "device": str(device),
                     "dtype": str(dtype), "smoke": args.smoke, "shapes": asdict(s)}
    failed: list[str] = []

    def section_done(t0: float) -> float:
        print(f"(section: {time.perf_counter() - t0:.0f} s)", flush=True)
        return time.perf_counter()

    t0 = time.perf_counter()
    if args.count_kernels:
        results["kernels"] = bench_kernel_counts(models, args.models, device)
        t0 = section_done(t0)
    if not args.skip_checks:
        checks = run_checks(models, args.models, s, device, dtype, graphs)
        failed = checks.failed
        results["failed_checks"] = failed
        t0 = section_done(t0)
    if args.pdl_ab:
        results["pdl_ab"] = bench_pdl_ab(models, args.models, s, device, graphs, args.ab_batches)
        (out_dir / "inference_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results: {out_dir / 'inference_results.json'}; total {time.perf_counter() - t_start:.0f} s")
        return 1 if failed else 0
    results["latency"] = bench_latency(models, args.models, s, device, graphs)
    t0 = section_done(t0)
    results["batch"] = bench_batch(models, args.models, s, device, graphs)
    t0 = section_done(t0)
    if not args.skip_sweep:
        rows, stops, fulls = bench_sweep(models, args.models, s, device, graphs, max_batch, args.sweep_budget,
                                         args.sweep_steps, args.prefill_tokens)
        best = print_sweep(rows, stops, fulls, s)
        results.update(sweep=rows, sweep_stopped_by=stops, largest=best, full_decode_checks=fulls)
        png = out_dir / "inference_throughput.png"
        plot(rows, png, f"prompt {s.prompt} + {s.new_tokens} new tokens, greedy, {str(dtype)[6:]}, "
                        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (smoke)'}")
        print(f"\nplot: {png}")
    (out_dir / "inference_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {out_dir / 'inference_results.json'}; total {time.perf_counter() - t_start:.0f} s")
    if failed:
        print(f"FAILED checks: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
