"""Server metrics in the Prometheus text exposition format (version 0.0.4), served at GET /metrics.

Counters only grow; gauges are read when /metrics is asked for; time to first token is a histogram.
Thread-safe: the scheduler thread records, the HTTP handlers read.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_WINDOW_S = 10.0  # tokens/s is measured over the last 10 seconds
SCHEDULER_PHASES = ("idle", "admit", "prefill", "launch", "wait", "process", "flush")


class Metrics:
    """Counters, a TTFT histogram and a tokens/s window; `render(gauges)` gives the exposition text."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, float] = {
            "requests_total": 0, "requests_finished_total": 0, "requests_rejected_total": 0,
            "prompt_tokens_total": 0, "generation_tokens_total": 0, "decode_steps_total": 0,
            "prefill_chunks_total": 0, "prefill_graph_calls_total": 0, "prefix_cache_hits_total": 0,
            "prefix_cache_misses_total": 0, "prefix_cache_hit_tokens_total": 0,
        }
        self.finish_reasons: dict[str, int] = {}
        # where the scheduler thread's time goes (wall seconds): where the host limits throughput, this shows
        # which part; "wait" is the time spent waiting for the device to hand over a block's tokens
        self.phase_seconds: dict[str, float] = dict.fromkeys(SCHEDULER_PHASES, 0.0)
        self._ttft_counts = [0] * (len(_TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0
        self._recent: deque[tuple[float, int]] = deque()

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def finished(self, reason: str) -> None:
        with self._lock:
            self.counters["requests_finished_total"] += 1
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self._ttft_counts[bisect.bisect_left(_TTFT_BUCKETS, seconds)] += 1
            self._ttft_sum += seconds

    def phases(self, seconds: dict[str, float]) -> None:
        """Add the scheduler thread's seconds per phase (one call per loop iteration)."""
        with self._lock:
            for phase, value in seconds.items():
                self.phase_seconds[phase] += value

    def tokens(self, n: int) -> None:
        """n tokens were generated now (counted and entered in the tokens/s window)."""
        now = time.monotonic()
        with self._lock:
            self.counters["generation_tokens_total"] += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / _RATE_WINDOW_S

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text: `gauges` (name -> value, read by the caller now) and every counter."""
        lines = gauge_lines(gauges)
        lines += ["# TYPE mambakit_tokens_per_second gauge",
                  f"mambakit_tokens_per_second {self.tokens_per_second():g}"]
        with self._lock:
            for name, value in self.counters.items():
                lines += [f"# TYPE mambakit_{name} counter", f"mambakit_{name} {float(value):g}"]
            lines.append("# TYPE mambakit_request_finish_total counter")
            for reason, count in sorted(self.finish_reasons.items()):
                lines.append(f'mambakit_request_finish_total{{reason="{reason}"}} {count}')
            lines.append("# TYPE mambakit_scheduler_seconds_total counter")
            for phase, value in self.phase_seconds.items():
                lines.append(f'mambakit_scheduler_seconds_total{{phase="{phase}"}} {value:g}')
            lines.append("# TYPE mambakit_time_to_first_token_seconds histogram")
            total = 0
            for bound, count in zip(_TTFT_BUCKETS, self._ttft_counts):
                total += count
                lines.append(f'mambakit_time_to_first_token_seconds_bucket{{le="{bound:g}"}} {total}')
            total += self._ttft_counts[-1]
            lines += [f'mambakit_time_to_first_token_seconds_bucket{{le="+Inf"}} {total}',
                      f"mambakit_time_to_first_token_seconds_sum {self._ttft_sum:g}",
                      f"mambakit_time_to_first_token_seconds_count {total}"]
        return "\n".join(lines) + "\n"


def gauge_lines(gauges: dict[str, float]) -> list[str]:
    """The exposition lines of `gauges` (name -> value), each as `mambakit_<name>`."""
    lines = []
    for name, value in gauges.items():
        lines += [f"# TYPE mambakit_{name} gauge", f"mambakit_{name} {float(value):g}"]
    return lines


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from exposition text (for tests and the load benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
