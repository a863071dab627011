"""CPU benchmark of the Mamba-2 SSD: mambakit's "torch" backend against transformers' pure-PyTorch SSD.

Shapes (legend): b batch, l seqlen, h nheads, p headdim, n dstate, g ngroups.

Rows (one process, interleaved rounds, medians):
    op, train shape (default b 8, l 512, h 8, p 64, n 128, g 1: the small LM's layer, d_model 256 x expand 2)
        mambakit ssd(backend="torch") for each --chunk-sizes, fwd (no grad) and fwd+bwd
        transformers mamba2_chunk_scan (its torch fallback, chunk 256), fwd and fwd+bwd
    op, prefill shape (default b 1, l 512, h 24: one layer of the 130M model, d_model 768 x expand 2), no grad
    mixer (--mixer): transformers' whole Mamba2Mixer (in_proj, conv, SSD, gated RMSNorm, out_proj) against the
        same module with only its SSD call replaced by mambakit's op (same weights, outputs compared)

Every variant gets D per head, dt_bias and softplus, as a Mamba-2 layer calls it. The "saved" column sums
the bytes autograd keeps for the backward. transformers' SSD materialises (b, chunks, T, T, h, n)
products: at the train shape its fwd+bwd takes tens of seconds and ~10 GB, hence its own --hf-repeats.

    python benchmarks/cpu_ssd.py
    python benchmarks/cpu_ssd.py --chunk-sizes 32,64,128,256 --repeats 9 --threads 1
    python benchmarks/cpu_ssd.py --mixer --no-transformers-train
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from collections.abc import Callable

import torch

from cpu_timing import forward_backward, forward_only, saved_bytes, time_interleaved

from mambakit.ops import ssd


def make_inputs(b: int, l: int, h: int, p: int, n: int, g: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs in Mamba-2's regime: A = -(1..h) / 2, dt' about 0.001-0.1 after softplus, D = 1."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, l, h, p, generator=gen),
        dt=torch.randn(b, l, h, generator=gen) - 3.0,
        A=-torch.arange(1, h + 1, dtype=torch.float32) / 2,
        B=torch.randn(b, l, g, n, generator=gen),
        C=torch.randn(b, l, g, n, generator=gen),
        D=torch.ones(h),
        dt_bias=0.5 * torch.randn(h, generator=gen),
    )


def mambakit_op(inp: dict[str, torch.Tensor], chunk_size: int) -> Callable[[], torch.Tensor]:
    return lambda: ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"], dt_bias=inp["dt_bias"],
                       dt_softplus=True, chunk_size=chunk_size, backend="torch")


def transformers_op(inp: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return lambda: mamba2_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=256, D=inp["D"],
                                     dt_bias=inp["dt_bias"], dt_softplus=True)


# ---- the whole mixer -------------------------------------------------------------------------------------

def hf_mixer(d_model: int, headdim: int, dstate: int, ngroups: int, seed: int = 0):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(seed)
    cfg = Mamba2Config(hidden_size=d_model, expand=2, head_dim=headdim, num_heads=2 * d_model // headdim,
                       state_size=dstate, n_groups=ngroups, chunk_size=256, num_hidden_layers=1, vocab_size=256)
    return Mamba2Mixer(cfg, layer_idx=0)


def mixer_with_mambakit_ssd(m, chunk_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' Mamba2Mixer.forward (no cache) with its SSD call replaced by mambakit's op; same weights."""
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        b, l, _ = hidden.shape
        gate, xBC, dt = m.in_proj(hidden).split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        xBC = m.act(m.conv1d(xBC.transpose(1, 2))[..., :l].transpose(1, 2))
        gn = m.n_groups * m.ssm_state_size
        x, B, C = xBC.split([m.intermediate_size, gn, gn], dim=-1)
        y = ssd(x.view(b, l, m.num_heads, m.head_dim), dt, -torch.exp(m.A_log.float()),
                B.view(b, l, m.n_groups, -1), C.view(b, l, m.n_groups, -1), D=m.D, dt_bias=m.dt_bias,
                dt_softplus=True, dt_limit=m.time_step_limit, chunk_size=chunk_size, backend="torch")
        return m.out_proj(m.norm(y.reshape(b, l, -1), gate))
    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nheads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--prefill-batch", type=int, default=1)
    ap.add_argument("--prefill-seqlen", type=int, default=512)
    ap.add_argument("--prefill-nheads", type=int, default=24)
    ap.add_argument("--prefill-layers", type=int, default=24, help="layers of the model the prefill row scales to")
    ap.add_argument("--chunk-sizes", default="32,64,128,256", help="mambakit chunk sizes to time")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--hf-repeats", type=int, default=3, help="rounds of transformers' (slow) variants")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-transformers", action="store_true", help="skip every transformers row")
    ap.add_argument("--no-transformers-train", action="store_true", help="skip transformers' fwd+bwd rows")
    ap.add_argument("--mixer", action="store_true", help="also time the whole Mamba2Mixer")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    use_hf = not args.no_transformers
    use_hf_train = use_hf and not args.no_transformers_train

    b, l, h, p, n, g = args.batch, args.seqlen, args.nheads, args.headdim, args.dstate, args.ngroups
    train = make_inputs(b, l, h, p, n, g)
    for t in train.values():
        t.requires_grad_(True)
    grad_out = torch.randn(b, l, h, p)
    variants: dict[str, Callable[[], None]] = {}
    saved: dict[str, int] = {}
    slow: dict[str, int] = {}
    for c in chunks:
        variants[f"mambakit chunk {c} fwd"] = forward_only(mambakit_op(train, c))
        variants[f"mambakit chunk {c} fwd+bwd"] = forward_backward(mambakit_op(train, c), grad_out)
        saved[f"mambakit chunk {c} fwd+bwd"] = saved_bytes(mambakit_op(train, c))
    agree = {}
    if use_hf:
        with torch.no_grad():
            ref = transformers_op(train)()
            agree["train"] = float((mambakit_op(train, chunks[0])() - ref).abs().max() / ref.abs().max())
        variants["transformers fwd"] = forward_only(transformers_op(train))
        slow["transformers fwd"] = args.hf_repeats
    if use_hf_train:
        variants["transformers fwd+bwd"] = forward_backward(transformers_op(train), grad_out)
        slow["transformers fwd+bwd"] = args.hf_repeats
        saved["transformers fwd+bwd"] = saved_bytes(transformers_op(train))
    train_times = time_interleaved(variants, args.repeats, args.warmup, slow)

    pb, pl, ph = args.prefill_batch, args.prefill_seqlen, args.prefill_nheads
    prefill = make_inputs(pb, pl, ph, p, n, g, seed=1)
    pre_variants = {f"mambakit chunk {c} fwd": forward_only(mambakit_op(prefill, c)) for c in chunks}
    if use_hf:
        with torch.no_grad():
            ref = transformers_op(prefill)()
            agree["prefill"] = float((mambakit_op(prefill, chunks[0])() - ref).abs().max() / ref.abs().max())
        pre_variants["transformers fwd"] = forward_only(transformers_op(prefill))
    prefill_times = time_interleaved(pre_variants, args.repeats, args.warmup, {"transformers fwd": args.hf_repeats})

    mixer_times = {}
    if args.mixer:
        mixer_times = run_mixers(args, chunks, use_hf, use_hf_train, agree)

    print(f"# {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"{platform.processor() or platform.machine()}  cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# {args.repeats} interleaved rounds after {args.warmup} warm-up (transformers: {args.hf_repeats} rounds, "
          f"no warm-up); float32; D, dt_bias, softplus")
    if agree:
        print("# max |mambakit - transformers| / max |transformers|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    header = (f"| {'shape':<36} | {'variant':<30} | {'median ms':>9} | {'min ms':>9} | {'vs transformers':>15} "
              f"| {'saved MB':>8} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")

    def rows(shape: str, times: dict[str, list[float]], saved: dict[str, int]):
        for k, v in times.items():
            med = statistics.median(v) * 1e3
            peer = f"transformers {k.rsplit(' ', 1)[-1]}"
            ratio = f"{statistics.median(times[peer]) * 1e3 / med:.1f}x" if peer in times and peer != k else ""
            mb = f"{saved[k] / 2**20:.1f}" if k in saved else ""
            print(f"| {shape:<36} | {k:<30} | {med:>9.1f} | {min(v) * 1e3:>9.1f} | {ratio:>15} | {mb:>8} |")

    rows(f"op train b{b} l{l} h{h} p{p} n{n} g{g}", train_times, saved)
    rows(f"op prefill b{pb} l{pl} h{ph} p{p} n{n} g{g}", prefill_times, {})
    for shape, (times, mixer_saved) in mixer_times.items():
        rows(shape, times, mixer_saved)
    best = min(chunks, key=lambda c: statistics.median(prefill_times[f"mambakit chunk {c} fwd"]))
    per_layer = statistics.median(prefill_times[f"mambakit chunk {best} fwd"])
    print(f"\nbest chunk: train fwd+bwd "
          f"{min(chunks, key=lambda c: statistics.median(train_times[f'mambakit chunk {c} fwd+bwd']))}, "
          f"train fwd {min(chunks, key=lambda c: statistics.median(train_times[f'mambakit chunk {c} fwd']))}, "
          f"prefill {best}; prefill, {args.prefill_layers} layers of the SSD alone: "
          f"{per_layer * args.prefill_layers * 1e3:.0f} ms for {pl} tokens")


def run_mixers(args, chunks, use_hf, use_hf_train, agree) -> dict[str, tuple[dict[str, list[float]], dict[str, int]]]:
    """Whole Mamba2Mixer, train (fwd+bwd on the small LM's layer) and prefill (130M layer, no grad)."""
    out = {}
    d_train = args.nheads * args.headdim // 2
    d_pre = args.prefill_nheads * args.headdim // 2
    for label, d, b, l, grad in (("train", d_train, args.batch, args.seqlen, True),
                                 ("prefill", d_pre, args.prefill_batch, args.prefill_seqlen, False)):
        m = hf_mixer(d, args.headdim, args.dstate, args.ngroups)
        hidden = torch.randn(b, l, d)
        gout = torch.randn(b, l, d)
        ours = {c: mixer_with_mambakit_ssd(m, c) for c in chunks}
        with torch.no_grad():
            if use_hf:
                ref = m(hidden)
                agree[f"mixer {label}"] = float((ours[chunks[0]](hidden) - ref).abs().max() / ref.abs().max())

        def wrap(f):
            return (lambda: f(hidden).backward(gout)) if grad else forward_only(lambda: f(hidden))
        mode = "fwd+bwd" if grad else "fwd"
        variants = {f"mambakit chunk {c} {mode}": wrap(ours[c]) for c in chunks}
        saved = {f"mambakit chunk {c} {mode}": saved_bytes(lambda c=c: ours[c](hidden)) for c in chunks} if grad else {}
        slow = {}
        if use_hf and (use_hf_train or not grad):
            variants[f"transformers {mode}"] = wrap(m)
            slow[f"transformers {mode}"] = args.hf_repeats
            if grad:
                saved[f"transformers {mode}"] = saved_bytes(lambda: m(hidden))
        times = time_interleaved(variants, args.repeats, args.warmup, slow)
        out[f"mixer {label} b{b} l{l} d_model{d}"] = (times, saved)
    return out


if __name__ == "__main__":
    main()
