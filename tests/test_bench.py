"""`mambakit bench`: every benchmark's --quick CPU run writes its JSON and PNG plots; floors and notes are sane.

The figures of a quick run are meaningless (tiny shapes on a shared CPU); these tests check what is written.
"""

from __future__ import annotations

import json

import pytest
import torch

from mambakit.bench.floors import Ceilings, attention_flops_and_bytes, scan_flops_and_bytes, ssd_flops_and_bytes
from mambakit.bench.kernels import peer_notes
from mambakit.cli.__main__ import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_quick(what: str, out, capsys) -> dict:
    assert main(["bench", what, "--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / (what + '.json')}" in printed
    result = json.loads((out / f"{what}.json").read_text(encoding="utf-8"))
    assert result["quick"] is True and result["command"].startswith(f"mambakit bench {what} --device=cpu --quick")
    assert {"device", "torch", "date", "run_seconds", "threads"} <= set(result)
    pngs = sorted(out.glob(f"{what}_*.png"))
    assert pngs, f"no PNG written for {what}"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
    return result


@pytest.mark.slow  # 15-35 s on 2 cores: out of the fast lane, CI runs it
def test_bench_kernels_quick_cpu_writes_json_and_png(tmp_path, capsys):
    result = _run_quick("kernels", tmp_path, capsys)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["kernels_floor.png", "kernels_memory.png",
                                                              "kernels_time.png"]
    rows = result["rows"]
    seqlens = result["shapes"]["seqlens"]
    for op in ("mamba1_scan", "mamba2_ssd"):
        for impl in ("mambakit", "sdpa"):
            got = sorted(r["seqlen"] for r in rows if r["op"] == op and r["impl"] == impl)
            assert got == seqlens, (op, impl, got)
        # the sequential reference only at the short lengths
        ref = sorted(r["seqlen"] for r in rows if r["op"] == op and r["impl"] == "reference")
        assert ref == [L for L in seqlens if L <= result["shapes"]["reference_max_len"]] and ref
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["saved_mb"] >= 0 and r["peak_mb"] is None
        assert r["fwd_floor_fraction"] == pytest.approx(r["fwd_floor_ms"] / r["fwd_ms"])
    assert result["ceilings"]["copy_gbps"] > 0 and result["ceilings"]["matmul_tflops"] > 0
    # every peer is either timed or named in a note, never silently absent
    impls = {r["impl"] for r in rows}
    for peer, note in peer_notes().items():
        assert (peer in impls) or any(n.startswith(f"{peer}") for n in result["notes"]), peer
        if note is not None:
            assert f"{peer}: {note}" in result["notes"]


@pytest.mark.slow
def test_bench_generate_quick_cpu_writes_json_and_png(tmp_path, capsys):
    result = _run_quick("generate", tmp_path, capsys)
    models = {r["model"] for r in result["rows"]}
    assert {"mamba1", "mamba2", "transformer"} <= models
    assert {r["batch"] for r in result["rows"] if r["model"] == "mamba2"} == set(result["settings"]["batches"])
    # the Transformer of the same size: within a factor 1.5 of the Mamba models' parameters
    params = result["params"]
    assert 1 / 1.5 < params["transformer"] / params["mamba1"] < 1.5
    for r in result["rows"]:
        assert r["tokens_per_s"] is None or r["tokens_per_s"] > 0


@pytest.mark.slow
def test_bench_train_quick_cpu_writes_json_and_png(tmp_path, capsys):
    result = _run_quick("train", tmp_path, capsys)
    assert {(r["model"], r["seqlen"]) for r in result["rows"]} == {
        (m, L) for m in ("mamba1", "mamba2", "transformer") for L in result["settings"]["seqlens"]}
    assert all(r["tokens_per_s"] > 0 and r["batch"] * r["seqlen"] >= 1 for r in result["rows"])


def test_bench_prefill_quick_cpu_writes_json_and_png(tmp_path, capsys):
    result = _run_quick("prefill", tmp_path, capsys)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["prefill_context.png"]
    contexts = result["settings"]["contexts"]
    assert {(r["model"], r["context"]) for r in result["rows"]} == {
        (m, c) for m in ("mamba1", "mamba2", "transformer") for c in contexts}
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["context"] / r["seconds"])
        assert r["peak_mb"] is None  # CPU: not tracked
    assert contexts[-1] > result["settings"]["tokens_per_call"]  # the long prompt goes through several calls


@pytest.mark.slow
def test_bench_quantize_quick_cpu_writes_json_and_png(tmp_path, capsys):
    result = _run_quick("quantize", tmp_path, capsys)
    variants = ["float32", "bfloat16", "int8", "bfloat16+int8"]
    assert [r["variant"] for r in result["quality"]] == variants
    base = result["quality"][0]
    assert base["bpb_change"] == 0.0 and base["argmax_agreement"] == 1.0 and base["greedy_match"] == 1.0
    for r in result["quality"][1:]:
        assert abs(r["bpb_change"]) < 0.05 and r["argmax_agreement"] > 0.8
    assert {(r["model"], r["variant"], r["step"]) for r in result["speed"]} == {
        (m, v, s) for m in ("mamba1", "mamba2") for v in variants for s in ("eager", "compiled")}
    assert all(r["ms_per_token"] >= 0 for r in result["speed"])  # (n+1 tokens) - (1 token): noise can floor it at 0


def test_floors_take_the_binding_ceiling():
    c = Ceilings(copy_gbps=100.0, matmul_tflops=1.0, dtype="float32")
    assert c.floor_ms(flops=1e9, nbytes=1e6) == pytest.approx(1.0)   # 1 GFLOP at 1 TFLOP/s
    assert c.floor_ms(flops=1.0, nbytes=1e9) == pytest.approx(10.0)  # 1 GB at 100 GB/s
    # forward+backward never costs less than the forward, for every op
    for fwd, fb, io_f, io_fb in (scan_flops_and_bytes(2, 64, 32, 16, 1, 2),
                                 ssd_flops_and_bytes(2, 64, 4, 16, 1, 32, 16, 2),
                                 attention_flops_and_bytes(2, 64, 4, 16, 2)):
        assert fb > fwd > 0 and io_fb > io_f > 0
    # SSD: doubling seqlen doubles the chunked work (linear in L); attention's quadruples
    assert ssd_flops_and_bytes(1, 128, 4, 16, 1, 32, 16, 2)[0] == 2 * ssd_flops_and_bytes(1, 64, 4, 16, 1, 32, 16, 2)[0]
    assert attention_flops_and_bytes(1, 128, 4, 16, 2)[0] == 4 * attention_flops_and_bytes(1, 64, 4, 16, 2)[0]


@pytest.mark.parametrize("argv, message", [
    pytest.param(["bench", "kernels", "--model", "x"], "--model is for `mambakit bench quantize`",
                 id="model-not-quantize"),
    pytest.param(["bench", "nope"], "argument BENCHMARK: invalid choice", id="unknown-benchmark"),
])
def test_bench_user_errors(capsys, argv, message):
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_bench_quantize_refuses_a_gpu_device(capsys):
    if torch.cuda.is_available():
        assert main(["bench", "quantize", "--device", "cuda", "--quick"]) == 2
        assert "quantize measures CPU decoding" in capsys.readouterr().err
    else:
        assert main(["bench", "quantize", "--device", "cuda", "--quick"]) == 2
        assert "mambakit bench: error:" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("what", [pytest.param("kernels", id="kernels"), pytest.param("generate", id="generate"),
                                  pytest.param("train", id="train")])
def test_bench_quick_cuda_writes_json_with_peak_memory(tmp_path, capsys, what):
    """On the GPU machine: the same pipeline on CUDA (do_bench timings, Triton kernels, CUDA graphs), with peak memory."""
    assert main(["bench", what, "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / f"{what}.json").read_text(encoding="utf-8"))
    assert result["rows"] and all(r["peak_mb"] is not None and r["peak_mb"] >= 0 for r in result["rows"])
    assert list(tmp_path.glob(f"{what}_*.png"))


@pytest.mark.slow  # 15-35 s on 2 cores: out of the fast lane, CI runs it
def test_bench_no_peers_names_every_peer_in_the_notes(tmp_path, capsys):
    assert main(["bench", "kernels", "--quick", "--device", "cpu", "--no-peers", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "kernels.json").read_text(encoding="utf-8"))
    assert {r["impl"] for r in result["rows"]} == {"mambakit", "reference", "sdpa"}
    for peer in ("mamba_ssm", "mambapy", "fla"):
        assert f"{peer}: skipped: peers turned off (--no-peers)" in result["notes"]
    assert result["command"].endswith("--no-peers")


def test_kernel_times_are_per_step_costliest_first_and_skip_host_only_entries():
    from types import SimpleNamespace

    from mambakit.bench.timing import kernel_times

    events = [SimpleNamespace(key="host_only", device_time_total=0, count=6),
              SimpleNamespace(key="small", device_time_total=300.0, count=3),
              SimpleNamespace(key="big", device_time_total=900.0, count=6)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert kernel_times(prof, steps=3) == [("big", 300.0, 2), ("small", 100.0, 1)]
