"""CPU benchmark of the Mamba-1 selective scan: mambakit's "torch" backend against mambapy's parallel scan.

Shapes (legend): b batch, l seqlen, d dim (d_inner), n dstate.

Rows (same process, interleaved rounds, medians; no reference loop is timed):
    train shape (default b 8, l 512, d 512, n 16: the small LM's layer)
        mambakit  fwd (no grad) and fwd+bwd, plain math: y = <C, h> + D x, the same work as mambapy
        mambakit  fwd+bwd with everything a Mamba-1 layer uses: z gate, dt_bias, softplus
        mambapy   pscan: dA = exp(dt A), BX = dt x B, hs = pscan(dA, BX), y = hs C + D x; fwd and fwd+bwd
    prefill shape (default b 1, l 512, d 1536, n 16: one layer of the 130M model's 512-token prefill)
        mambakit  fwd (no grad), also scaled to the 24 layers of the model; mambapy fwd (no grad)

The "saved" column sums the bytes autograd keeps for the backward (torch.autograd.graph.saved_tensors_hooks).

    python benchmarks/cpu_selective_scan.py
    python benchmarks/cpu_selective_scan.py --repeats 11 --threads 1 --clock cpu
    python benchmarks/cpu_selective_scan.py --batch 4 --seqlen 2048 --checkpoint-interval 16 --no-mambapy
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from cpu_timing import forward_backward, forward_only, saved_bytes, time_interleaved

from mambakit.ops.selective_scan.torch_scan import default_checkpoint_interval, selective_scan_torch


def make_inputs(b: int, l: int, d: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs in Mamba-1's regime: S4D-real A = -(1..n), dt' around 0.01-0.1 after softplus."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, l, d, generator=g),
        dt=torch.randn(b, l, d, generator=g) - 3.0,  # raw dt: softplus(-3 + bias) ~ 0.05
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
        B=torch.randn(b, l, n, generator=g),
        C=torch.randn(b, l, n, generator=g),
        D=torch.ones(d),
        z=torch.randn(b, l, d, generator=g),
        dt_bias=0.1 * torch.randn(d, generator=g),
    )


def mambakit_plain(inp, interval):
    """The math mambapy computes: dt used as is, no gate."""
    dt = torch.nn.functional.softplus(inp["dt"].detach()).requires_grad_(inp["dt"].requires_grad)
    return lambda: selective_scan_torch(inp["x"], dt, inp["A"], inp["B"][:, :, None], inp["C"][:, :, None],
                                          inp["D"], checkpoint_interval=interval)


def mambakit_full(inp, interval):
    return lambda: selective_scan_torch(inp["x"], inp["dt"], inp["A"], inp["B"][:, :, None], inp["C"][:, :, None],
                                          inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True,
                                          checkpoint_interval=interval)


def mambapy_plain(inp):
    from mambapy.pscan import pscan

    dt = torch.nn.functional.softplus(inp["dt"].detach()).requires_grad_(inp["dt"].requires_grad)

    def run():
        x, A, B, C, D = inp["x"], inp["A"], inp["B"], inp["C"], inp["D"]
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (b, l, d, n)
        BX = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # (b, l, d, n)
        hs = pscan(dA, BX)
        return (hs @ C.unsqueeze(-1)).squeeze(3) + D * x

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--prefill-batch", type=int, default=1)
    ap.add_argument("--prefill-seqlen", type=int, default=512)
    ap.add_argument("--prefill-dim", type=int, default=1536)
    ap.add_argument("--prefill-layers", type=int, default=24, help="layers of the model the prefill row scales to")
    ap.add_argument("--checkpoint-interval", "--chunk-len", dest="checkpoint_interval", type=int, default=None,
                    help="steps between saved states (--chunk-len: its former name); default: "
                         "default_checkpoint_interval(batch, dim, dstate)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-mambapy", action="store_true", help="skip the mambapy rows")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (with --threads 1: steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes on the machine skew wall-clock times: print it
    use_mambapy = not args.no_mambapy and importlib.util.find_spec("mambapy") is not None

    b, l, d, n = args.batch, args.seqlen, args.dim, args.dstate
    train = make_inputs(b, l, d, n)
    for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"):
        train[k].requires_grad_(True)
    grad_out = torch.randn(b, l, d)
    ck = args.checkpoint_interval or default_checkpoint_interval(b, d, n)
    variants: dict[str, Callable[[], None]] = {}
    saved: dict[str, int] = {}
    variants["mambakit fwd"] = forward_only(mambakit_plain(train, ck))
    variants["mambakit fwd+bwd"] = forward_backward(mambakit_plain(train, ck), grad_out)
    variants["mambakit fwd+bwd, z+dt_bias+softplus"] = forward_backward(mambakit_full(train, ck), grad_out)
    saved["mambakit fwd+bwd"] = saved_bytes(mambakit_plain(train, ck))
    saved["mambakit fwd+bwd, z+dt_bias+softplus"] = saved_bytes(mambakit_full(train, ck))
    if use_mambapy:
        variants["mambapy pscan fwd"] = forward_only(mambapy_plain(train))
        variants["mambapy pscan fwd+bwd"] = forward_backward(mambapy_plain(train), grad_out)
        saved["mambapy pscan fwd+bwd"] = saved_bytes(mambapy_plain(train))
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    train_times = time_interleaved(variants, args.repeats, args.warmup, clock=clock)

    pb, pl, pd = args.prefill_batch, args.prefill_seqlen, args.prefill_dim
    prefill = make_inputs(pb, pl, pd, n, seed=1)
    pck = args.checkpoint_interval or default_checkpoint_interval(pb, pd, n)
    pre_variants = {"mambakit fwd": forward_only(mambakit_full(prefill, pck))}
    if use_mambapy:
        pre_variants["mambapy pscan fwd"] = forward_only(mambapy_plain(prefill))
    prefill_times = time_interleaved(pre_variants, args.repeats, args.warmup, clock=clock)

    print(f"# {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"{platform.processor() or platform.machine()}  cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# {args.clock} clock; {args.repeats} interleaved rounds after {args.warmup} warm-up; float32; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")
    header = (f"| {'shape':<38} | {'variant':<38} | {'median ms':>9} | {'min ms':>8} | {'vs mambapy':>10} "
              f"| {'saved MB':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")

    def rows(shape: str, times: dict[str, list[float]], peer_of: Callable[[str], str | None]):
        for k, v in times.items():
            med = statistics.median(v) * 1e3
            peer = peer_of(k)
            ratio = f"{statistics.median(times[peer]) * 1e3 / med:.2f}x" if peer in times and peer != k else ""
            mb = f"{saved[k] / 2**20:.1f}" if k in saved else ""
            print(f"| {shape:<38} | {k:<38} | {med:>9.1f} | {min(v) * 1e3:>8.1f} | {ratio:>10} | {mb:>8} |")

    def train_peer(k: str) -> str | None:
        return "mambapy pscan fwd+bwd" if "fwd+bwd" in k else "mambapy pscan fwd"

    rows(f"train b{b} l{l} d{d} n{n} (interval {ck})", train_times, train_peer)
    rows(f"prefill b{pb} l{pl} d{pd} n{n} (interval {pck})", prefill_times, lambda k: "mambapy pscan fwd")
    per_layer = statistics.median(prefill_times["mambakit fwd"])
    print(f"\nprefill, {args.prefill_layers} layers of the scan alone (z, dt_bias, softplus): "
          f"{per_layer * args.prefill_layers * 1e3:.0f} ms for {pl} tokens")


if __name__ == "__main__":
    main()
