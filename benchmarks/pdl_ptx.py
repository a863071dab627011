"""Static check of the decode kernels' programmatic dependent launch (PDL), compiled for sm_90 on the CPU.

Each decode kernel that launches with PDL (`ops.common.pdl_launch`) may run while the kernel before it in the
stream is still writing, until it executes `griddepcontrol.wait` (`triton_math.pdl_enter`). Before that
instruction a kernel may only read weights: a store, or a read of an activation or a state, would race with the
previous kernel. This script records the launches of every decode kernel at the 130M shapes on meta tensors (no
GPU, no data), compiles each with PDL on for an H100 / H200 (Triton's bundled ptxas), and reads the PTX and the
SASS: how many global loads, L2 prefetches and stores come before the wait, and whether the kernel releases the
next one (`griddepcontrol.launch_dependents`) after it.

    python benchmarks/pdl_ptx.py            # table; exit 1 when a kernel stores before its wait, reads more than
                                            # its weights there, or lacks the wait or the release

The expected reads before the wait are each kernel's weights: the few-rows projection kernel loads its whole
weight slice there (EARLY_LOADS), the norm its norm weight, the many-rows kernels only ask the L2 for theirs
(prefetch), the others nothing. A slow CI test runs it (tests/ops/test_pdl.py).
"""

from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from mambakit.ops import triton_launch  # noqa: E402
from mambakit.ops.causal_conv1d.triton_conv import _causal_conv1d_update  # noqa: E402
from mambakit.ops.mamba_inner.triton_mamba1_step import mamba1_step_triton  # noqa: E402
from mambakit.ops.norm_linear.triton_gemv import linear_rows_triton  # noqa: E402
from mambakit.ops.norm_linear.triton_norm_linear import norm_linear_triton  # noqa: E402
from mambakit.ops.norm_linear.triton_rows_matmul import rows_matmul  # noqa: E402
from mambakit.ops.rms_norm.triton_norm import _add_rms_norm_impl  # noqa: E402
from mambakit.ops.selective_scan.triton_step import selective_state_update_triton  # noqa: E402
from mambakit.ops.ssd.triton_step import ssd_state_update_triton  # noqa: E402

from ssd_sass import compile_launch  # noqa: E402  (benchmarks/)

# kernel -> what it may read before its wait: "loads" (its weights into registers), "prefetch" (its weights
# into the L2 only), "none"
EARLY = {"_norm_gemv_kernel": "loads", "_add_rms_norm_fwd_kernel": "loads", "_rows_matmul_kernel": "prefetch",
         "_in_proj_conv_kernel": "prefetch", "_state_update_kernel": "none", "_ssd_step_kernel": "none",
         "_causal_conv1d_update_kernel": "none"}


def record_decode_launches(dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, object, tuple, dict]]:
    """[(case, JITFunction, args, kwargs)]: one launch of every decode kernel at the 130M shapes, PDL forced on."""
    launches: list[tuple[str, object, tuple, dict]] = []
    case = [""]

    def record(self, grid, args, kwargs):
        launches.append((case[0], self.fn, args, dict(kwargs, PDL=True, launch_pdl=True)))

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    d_model, d_inner, rank, n, width = 768, 1536, 48, 16, 4
    saved = triton_launch.FastLaunchKernel.launch
    triton_launch.FastLaunchKernel.launch = record
    try:
        case[0] = "mamba1 batch 1: add + norm + in_proj + conv"
        norm_linear_triton(t(1, d_model), t(2 * d_inner, d_model), t(d_model), residual=t(1, d_model, dt=torch.float32),
                           residual_dtype=torch.float32, conv_state=t(1, d_inner, width - 1),
                           conv_weight=t(d_inner, width), conv_bias=t(d_inner))
        case[0] = "mamba1 batch 1: x_proj"
        linear_rows_triton(t(1, d_inner), t(rank + 2 * n, d_inner))
        case[0] = "mamba1 batch 1: dt_proj + state update"
        selective_state_update_triton(t(1, d_inner, n, dt=torch.float32), t(1, d_inner), t(1, rank),
                                      t(d_inner, n, dt=torch.float32), t(1, 1, n), t(1, 1, n),
                                      D=t(d_inner, dt=torch.float32), z=t(1, d_inner),
                                      dt_bias=t(d_inner, dt=torch.float32), dt_softplus=True,
                                      dt_proj_weight=t(d_inner, rank))
        case[0] = "mamba1 batch 16: mamba1_step"
        mamba1_step_triton(t(16, d_model), t(2 * d_inner, d_model), None, t(16, d_inner, width - 1),
                           t(d_inner, width), t(d_inner), t(rank + 2 * n, d_inner), None, t(d_inner, rank),
                           t(d_inner, dt=torch.float32), t(d_inner, n, dt=torch.float32), t(d_inner, dt=torch.float32),
                           t(16, d_inner, n, dt=torch.float32))
        case[0] = "batch 64: block norm"
        _add_rms_norm_impl(t(64, d_model), t(64, d_model, dt=torch.float32), t(d_model), 1e-5, torch.float32, dtype,
                           False)
        case[0] = "batch 64: in_proj (many-rows kernel)"
        rows_matmul(t(64, d_model), t(2 * d_inner, d_model))
        case[0] = "batch 64: conv update"
        _causal_conv1d_update(t(64, d_inner, width - 1), t(64, d_inner), t(d_inner, width), t(d_inner), True)
        case[0] = "mamba2 batch 1: state update"
        ssd_state_update_triton(t(1, 24, 64, 128, dt=torch.float32), t(1, 24, 64), t(1, 24),
                                t(24, dt=torch.float32), t(1, 1, 128), t(1, 1, 128), D=t(24, dt=torch.float32),
                                z=t(1, 24, 64), dt_bias=t(24, dt=torch.float32), dt_softplus=True)
    finally:
        triton_launch.FastLaunchKernel.launch = saved
    return launches


def before_wait(text: str, wait: str, patterns: dict[str, str]) -> dict[str, int]:
    """Counts of each pattern in `text` before the first occurrence of `wait` (all of it if there is none)."""
    head = text.split(wait, 1)[0]
    return {name: len(re.findall(p, head)) for name, p in patterns.items()}


def check(launches) -> list[dict]:
    rows = []
    for case, fn, args, kwargs in launches:
        k = compile_launch(fn, args, kwargs)
        ptx, sass = k.asm["ptx"], k.asm["sass"]
        early = before_wait(ptx, "griddepcontrol.wait", {"ld": r"\bld\.global", "prefetch": r"\bprefetch\.global",
                                                        "st": r"\bst\.global|\bred\.global|\batom\.global"})
        # SASS: griddepcontrol.wait is ACQBULK, launch_dependents PREEXIT; ptxas must not move memory ops across
        sass_early = before_wait(sass, "ACQBULK", {"ld": r"\bLDG\b", "st": r"\bSTG\b|\bRED\b|\bATOM"})
        ptx_after = ptx.split("griddepcontrol.wait", 1)[-1]
        row = dict(case=case, kernel=fn.__name__, waits=ptx.count("griddepcontrol.wait"),
                   release=("griddepcontrol.launch_dependents" in ptx_after and "PREEXIT" in sass),
                   ld=max(early["ld"], sass_early["ld"]),
                   prefetch=early["prefetch"], st=early["st"] + sass_early["st"])
        rule = EARLY.get(fn.__name__)
        problems = []
        if row["waits"] != 1 or not row["release"]:
            problems.append("no wait + release")
        if row["st"]:
            problems.append("stores before the wait")
        if rule == "none" and (row["ld"] or row["prefetch"]):
            problems.append("reads before the wait")
        if rule == "prefetch" and (row["ld"] or not row["prefetch"]):
            problems.append("expected L2 prefetches only before the wait")
        if rule == "loads" and not row["ld"]:
            problems.append("expected its weights loaded before the wait")
        if rule is None:
            problems.append("kernel not in EARLY")
        row["ok"] = "; ".join(problems) or "ok"
        rows.append(row)
    return rows


def main() -> int:
    rows = check(record_decode_launches())
    print("| case | kernel | waits | releases after | ld.global before | prefetch before | stores before | check |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kernel']} | {r['waits']} | {r['release']} | {r['ld']} | {r['prefetch']} | "
              f"{r['st']} | {r['ok']} |")
    return 0 if all(r["ok"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
