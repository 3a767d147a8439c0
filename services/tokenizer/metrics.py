"""FrontMetrics: what the front door measures per request, in Prometheus form.

Requests by outcome, time to first token and the time between tokens, as the
tokenizer sees them (so they include the scheduler hop). Scheduler-side numbers
(queue lengths, KV usage, cache hits, retractions) live in the scheduler process
and are scraped from it over gRPC when /metrics is read (see http.py).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds) from a fast GPU decode step up to a slow CPU prefill.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)
OUTCOMES = ("finished", "aborted", "rejected", "error")


class RequestTiming:
    """The clock of one request: first token, then the gap before each later one (per index)."""

    __slots__ = ("_metrics", "_start", "_first_seen", "_last")

    def __init__(self, metrics: FrontMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first_seen = False
        self._last: dict[int, float] = {}

    def tokens(self, index: int, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if not self._first_seen:
            self._first_seen = True
            self._metrics.time_to_first_token.observe(now - self._start)
        last = self._last.get(index)
        if last is not None:
            # A message of several tokens (stream=false upstream never happens here, but a
            # step may batch) spreads its gap evenly over them.
            for _ in range(count):
                self._metrics.inter_token_latency.observe((now - last) / count)
        self._last[index] = now


class FrontMetrics:
    """The tokenizer's registry (one per server, so several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llmrpc_requests", "Generate requests by outcome",
                                ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.in_progress = Gauge("llmrpc_requests_in_progress", "Generate requests being answered",
                                 registry=self.registry)
        self.time_to_first_token = Histogram("llmrpc_time_to_first_token_seconds",
                                             "From request to its first generated token",
                                             buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("llmrpc_inter_token_latency_seconds",
                                             "Between consecutive tokens of one completion",
                                             buckets=ITL_BUCKETS, registry=self.registry)

    def start(self) -> RequestTiming:
        self.in_progress.inc()
        return RequestTiming(self)

    def request_done(self, outcome: str) -> None:
        self.in_progress.dec()
        self.requests.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
