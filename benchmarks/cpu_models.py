"""Whole-model CPU benchmark, mambakit side by side with transformers and mambapy in one process.

Workloads (the ones in ../shared/ANCHORS.md):
    train    small LM (d_model 256, 4 layers, vocab 256), one AdamW step on batch 8 x 512, fp32
    prefill  130M shape (d_model 768, 24 layers, vocab 50280), forward over 512 tokens, batch 1
    decode   130M shape, greedy decoding after a 16-token prompt, ms per new token

Every model is randomly initialised with the same architecture on each side. Figures are medians.

    python benchmarks/cpu_models.py                      # everything (transformers Mamba-1 training takes minutes)
    python benchmarks/cpu_models.py --what train --skip hf-mamba1
    python benchmarks/cpu_models.py --what decode --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambakit import MambaConfig, MambaLM
from mambakit.generation import generate

SMALL = dict(d_model=256, n_layer=4, vocab=256, batch=8, seqlen=512)
BIG = dict(d_model=768, n_layer=24, vocab=50280)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the models ------------------------------------------------------------------------------------------


def mambakit_model(layer: str, d_model: int, n_layer: int, vocab: int, chunk_size: int | None) -> nn.Module:
    ssm_cfg = {"layer": layer}
    if layer == "Mamba2" and chunk_size:
        ssm_cfg["chunk_size"] = chunk_size
    return MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg))


def hf_model(layer: str, d_model: int, n_layer: int, vocab: int) -> nn.Module:
    import transformers

    if layer == "Mamba1":
        cfg = transformers.MambaConfig(hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=vocab, state_size=16,
                                       expand=2, conv_kernel=4, use_cache=False)
        return transformers.MambaForCausalLM(cfg)
    cfg = transformers.Mamba2Config(hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=vocab, state_size=128,
                                    head_dim=64, num_heads=2 * d_model // 64, n_groups=1, expand=2, chunk_size=256,
                                    use_cache=False)
    return transformers.Mamba2ForCausalLM(cfg)


class MambapyLM(nn.Module):
    """mambapy's Mamba-1 backbone (parallel scan) with an embedding, final norm and tied head."""

    def __init__(self, d_model: int, n_layer: int, vocab: int):
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig as PyConfig, RMSNorm

        self.embedding = nn.Embedding(vocab, d_model)
        self.mamba = Mamba(PyConfig(d_model=d_model, n_layers=n_layer, pscan=True))
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_f(self.mamba(self.embedding(ids))))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# ---- workloads -------------------------------------------------------------------------------------------


def bench_train(name: str, model: nn.Module, repeats: int) -> dict:
    s = SMALL
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seqlen"] + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        logits = logits_of(model, ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = median_time(step, repeats)
    tokens = s["batch"] * s["seqlen"]
    return {"model": name, "workload": "train step 8x512", "seconds": t, "rate": f"{tokens / t:,.0f} tok/s"}


def bench_prefill(name: str, model: nn.Module, repeats: int, seqlen: int = 512) -> dict:
    ids = torch.randint(0, BIG["vocab"] - 3, (1, seqlen))
    model.eval()
    with torch.no_grad():
        t = median_time(lambda: logits_of(model, ids), repeats)
    return {"model": name, "workload": f"prefill {seqlen} (all logits)", "seconds": t, "rate": f"{seqlen / t:,.0f} tok/s"}


def bench_decode(name: str, model: nn.Module, new_tokens: int, repeats: int) -> dict:
    prompt = torch.randint(0, BIG["vocab"] - 3, (1, 16))
    model.eval()
    if isinstance(model, MambaLM):
        def run(n):
            return generate(model, prompt, n)
    else:
        def run(n):
            with torch.no_grad():
                return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    # time of n new tokens minus time of 1 new token: excludes the prefill
    t_long = median_time(lambda: run(new_tokens + 1), repeats)
    t_short = median_time(lambda: run(1), repeats)
    per = (t_long - t_short) / new_tokens
    return {"model": name, "workload": "greedy decode (16-token prompt)", "seconds": per,
            "rate": f"{per * 1e3:.2f} ms/token"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["train", "prefill", "decode", "all"], default="all")
    parser.add_argument("--skip", nargs="*", default=[], help="model names to leave out (e.g. hf-mamba1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=None, help="mambakit Mamba-2 chunk size (default: config's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32")
    rows = []
    if args.what in ("train", "all"):
        s = SMALL
        makers = {
            "mambakit-mamba1": lambda: mambakit_model("Mamba1", s["d_model"], s["n_layer"], s["vocab"], None),
            "mambakit-mamba2": lambda: mambakit_model("Mamba2", s["d_model"], s["n_layer"], s["vocab"], args.chunk_size),
            "mambapy-mamba1": lambda: MambapyLM(s["d_model"], s["n_layer"], s["vocab"]),
            "hf-mamba1": lambda: hf_model("Mamba1", s["d_model"], s["n_layer"], s["vocab"]),
            "hf-mamba2": lambda: hf_model("Mamba2", s["d_model"], s["n_layer"], s["vocab"]),
        }
        for name, make in makers.items():
            if name not in args.skip:
                reps = 1 if name.startswith("hf-") else args.repeats  # transformers without mamba_ssm: minutes a step
                rows.append(bench_train(name, make(), reps))
                print(rows[-1], flush=True)
    big = {
        "mambakit-mamba1": lambda: mambakit_model("Mamba1", BIG["d_model"], BIG["n_layer"], BIG["vocab"], None),
        "mambakit-mamba2": lambda: mambakit_model("Mamba2", BIG["d_model"], BIG["n_layer"], BIG["vocab"],
                                                  args.chunk_size),
        "hf-mamba1": lambda: hf_model("Mamba1", BIG["d_model"], BIG["n_layer"], BIG["vocab"]),
        "hf-mamba2": lambda: hf_model("Mamba2", BIG["d_model"], BIG["n_layer"], BIG["vocab"]),
    }
    for name, make in big.items():
        if name in args.skip or args.what not in ("prefill", "decode", "all"):
            continue
        model = make()
        reps = 1 if name.startswith("hf-") else args.repeats
        if args.what in ("prefill", "all"):
            rows.append(bench_prefill(name, model, reps))
            print(rows[-1], flush=True)
        if args.what in ("decode", "all"):
            rows.append(bench_decode(name, model, args.new_tokens, reps))
            print(rows[-1], flush=True)
        del model
    print("\n| model | workload | seconds (median) | rate |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['workload']} | {r['seconds']:.4f} | {r['rate']} |")


if __name__ == "__main__":
    main()
