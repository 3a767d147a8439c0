"""SchedulerMetrics: cumulative counters of the scheduler core, for logs and a /metrics endpoint.

Gauges (queue lengths, KV usage) are read live from the Scheduler's properties;
this holds only what accumulates.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SchedulerMetrics:
    steps: int = 0
    decode_tokens: int = 0  # decode rows scheduled (k per row in a step of k decode passes)
    multi_step_decodes: int = 0  # steps of more than one decode pass (--decode-steps)
    prefill_tokens: int = 0  # prompt tokens scheduled in prefill chunks (recomputation included)
    prompt_tokens: int = 0  # prompt tokens of admitted requests, counted at their first admission
    cached_prompt_tokens: int = 0  # of those, served from the prefix cache
    retractions: int = 0  # running requests sent back to the queue for lack of KV pages
    evicted_pages: int = 0  # radix pages evicted to make room
    dropped_tokens: int = 0  # tokens sampled for a request that had already ended
    requests_added: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason

    @property
    def tokens_per_step(self) -> float:
        return (self.decode_tokens + self.prefill_tokens) / self.steps if self.steps else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
