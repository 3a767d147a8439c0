"""LLM: the in-process offline API gives the three-process stack's tokens, and leaks no KV page.

The tiny random Llama (bench/tiny_model.py) on the CPU, as the stack's worker runs it: the
same engine settings as the `tiny_stack` fixture (128 slots, 16,384 KV tokens), the KV
invariants checked after every step.
"""
from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrpc.bench.tiny_model import VOCAB
from llmrpc.services.llm import LLM
from llmrpc.services.rpc import channel
from llmrpc.services.status import FieldError
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc
from tests.conftest import assert_pages_all_back, start_stack

NEW_TOKENS = 16
GREEDY = pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> LLM:
    return LLM(str(tiny_model), check_invariants=True, max_slots=128, max_total_tokens=16384)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Lengths around the 16-token page, two sharing a 40-token prefix."""
    rng = np.random.default_rng(5)
    shared = rng.integers(3, VOCAB, 40).tolist()
    return [rng.integers(3, VOCAB, n).tolist() for n in (1, 15, 16, 17, 70)] + [
        shared + [11, 12], shared + rng.integers(3, VOCAB, 9).tolist()]


def stack_tokens(target: str, prompts: list[list[int]], sampling: pb.SamplingParams) -> list[list[list[int]]]:
    """Each prompt's completions (index order) from the scheduler's token-level Generate, all at once."""
    async def one(stub, prompt: list[int]) -> list[list[int]]:
        request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt), sampling=sampling)
        by_index: dict[int, list[int]] = {}
        async for r in stub.Generate(request, timeout=120):
            by_index.setdefault(r.index, []).extend(r.token_ids)
        return [by_index[i] for i in sorted(by_index)]

    async def run() -> list[list[list[int]]]:
        async with channel(target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            return await asyncio.gather(*(one(stub, p) for p in prompts))

    return asyncio.run(run())


def hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' forward over the whole sequence, argmax, one token at a time (EOS does not stop it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def tokens(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in outputs]


def test_greedy_tokens_are_the_stacks_and_transformers(llm: LLM, prompts, tiny_stack, tiny_model: Path) -> None:
    outputs = llm.generate(prompts, GREEDY)
    got = tokens(outputs)
    assert got == stack_tokens(tiny_stack.scheduler, prompts, GREEDY)
    for prompt in (prompts[0], prompts[4]):
        assert got[prompts.index(prompt)] == [hf_greedy(tiny_model, prompt, NEW_TOKENS)]
    for out, prompt in zip(outputs, prompts):
        assert out.prompt_token_ids == prompt and out.prompt is None and out.finished
        (completion,) = out.outputs
        assert (completion.index, completion.finish_reason, completion.text) == (0, "length", None)
        assert len(completion.token_ids) == NEW_TOKENS
    assert_pages_all_back(llm)


def test_every_overlap_depth_gives_the_same_tokens(llm: LLM, prompts) -> None:
    want = tokens(llm.generate(prompts, GREEDY))
    for depth in (0, 2):
        other = LLM(llm.runner, overlap_depth=depth, check_invariants=True)  # the same weights and KV pool
        assert tokens(other.generate(prompts, GREEDY)) == want, depth
        assert_pages_all_back(other)


class PassCounting(LLM):
    """Keeps every step's number of decode passes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[int] = []

    def launch(self, step):
        self.passes.append(step.decode_steps)
        return super().launch(step)


def test_multi_step_decode_gives_the_same_tokens_logprobs_and_seeded_samples(llm: LLM, prompts) -> None:
    """k passes per step against one: greedy and seeded tokens, and logprobs, are the same (a seed's
    draws are keyed by position), and the steps did run k passes."""
    greedy = pb.SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True, logprobs=2)
    seeded = pb.SamplingParams(max_tokens=11, temperature=0.9, top_k=20, seed=3, n=2, ignore_eos=True)
    want = [llm.generate(prompts, greedy), llm.generate(prompts, seeded)]
    for depth, passes in ((1, 4), (0, 3), (2, 8)):
        other = PassCounting(llm.runner, overlap_depth=depth, decode_steps=passes, check_invariants=True)
        for sampling, ref in zip((greedy, seeded), want):
            got = other.generate(prompts, sampling)
            assert tokens(got) == tokens(ref), (depth, passes)
            for a, b in zip(got, ref):
                for ca, cb in zip(a.outputs, b.outputs):
                    assert [lp.logprob for lp in ca.logprobs or ()] == pytest.approx(
                        [lp.logprob for lp in cb.logprobs or ()], abs=1e-5)
                    assert ca.finish_reason == cb.finish_reason == "length"
        assert max(other.passes) == passes
        assert_pages_all_back(other)


def test_the_stack_decoding_k_tokens_a_step_gives_the_same_tokens(llm: LLM, prompts, tmp_path: Path,
                                                                   tiny_model: Path) -> None:
    greedy = pb.SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True, logprobs=1)
    seeded = pb.SamplingParams(max_tokens=13, temperature=0.9, seed=11, n=2, ignore_eos=True)
    want = [tokens(llm.generate(prompts, s)) for s in (greedy, seeded)]
    stack = start_stack(tmp_path, tiny_model, "--max-running-requests", "128", "--max-total-tokens", "16384",
                        "--decode-steps", "4", "--check-kv-invariants")
    try:
        got = [stack_tokens(stack.scheduler, prompts, s) for s in (greedy, seeded)]
        text = urllib.request.urlopen(f"{stack.http}/metrics", timeout=10).read().decode()
    finally:
        stack.stop()
    assert got == want
    match = re.search(r"^llmrpc_scheduler_multi_step_decodes_total (\S+)$", text, re.MULTILINE)
    assert match and float(match.group(1)) > 0


def test_n_seeded_samples_are_the_stacks_and_share_the_prompt(llm: LLM, prompts, tiny_stack) -> None:
    sampling = pb.SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=3, ignore_eos=True)
    outputs = llm.generate(prompts[3:5], sampling)
    got = tokens(outputs)
    assert got == stack_tokens(tiny_stack.scheduler, prompts[3:5], sampling)
    for samples in got:
        assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3  # a seed stream per index
    long = outputs[1]  # 70 prompt tokens: the siblings of the first reuse its 4 full pages
    assert [c.index for c in long.outputs] == [0, 1, 2]
    assert [c.cached_prompt_tokens for c in long.outputs][1:] == [64, 64]
    assert_pages_all_back(llm)


def test_per_prompt_sampling_and_greedy_n(llm: LLM, prompts) -> None:
    outputs = llm.generate(prompts[:2], [pb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, n=2),
                                         pb.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)])
    first, second = tokens(outputs)
    assert len(first) == 2 and first[0] == first[1] and len(first[0]) == 3
    assert len(second) == 1 and len(second[0]) == 5
    assert_pages_all_back(llm)


def test_text_in_text_out(llm: LLM) -> None:
    (out,) = llm.generate(["The capital of France is"], GREEDY)
    ids = llm.tokenizer.encode("The capital of France is")
    assert out.prompt == "The capital of France is" and out.prompt_token_ids == ids
    (completion,) = out.outputs
    assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert tokens(llm.generate([ids], GREEDY)) == [[completion.token_ids]]


def test_leaving_a_stream_early_aborts_its_requests_and_frees_their_pages(llm: LLM, prompts) -> None:
    want = tokens(llm.generate(prompts, GREEDY))
    seen = 0
    for out in llm.stream(prompts, GREEDY):
        seen += 1
        if seen == 10:
            break
    assert llm.scheduler.metrics.requests_finished.get("abort", 0) >= 1
    assert not llm.scheduler.requests
    assert tokens(llm.generate(prompts, GREEDY)) == want  # the steps left in flight are read first
    assert_pages_all_back(llm)


def test_bad_input_names_the_field_and_admits_nothing(llm: LLM, prompts) -> None:
    with pytest.raises(FieldError) as info:
        llm.generate(prompts, pb.SamplingParams(top_k=-7))
    assert info.value.field == "sampling.top_k"
    with pytest.raises(FieldError) as info:  # refused by the core: prompt + max_tokens over the context
        llm.generate([prompts[0], prompts[1]], [GREEDY, pb.SamplingParams(max_tokens=4000)])
    assert info.value.field == "sampling.max_tokens"
    with pytest.raises(FieldError) as info:
        llm.generate([[VOCAB]], GREEDY)
    assert info.value.field == "tokens.ids[0]"
    assert_pages_all_back(llm)
