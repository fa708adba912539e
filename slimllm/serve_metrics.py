"""What `slimllm serve` reports at GET /metrics, in the Prometheus text format (version 0.0.4).

Counters and histograms are kept here, updated from the scheduler's thread (each token event)
and the server's (requests, errors), under one lock; the scheduler's own figures (queue, running
batch, prefix cache) are read from `Scheduler.metrics()` when scraped. Histograms follow
Prometheus' layout: cumulative `_bucket{le=...}` lines ending with `+Inf`, then `_sum` and
`_count`. Tokens per second is measured over the last `WINDOW` seconds.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
WINDOW = 10.0  # seconds of the tokens/s figure


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{le:g}"}} {total}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum!r}"]
        return [*out, f"{name}_count {self.count}"]


class Metrics:
    """The server's own counters (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.errors: dict[int, int] = {}  # HTTP status -> answers
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.recent: deque[float] = deque()  # times of recent tokens

    def prompt(self, tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += tokens

    def token(self, now: float, ttft: float | None, itl: float | None) -> None:
        with self.lock:
            self.generated_tokens += 1
            self.recent.append(now)
            self.forget(now)
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[status] = self.errors.get(status, 0) + 1

    def forget(self, now: float) -> None:
        while self.recent and self.recent[0] < now - WINDOW:
            self.recent.popleft()

    def render(self, scheduler: dict, draining: bool) -> str:
        """The exposition text: the scheduler's figures and these counters."""
        now = time.perf_counter()
        with self.lock:
            self.forget(now)
            rate = len(self.recent) / WINDOW
            lookups = scheduler.get("prefix_lookups", 0)
            hits = scheduler.get("prefix_hits", 0)
            out = []
            gauge = lambda name, help, v: family(out, name, "gauge", help, [("", v)])  # noqa: E731
            gauge("slimllm_queue_length", "requests waiting for a batch slot", scheduler["queue"])
            gauge("slimllm_running", "requests in the running batch", scheduler["running"])
            gauge("slimllm_max_batch", "batch slots", scheduler["max_batch"])
            gauge("slimllm_draining", "1 while shutting down (new requests refused)", draining)
            family(
                out,
                "slimllm_requests_total",
                "counter",
                "finished generations by finish reason",
                [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())],
            )
            family(
                out,
                "slimllm_errors_total",
                "counter",
                "error answers by HTTP status",
                [(f'{{status="{s}"}}', n) for s, n in sorted(self.errors.items())],
            )
            counter = lambda name, help, v: family(out, name, "counter", help, [("", v)])  # noqa: E731
            counter("slimllm_prompt_tokens_total", "prompt tokens submitted", self.prompt_tokens)
            counter("slimllm_generated_tokens_total", "tokens generated", self.generated_tokens)
            counter("slimllm_prefix_cache_hits_total", "prompts that reused a cached prefix", hits)
            counter("slimllm_prefix_cache_lookups_total", "prefix cache lookups", lookups)
            counter(
                "slimllm_prefix_cache_reused_tokens_total",
                "prompt tokens read from the prefix cache instead of computed",
                scheduler.get("prefix_tokens_reused", 0),
            )
            gauge(
                "slimllm_prefix_cache_hit_rate", "hits / lookups", hits / lookups if lookups else 0
            )
            gauge("slimllm_tokens_per_second", f"tokens generated over the last {WINDOW:g} s", rate)
            for name, hist, help in (
                ("slimllm_time_to_first_token_seconds", self.ttft, "submit to first token"),
                ("slimllm_inter_token_latency_seconds", self.itl, "time between tokens"),
            ):
                out += [f"# HELP {name} {help}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(out) + "\n"


def family(out: list[str], name: str, kind: str, help: str, samples) -> None:
    """Append one metric family: HELP, TYPE, then `name{labels} value` per sample."""
    out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        value = float(value)
        text = repr(value) if math.isfinite(value) else "NaN"
        out.append(f"{name}{labels} {int(value) if value.is_integer() else text}")
