"""The language-model loss alone on the GPU: `ops.linear_cross_entropy` (torch and Triton backends) against the plain
head + `F.cross_entropy` of the whole logits matrix, forward + backward, time and peak memory.

The 130M training step's head by default: 8 x 2048 rows, d_model 768, the padded vocabulary 50280 (50277 scored),
bf16 autocast over float32 weights, as `mambakit train` runs it. Each path's loss and both gradients are first
checked against the plain path's (relative error printed); then `triton.testing.do_bench` medians and
`torch.cuda.max_memory_allocated` above the inputs. One JSON line per path.

    python benchmarks/gpu_cross_entropy.py
    python benchmarks/gpu_cross_entropy.py --rows 4096 --vocab 128256 --d-model 2048
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8 * 2048)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50277, help="scored columns")
    parser.add_argument("--padded-vocab", type=int, default=50280, help="the head's rows")
    args = parser.parse_args()
    import triton
    from triton.testing import do_bench

    from mambakit.ops import linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(args.rows, args.d_model, device="cuda", generator=gen).requires_grad_()
    weight = (torch.randn(args.padded_vocab, args.d_model, device="cuda", generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda", generator=gen)

    def plain():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = F.linear(hidden, weight)[:, :args.vocab]
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def chunked(backend):
        def fn():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return linear_cross_entropy(hidden, weight, targets, vocab_size=args.vocab, backend=backend)
        return fn

    def fwd_bwd(fn):
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    paths = {"plain": plain, "torch": chunked("torch"), "triton": chunked("triton")}
    ref = [t.clone() for t in fwd_bwd(plain)]
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                      "rows": args.rows, "d_model": args.d_model, "vocab": args.vocab,
                      "padded_vocab": args.padded_vocab}))
    for name, fn in paths.items():
        got = fwd_bwd(fn)
        err = {k: float((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-30))
               for k, a, e in zip(("loss", "dhidden", "dweight"), got, ref)}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(lambda: fwd_bwd(fn), warmup=5, rep=50)
        print(json.dumps({"path": name, "ms": round(ms, 3), "peak_gb_above_inputs": round(peak / 1e9, 3),
                          "rel_err_vs_plain": {k: f"{v:.2e}" for k, v in err.items()}}))


if __name__ == "__main__":
    main()
