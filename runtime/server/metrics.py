"""Daemon metrics and their Prometheus text exposition (format 0.0.4), without a client library."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Counters the scheduler and HTTP layer update; gauges are read at scrape time."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        self.clock = clock
        self.window_s = window_s
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.rejected = 0
        self.queue_depth = 0
        self.decode_seconds = 0.0  # time inside batched decode steps
        self.decode_step_tokens = 0  # tokens those steps produced
        self.spec_steps = self.spec_proposed = self.spec_accepted = 0  # speculative steps, draft tokens proposed / kept
        self.finished: dict[str, int] = {}
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, HTTP status) -> count
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.batch_sizes = Histogram((1, 2, 4, 8, 16, 32, 64))
        self._steps: deque[tuple[float, int]] = deque()  # (end time, tokens decoded in the step)
        self._lock = threading.Lock()

    def record_step(self, batch: int, seconds: float, tokens: int | None = None) -> None:
        """One decode step over `batch` sequences that produced `tokens` (default: one per sequence)."""
        now = self.clock()
        tokens = batch if tokens is None else tokens
        self.batch_sizes.observe(batch)
        with self._lock:
            self.decode_seconds += seconds
            self.decode_step_tokens += tokens
            self._steps.append((now, tokens))
            while self._steps and now - self._steps[0][0] > self.window_s:
                self._steps.popleft()

    def decode_tokens_per_s(self) -> float:
        now = self.clock()
        with self._lock:
            while self._steps and now - self._steps[0][0] > self.window_s:
                self._steps.popleft()
            return sum(b for _, b in self._steps) / self.window_s

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self, gauges: dict[str, tuple[str, float]], labelled: dict[str, tuple[str, dict, float]] | None = None) -> str:
        """Exposition text: own counters plus `gauges` {name: (help, value)} read by the caller."""
        p = "edge_sdk_"
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}"])
            lines.extend(f"{p}{name}{s}" for s in samples)

        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [f" {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Tokens generated.", [f" {self.generation_tokens}"])
        metric("decode_tokens_per_second", "gauge", f"Decoded tokens per second over the last {self.window_s:.0f} s, all streams.",
               [f" {self.decode_tokens_per_s():.3f}"])
        metric("decode_seconds_total", "counter", "Seconds spent in batched decode steps.", [f" {self.decode_seconds:.6f}"])
        metric("decode_step_tokens_total", "counter", "Tokens produced by batched decode steps (prefill excluded).",
               [f" {self.decode_step_tokens}"])
        metric("speculative_steps_total", "counter", "Speculative decode steps (one sequence running).", [f" {self.spec_steps}"])
        metric("speculative_proposed_tokens_total", "counter", "Draft tokens proposed to speculative steps.", [f" {self.spec_proposed}"])
        metric("speculative_accepted_tokens_total", "counter", "Draft tokens the target accepted.", [f" {self.spec_accepted}"])
        metric("requests_rejected_total", "counter", "Requests refused as too large (413) or busy (503: no memory or queue space now, queue wait timed out, shutting down).", [f" {self.rejected}"])
        metric("requests_finished_total", "counter", "Generations finished, by reason.",
               [f'{{reason="{k}"}} {v}' for k, v in sorted(self.finished.items())])
        with self._lock:
            reqs = sorted(self.requests.items())
        metric("http_requests_total", "counter", "HTTP requests by endpoint and status.",
               [f'{{endpoint="{e}",status="{s}"}} {v}' for (e, s), v in reqs])
        lines += [f"# HELP {p}ttft_seconds Time from arrival to first token.", f"# TYPE {p}ttft_seconds histogram"]
        lines += self.ttft.lines(f"{p}ttft_seconds")
        lines += [f"# HELP {p}decode_batch_size Sequences per decode step.", f"# TYPE {p}decode_batch_size histogram"]
        lines += self.batch_sizes.lines(f"{p}decode_batch_size")
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [f" {value}"])
        for name, (help_, labels, value) in (labelled or {}).items():
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            metric(name, "gauge", help_, [f"{{{lab}}} {value}"])
        return "\n".join(lines) + "\n"
