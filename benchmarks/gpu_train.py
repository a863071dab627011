"""Whole-model training throughput on the GPU: tokens/s and peak memory of a MambaLM training step.

The recipe of issue 12 / ANCHORS.md: float32 parameters, bf16 autocast, fused AdamW, random token ids,
cross-entropy over the whole window. Shapes: "130m" (d_model 768, 24 layers, vocab 50277: the published 130M
models), "1.3b" (d_model 2048, 48 layers). For each layer (Mamba-1, Mamba-2) and path it times `--steps`
optimizer steps after `--warmup` (CUDA-synchronised wall clock) and prints one JSON line per case:
tokens/s, ms per step, peak GB (torch.cuda.max_memory_allocated over the timed steps), the loss.

Paths: "fused" (the default: one custom op per mixer), "unfused" (`mixer.fused = False`: the ops one by
one), "recompute" (`mixer.recompute = True`), each eager or under `torch.compile(model)` (suffix
"+compile"; compile time is reported separately and excluded from tokens/s). The suffix "+ce" takes the
loss from the model itself, `model(ids, targets=...)` (`ops.linear_cross_entropy`, never the whole logits
matrix: what `mambakit train` does, its automatic backend; "+cetorch" / "+cetriton" name the backend, for the
A/B); without any of them the loss is `F.cross_entropy` of the (B, L, V) logits, as mamba_ssm's row computes it.
"+graph" replays the whole step (forward, backward, fused AdamW) from one CUDA graph (`GraphedTrainStep`, what
`Run` does): the step without its host time. "+normtorch" / "+normtriton" make the block norm's backward (`ops.add_rms_norm`) the torch path's autograd or the
Triton kernel (the default on CUDA since session 29). mamba_ssm's MambaLMHeadModel is timed in the same process when it is importable (path
"mamba_ssm").

    python benchmarks/gpu_train.py                                    # 130m, batch 8 x 2048, all paths
    python benchmarks/gpu_train.py --shape 130m --batch 2 --seqlen 8192 --paths fused unfused
    python benchmarks/gpu_train.py --shape 1.3b --paths fused --layers mamba1
    python benchmarks/gpu_train.py --layers mamba2 --paths fused --profile 15   # + the 15 costliest kernels
    python benchmarks/gpu_train.py --paths fused fused+ce unfused+ce         # the logits loss vs the model's own
    python benchmarks/gpu_train.py --paths fused+cetriton+normtorch fused+cetriton   # the block norm's backward

`--profile N` then runs 3 more steps under torch.profiler (CUDA activity) and prints the N kernels with the most
GPU time per step (name, ms per step, launches per step, share of the step's kernel time): where a step goes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import time

import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM
from mambakit.bench.timing import kernel_times

SHAPES = {"130m": (768, 24), "1.3b": (2048, 48)}


def build(layer: str, shape: str) -> MambaLM:
    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(0)
    ssm = {"layer": "Mamba1" if layer == "mamba1" else "Mamba2"}
    return MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, ssm_cfg=ssm)).cuda()


def build_mamba_ssm(layer: str, shape: str):
    from mamba_ssm.models.config_mamba import MambaConfig as RefConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(0)
    cfg = RefConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277,
                    ssm_cfg={"layer": "Mamba1" if layer == "mamba1" else "Mamba2"})
    return MambaLMHeadModel(cfg, device="cuda")


def kernel_table(step, top: int, steps: int = 3) -> list[dict]:
    """GPU time per training step of the `top` costliest kernels (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = kernel_times(prof, steps)
    total = sum(us for _, us, _ in rows) or 1.0
    return [{"kernel": name[:90], "ms_per_step": round(us / 1e3, 3), "launches_per_step": n,
             "share": round(us / total, 3)} for name, us, n in rows[:top]]


@contextlib.contextmanager
def _backends(loss: str | None, norm_backward: bool | None):
    """Within the block: linear_cross_entropy's automatic choice made `loss` (None: unchanged), and the block norm's
    Triton backward (add_rms_norm) allowed to the automatic choice (True) or not (False: the torch path's autograd;
    None: unchanged)."""
    import dataclasses

    from mambakit.ops import dispatch

    rows = {op: dispatch.BACKEND_TABLE[op] for op in ("linear_cross_entropy", "add_rms_norm")}
    saved = {op: dict(row) for op, row in rows.items()}
    if loss is not None:
        for name, impl in rows["linear_cross_entropy"].items():
            rows["linear_cross_entropy"][name] = dataclasses.replace(impl, automatic=name == loss)
    if norm_backward is not None:
        rows["add_rms_norm"]["triton"] = dataclasses.replace(rows["add_rms_norm"]["triton"],
                                                             grad_automatic=norm_backward, grad_fallback="torch")
    try:
        yield
    finally:
        for op, row in rows.items():
            row.update(saved[op])


def run_case(layer: str, shape: str, path: str, batch: int, seqlen: int, steps: int, warmup: int,
             profile_top: int = 0) -> dict:
    base_path, *flags = path.split("+")
    compiled, own_loss = "compile" in flags, bool({"ce", "cetorch", "cetriton"} & set(flags))
    ce_backend = "torch" if "cetorch" in flags else "triton" if "cetriton" in flags else None
    norm_backward = True if "normtriton" in flags else False if "normtorch" in flags else None
    if base_path == "mamba_ssm":
        model = build_mamba_ssm(layer, shape)

        def forward(ids):
            return model(ids).logits
    else:
        model = build(layer, shape)
        for block in model.backbone.layers:
            block.mixer.fused = base_path == "fused"
            block.mixer.recompute = base_path == "recompute"
        forward = model
    if compiled:
        forward = torch.compile(forward)
    graphed = "graph" in flags
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 50277, (batch, seqlen + 1), device="cuda", generator=gen)

    def loss_of(m, ids):
        if own_loss:  # the model's own loss: ops.linear_cross_entropy, what `mambakit train` runs
            return m(ids[:, :-1], targets=ids[:, 1:])
        return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())

    if graphed:  # the whole step (forward, backward, fused AdamW) replayed from one CUDA graph, as `Run` trains
        from mambakit.training.cuda_graph import GraphedTrainStep

        graph_step = GraphedTrainStep(forward, opt, loss_of, autocast_dtype=torch.bfloat16, warmup=max(1, warmup - 1))

        def step():
            with _backends(ce_backend, norm_backward):
                return graph_step.step(ids)
    else:
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16), _backends(ce_backend, norm_backward):
                loss = loss_of(forward, ids)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    row = {"layer": layer, "shape": shape, "path": path, "batch": batch, "seqlen": seqlen,
           "tokens_per_s": round(batch * seqlen * steps / elapsed), "ms_per_step": round(1e3 * elapsed / steps, 2),
           "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "loss": round(float(loss.detach()), 4),
           "first_step_s": round(first, 1)}
    if profile_top:
        row["kernels"] = kernel_table(step, profile_top)
    model = opt = forward = None  # frees them (a del would confuse pyflakes over the closures above)
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="130m")
    parser.add_argument("--layers", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    parser.add_argument("--paths", nargs="+", default=["fused", "unfused", "recompute", "fused+compile"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="append the JSON lines to this file as well")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N kernels with the most GPU time per step (torch.profiler)")
    parser.add_argument("--scan-variant", default=None,
                        help="the Mamba-1 scan's backward variant (scan_policy.BWD_VARIANTS; default: the policy's)")
    args = parser.parse_args()
    if args.scan_variant:
        from mambakit.ops.selective_scan import scan_policy

        scan_policy.DEFAULT_CONFIG = scan_policy.bwd_variant_config(args.scan_variant)
    try:  # imported, not only found: a mamba_ssm built for another CUDA fails here
        importlib.import_module("mamba_ssm")
        peers = ["mamba_ssm"]
    except ImportError:
        peers = []
        print(json.dumps({"note": "mamba_ssm is not importable here: not timed"}))
    import triton

    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      "date": datetime.date.today().isoformat(), "scan_variant": args.scan_variant or "default"}))
    for layer in args.layers:
        for path in peers + args.paths:
            row = run_case(layer, args.shape, path, args.batch, args.seqlen, args.steps, args.warmup, args.profile)
            kernels = row.pop("kernels", [])
            line = json.dumps(row)
            print(line, flush=True)
            for k in kernels:
                print(f"  {k['ms_per_step']:8.3f} ms  x{k['launches_per_step']:<4d} {100 * k['share']:5.1f}%  {k['kernel']}",
                      flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
