"""LLM: offline generation in one process: the scheduler core and the engine's ModelRunner, no gRPC.

    from llmrpc.services.llm import LLM
    from llmrpc.v1.generation_pb2 import SamplingParams

    llm = LLM("path/to/model", device="cuda")
    outputs = llm.generate([[1, 2, 3], "Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    outputs[0].outputs[0].token_ids

Requests go through what the scheduler service runs: `validation.build_requests` (the same
checks and the same n > 1 siblings and per-index seeds), the `Scheduler` core, and the
StepPipeline's overlap loop (services/scheduler/pipeline.py) over `ModelRunner.launch`, so
the tokens are the three-process stack's and a bench times the stack's loop without the
network. Prompts are token ids, or text encoded with the model's tokenizer (text in, text
out). A constrained request's grammar is compiled before anything runs (a bad one raises
FieldError naming `sampling.constraint.<kind>`), as the scheduler service has the worker do. The prefix cache lives as long as the LLM. Benches override `launch` to time each step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from llmrpc.engine.config import EngineConfig
from llmrpc.engine.constraint import ConstraintError
from llmrpc.engine.runner import ModelRunner
from llmrpc.engine.step import Step
from llmrpc.services.messages import to_message
from llmrpc.services.protocol import constraint_error
from llmrpc.services.scheduler.config import SchedulerConfig
from llmrpc.services.scheduler.pipeline import PendingStep, StepPipeline
from llmrpc.services.scheduler.request import AdmissionError, Request, TokenLogprobs
from llmrpc.services.scheduler.scheduler import Scheduler
from llmrpc.services.scheduler.validation import admission_error, build_requests
from llmrpc.v1 import generation_pb2, worker_pb2

Prompt = Sequence[int] | str
SamplingArg = generation_pb2.SamplingParams | Sequence[generation_pb2.SamplingParams] | None


@dataclass
class CompletionOutput:
    """One of a prompt's n completions."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort, once it ended
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] | None = None  # a row per token, when sampling.logprobs is set
    text: str | None = None  # the decoded tokens, when the prompt was text


@dataclass
class RequestOutput:
    """What one prompt produced: its n completions, index order."""

    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt: str | None = None  # the text, when the prompt was text

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """The scheduler core driving a ModelRunner in this process; one `generate` at a time.

    `model` is a model path (then `engine_options` are EngineConfig's fields: device,
    dtype, load_format, max_slots, ...) or a loaded ModelRunner to reuse, e.g. for a second
    LLM with other scheduler options on the same weights (not generating at the same time).
    """

    def __init__(self, model: str | ModelRunner, *, overlap_depth: int = 1, max_prefill_tokens: int = 8192,
                 schedule_policy: str = "fcfs", check_invariants: bool = False, disable_radix_cache: bool = False,
                 decode_steps: int = 1, **engine_options: Any) -> None:
        if isinstance(model, ModelRunner):
            if engine_options:
                raise TypeError(f"engine options {sorted(engine_options)} need a model path, not a ModelRunner")
            self.runner = model
        else:
            self.runner = ModelRunner(EngineConfig(model_path=str(model), **engine_options))
        info = self.runner.info
        self._info = to_message(info, worker_pb2.WorkerInfo)  # as the worker reports it to the scheduler
        self.scheduler = Scheduler(SchedulerConfig(
            num_pages=info.num_pages, page_size=info.page_size, max_slots=info.max_slots,
            context_length=info.context_length, eos_token_ids=info.eos_token_ids,
            max_prefill_tokens=max_prefill_tokens, schedule_policy=schedule_policy,
            check_invariants=check_invariants, overlap=overlap_depth > 0, prefix_cache=not disable_radix_cache,
            decode_steps=decode_steps))
        self.pipeline = StepPipeline(self.scheduler, self.launch, overlap_depth)
        self._next_id = 0

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, loaded on first use (text prompts); the runner's (constraints)."""
        return self.runner.tokenizer

    def launch(self, step: Step) -> PendingStep:
        """Starts one step on the runner (what StepPipeline calls; benches override it to time steps)."""
        return self.runner.launch(step)

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingArg = None) -> list[RequestOutput]:
        """Runs every prompt to its end; `sampling` is one for all prompts or one per prompt (default: unset,
        the API's defaults). Bad input raises status.FieldError naming the field, before anything runs."""
        outputs, owners = self._add(prompts, sampling)
        for _ in self._run(owners):
            pass
        return outputs

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingArg = None) -> Iterator[RequestOutput]:
        """As `generate`, yielding a prompt's RequestOutput (updated in place) each time one of its
        completions grows or ends. Leaving the loop early aborts what has not ended."""
        _, owners = self._add(prompts, sampling)
        yield from self._run(owners)

    def _run(self, owners: dict[str, tuple[RequestOutput, CompletionOutput]]) -> Iterator[RequestOutput]:
        try:
            for events in self.pipeline.run():
                for event in events:
                    out, completion = owners[event.request_id]
                    completion.token_ids += event.token_ids
                    if event.logprobs is not None:
                        completion.logprobs = (completion.logprobs or []) + event.logprobs
                    if event.finish_reason is not None:
                        del owners[event.request_id]
                        completion.finish_reason = event.finish_reason
                        completion.cached_prompt_tokens = event.usage[2]
                        if out.prompt is not None:
                            completion.text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                    yield out
            assert not owners, f"the core went idle with {sorted(owners)} unfinished"
        finally:
            for request_id in owners:  # left early (or failed): nothing of this call keeps running
                self.scheduler.abort(request_id)

    def _add(self, prompts: Sequence[Prompt], sampling: SamplingArg
             ) -> tuple[list[RequestOutput], dict[str, tuple[RequestOutput, CompletionOutput]]]:
        """Checks every prompt, then admits them all to the core; returns the outputs to fill and,
        by request id, where each request's tokens go."""
        if sampling is None:
            sampling = generation_pb2.SamplingParams()
        if isinstance(sampling, generation_pb2.SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling params")
        batch: list[tuple[RequestOutput, list[Request]]] = []
        for prompt, params in zip(prompts, sampling):
            if isinstance(prompt, str):
                text, ids = prompt, list(self.tokenizer.encode(prompt))
            else:
                text, ids = None, list(prompt)
            request = generation_pb2.GenerateRequest(tokens=generation_pb2.TokenIds(ids=ids), sampling=params)
            requests = build_requests(request, f"llm-{self._next_id}", self._info)
            self._next_id += 1
            constraint = requests[0].sampling.constraint
            if constraint is not None:  # compiled before anything runs, as the scheduler service does
                try:
                    self.runner.compile_constraint(constraint)
                except ConstraintError as exc:
                    raise constraint_error(exc) from None
            out = RequestOutput(ids, [CompletionOutput(i) for i in range(len(requests))], text)
            batch.append((out, requests))
        try:
            self.scheduler.add_requests([req for _, requests in batch for req in requests])
        except AdmissionError as exc:
            raise admission_error(exc) from exc
        owners = {req.request_id: (out, completion)
                  for out, requests in batch for req, completion in zip(requests, out.outputs)}
        return [out for out, _ in batch], owners
