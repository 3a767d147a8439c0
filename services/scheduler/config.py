"""SchedulerConfig: the scheduler core's typed, frozen settings.

The servicer builds it once from the workers' reported capacity (pages, slots,
context length, EOS ids) and the CLI's scheduling flags, and passes it down.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_POLICIES = ("fcfs", "lpm")


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int  # KV pool capacity, the minimum over worker ranks
    page_size: int  # tokens per KV page
    max_slots: int  # request slots on the worker: the most requests running at once
    context_length: int
    eos_token_ids: tuple[int, ...]
    max_prefill_tokens: int = 8192  # per-step token budget for prefill chunks
    schedule_policy: str = "fcfs"  # fcfs | lpm (longest prefix match first)
    check_invariants: bool = False  # verify the page accounting after every step (tests, debugging)
    overlap: bool = True  # the servicer may ask for step N+1 before step N's output is known
    prefix_cache: bool = True  # False: no radix prefix sharing (--disable-radix-cache)
    decode_steps: int = 1  # the most decode passes one step may ask for (multi-step decode)

    def __post_init__(self) -> None:
        for name in ("num_pages", "page_size", "max_slots", "context_length", "max_prefill_tokens", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
