"""Timing helpers shared by the CPU op benchmarks (`cpu_selective_scan.py`, `cpu_ssd.py`): they live in
`mambakit.bench.timing`, which `mambakit bench` uses too."""

from mambakit.bench.timing import forward_backward, forward_only, saved_bytes, time_interleaved

__all__ = ["forward_backward", "forward_only", "saved_bytes", "time_interleaved"]
