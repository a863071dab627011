"""Static sm_90 SASS of the selective scan's backward kernel, compiled on the CPU (no GPU needed).

Compiles `scan_bwd_kernel` for an H100 / H200 (Triton's bundled ptxas, sm_90) at the benchmark shape's
specialisation (bf16 x / dt / z / dy, float32 B / C copies, softplus, z, D, dt_bias, time-segmented, 32-bit
offsets; pointers and strides divisible by 16 as the JIT would mark them; the launcher's register cap,
`ScanConfig.bwd_maxnreg`) for each backward variant and prints
registers, spills and the instruction count of each loop body (pass A and pass B per micro-block of U steps), per
step and per state element (warp-instructions / (NL * NH * BD) per warp-step).

    python benchmarks/scan_bwd_sass.py                        # the variants of --bwd-variants
    python benchmarks/scan_bwd_sass.py --dump wide16 > w.sass # one variant's SASS
    python benchmarks/scan_bwd_sass.py --chunked              # the chunked backward at three tiles

Static counts are not timings: they say where instructions go, not how fast it runs. Session 32 cut v1 from 93.2 to
66.0 per state element (a per-(step, channel) stash loop before pass A, a 128-register cap) and the H100 then timed
that kernel 4-6% slower (BENCHMARKS.md, session 33): time every change on a GPU before keeping it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
import triton.language as tl  # noqa: E402

from mambakit.ops.selective_scan.scan_policy import (  # noqa: E402
    BWD_VARIANTS,
    CHUNKED_CHANNELS,
    DEFAULT_CHECKPOINT_INTERVAL,
    ScanConfig,
    bwd_replicas,
    bwd_variant_config,
    chunked_bwd_rows,
    chunked_bwd_transposed,
    pick_tiles,
    variant_params,
)
from mambakit.ops.selective_scan.triton_scan_bwd import scan_bwd_kernel  # noqa: E402

PTRS_BF16 = {"x_ptr", "dt_ptr", "z_ptr", "dy_ptr", "dx_ptr", "ddt_ptr", "dz_ptr"}
PTRS_I32 = {"seq_ptr"}


# the specialisations `--specialisations` compiles besides the benchmark's (flags of the kernel; "float64": float64
# inputs and tiles, NL 2 as the launcher picks; "U": the micro-block)
SPECIALISATIONS = {
    "benchmark": {},
    "seq_idx, dstate 13": dict(HAS_SEQ=True, EVEN_N=False),
    "no z, no softplus, 64-bit offsets": dict(HAS_Z=False, SOFTPLUS=False, I64=True),
    "no D / bias, dh_last, dh0, one segment": dict(HAS_D=False, HAS_BIAS=False, HAS_DHLAST=True, WANT_DH0=True,
                                                   SEGMENTED=False),
    "U = 4": dict(U=4),
    "pass A prefetch 16 steps": dict(PREFETCH=16),
    "float64": dict(float64=True),
}


def compile_variant(name: str, dstate: int = 16, group_size: int = 4096, seg: bool = True, **flags):
    """Compile `scan_bwd_kernel` for sm_90 at the benchmark's specialisation, with `flags` overriding kernel
    constexprs (and float64=True for float64 inputs). -> (compiled kernel, tiles, U)."""
    fn = scan_bwd_kernel.fn if hasattr(scan_bwd_kernel, "fn") else scan_bwd_kernel
    p = variant_params(name)
    f64 = flags.pop("float64", False)
    if not flags.get("EVEN_N", True):
        dstate = 13
    tiles = pick_tiles(p["nl"] or (2 if f64 else 4), dstate, group_size, p["channels"])
    red_ch = min(p["reduce_channels"] or 4, tiles.BD)
    # the launcher's choices at this shape: its replica count and its default checkpoint interval
    const = dict(NREP=bwd_replicas(group_size, red_ch, ScanConfig()), RED_CH=red_ch,
                 CHUNK=p["interval"] or DEFAULT_CHECKPOINT_INTERVAL,
                 U=p["block_u"] or 2, NL=tiles.NL, NH=tiles.NH, BD=tiles.BD, ACC=tl.float64 if f64 else tl.float32,
                 HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ=False, HAS_DHLAST=False,
                 WANT_DH0=False, EVEN_N=True, LIBDEVICE=True, I64=False, SEGMENTED=seg, ROWS=p["rows"],
                 DZ_AT=0, PREFETCH=0)
    const.update(flags)
    u = const["U"]
    undivisible = {"seqlen", "nchunks", "nseg", "cin_n", "cin_k", "seg_len", "s_Ad", "s_st"}  # s_An: folded to 1

    def ptr_type(a: str) -> str:
        return "*i32" if a in PTRS_I32 else "*fp64" if f64 else "*bf16" if a in PTRS_BF16 else "*fp32"

    # the launcher's register cap, if any
    k = compile_sm90(fn, const, ptr_type, undivisible, tiles.num_warps, bwd_variant_config(name).bwd_maxnreg)
    return k, tiles, u


def compile_sm90(fn, const: dict, ptr_type, undivisible: set[str], num_warps: int, maxnreg: int | None = None,
                 folded_ones: tuple[str, ...] = ("s_An",)):
    """Compile the Triton kernel `fn` for sm_90 (Triton's bundled ptxas, no GPU) as the JIT would specialise it:
    the `const` constexprs, each pointer typed by ptr_type(name) and marked 16-byte aligned, every other argument an
    i32 marked divisible by 16 unless named in `undivisible`, and the strides in `folded_ones` equal to 1 (the JIT
    folds those). -> the compiled kernel (its .asm["sass"], .asm["cubin"])."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in const or a in folded_ones:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = ptr_type(a)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[a] = "i32"
            if a not in undivisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=dict(const, **{a: 1 for a in folded_ones}), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg})})


def compile_chunked(bd: int, interval: int, rows: int, red_ch: int, warps: int = 1, maxnreg: int | None = None,
                    transposed: bool = False):
    """Compile `scan_bwd_chunked_kernel` (the "chunked" variants) for sm_90 at the benchmark's specialisation: bd
    channels, checkpoint intervals of `interval` steps walked `rows` steps at a time (dB / dC summed transposed)."""
    from mambakit.ops.selective_scan.triton_scan_bwd_chunked import scan_bwd_chunked_kernel

    fn = scan_bwd_chunked_kernel.fn if hasattr(scan_bwd_chunked_kernel, "fn") else scan_bwd_chunked_kernel
    const = dict(S_BT=16, NREP=4, RED_CH=red_ch, CHUNK=interval, SUB=rows, BD=bd, ACC=tl.float32, HAS_D=True, HAS_Z=True, HAS_BIAS=True,
                 SOFTPLUS=True, HAS_SEQ=False, HAS_DHLAST=False, WANT_DH0=False, LIBDEVICE=True, I64=False,
                 SEGMENTED=True, DZ_AT=0, TRANSPOSED=transposed, EVEN_T=True)
    ptr_type = lambda a: "*i32" if a in PTRS_I32 else "*bf16" if a in PTRS_BF16 else "*fp32"  # noqa: E731
    return compile_sm90(fn, const, ptr_type, {"seqlen", "dstate", "nchunks", "nseg", "cin_n", "cin_k", "seg_len", "s_Ad",
                                              "s_st"}, warps, maxnreg)


def cuobjdump(k, flag: str) -> str:
    """`cuobjdump FLAG` (Triton's bundled copy) of the compiled kernel's cubin."""
    tool = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def backward_loops(sass: str) -> tuple[list[str], list[str], list[str]]:
    """The opcodes of the chunked backward's state loop over a whole block, of the loop over the blocks in reverse as
    it runs for a whole block (less the state loop of a ragged last block), and of the forward pass's block loop
    before them (empty if none). In cuobjdump's SASS a loop is a branch back to an earlier address; the block loop is
    the innermost loop around the last loop of more than 64 instructions nested in another, and its state loops are
    the loops of more than 64 instructions inside it: the shortest is the whole block's (its B / C at constant
    offsets), any other the ragged block's."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)([^;]*);", sass)
    index = {int(a, 16): i for i, (a, _, _) in enumerate(lines)}
    spans = []
    for i, (a, op, rest) in enumerate(lines):
        m = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if m and index.get(int(m.group(1), 16), i) < i:
            spans.append((index[int(m.group(1), 16)], i))
    inside = lambda a, b: a != b and b[0] <= a[0] and a[1] <= b[1]  # noqa: E731
    nested = [se for se in spans if se[1] - se[0] > 64 and any(inside(se, o) for o in spans)]
    last = max(nested, key=lambda se: se[0])
    block = min((o for o in spans if inside(last, o)), key=lambda se: se[1] - se[0])
    states = [se for se in nested if inside(se, block)]
    state = min(states, key=lambda se: se[1] - se[0])
    # the forward pass's block loop (its state loop inside), if the kernel has one: the largest nested loop before
    fwd = [se for se in nested if se[1] < block[0]]
    ops = lambda se: [o for _, o, _ in lines[se[0]:se[1] + 1]]  # noqa: E731
    ragged = {i for se in states if se != state for i in range(se[0], se[1] + 1)}
    whole_block = [o for i, (_, o, _) in enumerate(lines[block[0]:block[1] + 1], block[0]) if i not in ragged]
    return ops(state), whole_block, ops(max(fwd, key=lambda se: se[1] - se[0])) if fwd else []


def resources(k) -> tuple[int, int]:
    """(registers per thread, stack bytes: spills) from the cubin."""
    out = cuobjdump(k, "-res-usage")
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def inner_loops(sass: str) -> list[tuple[int, int]]:
    """(first, last) instruction index of every innermost loop (a label with a later branch back to it)."""
    labels, spans, count = {}, [], 0
    for ln in sass.splitlines():
        ln = ln.strip()
        m = re.match(r"^(LBB\d+):", ln)
        if m:
            labels[m.group(1)] = count
        elif re.match(r"^[-0-9a-f]{2}:", ln):
            b = re.search(r"BRA (LBB\d+);", ln)
            if b and b.group(1) in labels:
                spans.append((labels[b.group(1)], count))
            count += 1
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def body_stats(sass: str, span: tuple[int, int]) -> dict[str, int]:
    ins = [ln.strip() for ln in sass.splitlines() if re.match(r"^[-0-9a-f]{2}:", ln.strip())][span[0]:span[1] + 1]
    ops = [re.split(r"\s+", re.sub(r"^\S+\s+(@!?U?P\w+\s+)?", "", i))[0] for i in ins]
    pick = lambda *names: sum(1 for o in ops if o.split(".")[0] in names)  # noqa: E731
    return dict(n=len(ins), mufu=pick("MUFU"), shfl=pick("SHFL"), smem=pick("STS", "LDS", "LDSM", "BAR"),
                local=pick("LDL", "STL"), atom=pick("RED", "REDG", "ATOM", "ATOMG"),
                fp=pick("FFMA", "FMUL", "FADD", "FSEL", "FMNMX", "FSETP"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(BWD_VARIANTS))
    ap.add_argument("--dump", default=None, help="print this variant's SASS and exit")
    ap.add_argument("--specialisations", action="store_true",
                    help="compile the default variant (v1) at other specialisations too (SPECIALISATIONS): registers, "
                         "spills; a kernel that fails to compile for sm_90 fails here, without a GPU")
    ap.add_argument("--chunked", action="store_true",
                    help="compile the chunked backward at three tiles: registers, spills, instructions per element")
    args = ap.parse_args()
    if args.chunked:
        # the state loop of the blocks in reverse is the kernel's last loop of more than 64 instructions with an outer
        # loop around it (the blocks); per state element: its instructions over the block's steps, plus the rest of
        # the block loop over the block's steps x 16 states
        print("| variant | interval / block | regs | spill stack B | state loop (SASS instr) | per state element: "
              "state loop + the rest of the block loop + the forward pass | in the state loop per element: SHFL / FP / "
              "LDG / atomics / local |")
        print("|---|---|---|---|---|---|---|")
        for name in [v for v in BWD_VARIANTS if variant_params(v).get("chunked")]:
            cfg = bwd_variant_config(name)
            iv, sub = cfg.checkpoint_interval, chunked_bwd_rows(cfg)
            k = compile_chunked(CHUNKED_CHANNELS, iv, sub, cfg.bwd_reduce_channels or CHUNKED_CHANNELS,
                                maxnreg=cfg.bwd_maxnreg,
                                transposed=chunked_bwd_transposed(cfg, CHUNKED_CHANNELS, sub))
            regs, stack = resources(k)
            state, block, fwd = backward_loops(cuobjdump(k, "-sass"))
            # the forward pass walks all blocks of an interval but the last, sub x 16 elements each
            fwd_per = len(fwd) / (sub * 16) * (iv // sub - 1) / (iv // sub)
            pick = lambda *ops: sum(1 for o in state if o in ops) / sub  # noqa: E731
            total = len(state) / sub + (len(block) - len(state)) / (sub * 16) + fwd_per
            print(f"| {name} | {iv} / {sub} | {regs} | {stack} | {len(state)} | {len(state) / sub:.1f} + "
                  f"{(len(block) - len(state)) / (sub * 16):.1f} + {fwd_per:.1f} = {total:.1f} | {pick('SHFL'):.1f} / "
                  f"{pick('FFMA', 'FMUL', 'FADD', 'FSEL', 'FSETP', 'FMNMX'):.1f} / {pick('LDG'):.1f} / "
                  f"{pick('RED', 'REDG', 'ATOM', 'ATOMG'):.1f} / {pick('LDL', 'STL'):.1f} |", flush=True)
        return 0
    if args.specialisations:
        print("| v1 specialisation | regs | spill stack B |")
        print("|---|---|---|")
        for label, flags in SPECIALISATIONS.items():
            k, _, _ = compile_variant("v1", **flags)
            regs, stack = resources(k)
            print(f"| {label} | {regs} | {stack} |")
        return 0
    if args.dump:
        k, _, _ = compile_variant(args.dump)
        print(k.asm["sass"])
        return 0
    print("| variant | NL x NH x BD | U | regs | spill stack B | pass A / pass B loop (SASS instr) | "
          "per step | per state element | in pass B per step: MUFU / FP / SHFL / smem / local / atomics |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        k, t, u = compile_variant(name)
        sass = k.asm["sass"]
        regs, stack = resources(k)
        loops = inner_loops(sass)  # in program order: pass A, pass B (then the epilogue's, if any)
        if len(loops) < 2:
            print(f"| {name} | {t.NL} x {t.NH} x {t.BD} | {u} | {regs} | {stack} | loops not found: {loops} |")
            continue
        a, b = (body_stats(sass, s) for s in loops[:2])
        per_step = (a["n"] + b["n"]) / u
        elems = t.NL * t.NH * t.BD / (32 * t.num_warps)  # state elements per thread per step
        mix = " / ".join(f"{b[key] / u:.0f}" for key in ("mufu", "fp", "shfl", "smem", "local", "atom"))
        print(f"| {name} | {t.NL} x {t.NH} x {t.BD} | {u} | {regs} | {stack} | {a['n']} / {b['n']} | "
              f"{per_step:.0f} | {per_step / elems:.1f} | {mix} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
