"""The nano-vllm / mini-sglang offline workload, drawn exactly as they draw it.

`random.seed(0)`; 256 requests; all prompts first, each `randint(100, 1024)`
tokens of `randint(0, 10000)`; then one `max_tokens = randint(100, 1024)` per
request. Sampling at temperature 0.6 with EOS ignored, so every request produces
exactly its max_tokens and the output count is fixed: 133,966 tokens.

`warmup_workload` is what the benches run first (JIT, graphs, allocator): short
prompts that share no prefix with the timed ones, so the timed run finds nothing
of its own in the prefix cache.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NUM_REQUESTS = 256
PROMPT_TOKENS = 142_827
OUTPUT_TOKENS = 133_966
TEMPERATURE = 0.6


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def offline_workload(num_requests: int = NUM_REQUESTS, seed: int = 0) -> Workload:
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_requests)]
    max_tokens = [random.randint(100, 1024) for _ in range(num_requests)]
    workload = Workload(prompts, max_tokens)
    if (num_requests, seed) == (NUM_REQUESTS, 0):
        assert workload.prompt_tokens == PROMPT_TOKENS, workload.prompt_tokens
        assert workload.output_tokens == OUTPUT_TOKENS, workload.output_tokens
    return workload


def warmup_workload(timed: Workload, num_requests: int = 64, prompt_tokens: int = 200, max_tokens: int = 40,
                    seed: int = 1) -> Workload:
    """Random prompts whose first token no timed prompt starts with: not even one token of a prefix is shared."""
    rng = random.Random(seed)
    firsts = {p[0] for p in timed.prompts if p}
    prompts = []
    for _ in range(num_requests):
        prompt = [rng.randint(0, 10000) for _ in range(prompt_tokens)]
        while prompt[0] in firsts:
            prompt[0] = rng.randint(0, 10000)
        prompts.append(prompt)
    return Workload(prompts, [max_tokens] * num_requests)
