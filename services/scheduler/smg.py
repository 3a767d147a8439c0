"""SMG's engine contract, `sglang.grpc.scheduler.SglangScheduler`, served by the scheduler beside Generation.

SMG (the Shepherd Model Gateway, PyPI `smg`) in gRPC-workers mode does the front door's work
itself (chat templates, tokenization, detokenization, stop strings, tool and reasoning parsers)
and routes token-level requests to its workers over one of the engine contracts of PyPI
`smg-grpc-proto`, which it detects by calling each contract's HealthCheck. The scheduler speaks
the SGLang scheduler's: to it SMG sends token work only (it matches multi-token stop strings on
its own detokenized text and sends single-token ones as stop token ids), which is the split of
work between llmrpc's own tokenizer and scheduler. Over vLLM's contract SMG forwards stop strings
to the engine, and a token-level scheduler cannot match text.

The servicer is thin. Generate turns SMG's request into llmrpc's token-level GenerateRequest and
runs it through SchedulerService.Generate, so one validator and one request path serve both
contracts; the errors of that path name this contract's fields (`sampling_params.max_new_tokens`,
not `sampling.max_tokens`). A field llmrpc cannot honour is INVALID_ARGUMENT naming it, never
ignored. The grammar fields (regex, json_schema, ebnf_grammar) are llmrpc's constraint;
structural_tag is refused. HealthCheck is a real one-token generation, as SGLang's is. Left UNIMPLEMENTED (SMG copes
with each): Embed, profiling, LoRA, GetTokenizer (SMG loads the tokenizer from --model-path) and
SubscribeKvEvents (SMG's cache-aware policy then keeps its own prefix tree of what it routed).
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, NoReturn, Sequence, TypeAlias, cast

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sg_grpc
from smg_grpc_proto.generated import common_pb2

from llmrpc.services.contract import FINISH_REASON_NAMES
from llmrpc.services.status import FieldError, StatusError
from llmrpc.v1 import generation_pb2, worker_pb2

if TYPE_CHECKING:
    from llmrpc.services.scheduler.scheduler import Scheduler
    from llmrpc.services.scheduler.server import SchedulerService, SchedulerServiceConfig

Metadata: TypeAlias = "Sequence[tuple[str, str | bytes]]"

SERVICE_NAME = sg.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
HEALTH_TIMEOUT_S = 4.0  # under SMG's default probe timeout (--health-check-timeout-secs 5)
LOAD_SECTIONS = frozenset({"all", "core", "memory", "queues", "disagg", "spec", "lora"})
_INT32_MAX = 2**31 - 1
_DETAILS_KEY = "grpc-status-details-bin"  # where a google.rpc.Status travels (gRPC's richer error model)


# ---- SMG's request -> llmrpc's request ----------------------------------------------------


def _refused(field: str, why: str) -> NoReturn:
    raise FieldError(field, f"{field}: {why}")


def _check_unsupported(request: sg.GenerateRequest) -> None:
    """Refuses every field of this contract that llmrpc cannot honour, by its name here."""
    s = request.sampling_params
    checks = [
        ("mm_inputs", request.HasField("mm_inputs"), "multimodal input is not supported"),
        ("input_embeds", len(request.input_embeds) > 0, "input embeddings are not supported"),
        ("token_ids_logprob", len(request.token_ids_logprob) > 0, "logprobs of chosen token ids are not supported"),
        ("return_hidden_states", request.return_hidden_states, "hidden states are not returned"),
        ("disaggregated_params", request.HasField("disaggregated_params"),
         "prefill/decode disaggregation is not supported"),
        ("custom_logit_processor", bool(request.custom_logit_processor), "custom logit processors are not supported"),
        ("lora_id", bool(request.lora_id), "LoRA adapters are not supported"),
        ("data_parallel_rank", request.HasField("data_parallel_rank") and request.data_parallel_rank != 0,
         f"this scheduler is data-parallel rank 0 only, got {request.data_parallel_rank}"),
        ("require_reasoning", request.require_reasoning, "reasoning tokens are not counted"),
        # SGLang computes prompt logprobs from logprob_start_len; -1 asks for none (what SMG sends).
        ("logprob_start_len", request.return_logprob and request.logprob_start_len != -1,
         f"prompt logprobs are not supported (send -1), got {request.logprob_start_len}"),
        ("sampling_params.stop", len(s.stop) > 0,
         "stop strings need text: SMG matches them on its detokenized text; send token ids in stop_token_ids"),
        ("sampling_params.logit_bias", len(s.logit_bias) > 0, "logit bias is not supported"),
        ("sampling_params.custom_params", s.HasField("custom_params") and len(s.custom_params.fields) > 0,
         "custom sampling parameters are not supported"),
        ("sampling_params.stream_interval", s.HasField("stream_interval") and s.stream_interval != 1,
         f"every token is streamed as it is sampled (1), got {s.stream_interval}"),
    ]
    if s.WhichOneof("constraint") == "structural_tag":
        _refused("sampling_params.structural_tag", "structural tags are not supported; "
                                                   "send regex, json_schema or ebnf_grammar")
    for field, bad, why in checks:
        if bad:
            _refused(field, why)


def _int32(field: str, value: int) -> int:
    """A uint32 of this contract as llmrpc's int32; the value range check stays the validator's."""
    if value > _INT32_MAX:
        _refused(field, f"{value} is out of range")
    return value


def generation_request(request: sg.GenerateRequest) -> generation_pb2.GenerateRequest:
    """llmrpc's token-level GenerateRequest for one SMG request (FieldError for what llmrpc cannot honour).

    This contract has no field presence: SMG sends every sampling value explicitly, so each is
    taken as it stands (temperature 0 is greedy), except the zeros SGLang's own servicer reads as
    unset (repetition_penalty 0 is 1.0, n 0 is 1). The skip_special_tokens,
    spaces_between_special_tokens and no_stop_trim options shape text, which the gateway makes;
    tokenized.original_text, timestamp and log_metrics are the caller's notes, not instructions.
    """
    _check_unsupported(request)
    if not request.HasField("tokenized"):
        _refused("tokenized", "the scheduler takes token ids (tokenized.input_ids)")
    ids = request.tokenized.input_ids
    for i, token in enumerate(ids):
        _int32(f"tokenized.input_ids[{i}]", token)
    s = request.sampling_params
    sampling = generation_pb2.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
        repetition_penalty=s.repetition_penalty if s.repetition_penalty != 0.0 else 1.0,
        min_tokens=_int32("sampling_params.min_new_tokens", s.min_new_tokens),
        n=_int32("sampling_params.n", s.n) or 1,
        ignore_eos=s.ignore_eos,
        stop_token_ids=[_int32(f"sampling_params.stop_token_ids[{i}]", t) for i, t in enumerate(s.stop_token_ids)],
    )
    if s.HasField("max_new_tokens"):  # unset: llmrpc's default, which is SGLang's (128)
        sampling.max_tokens = _int32("sampling_params.max_new_tokens", s.max_new_tokens)
    if request.return_logprob:
        sampling.logprobs = request.top_logprobs_num
    kind = s.WhichOneof("constraint")
    if kind is not None:  # this contract's grammar fields are ours under other names
        sampling.constraint.CopyFrom(generation_pb2.Constraint(**{_CONSTRAINT_KINDS[kind]: getattr(s, kind)}))
    return generation_pb2.GenerateRequest(request_id=request.request_id, tokens=generation_pb2.TokenIds(ids=ids),
                                          sampling=sampling, stream=request.stream)


# SGLang's constraint oneof -> llmrpc's (structural_tag is refused above).
_CONSTRAINT_KINDS = {"regex": "regex", "json_schema": "json_schema", "ebnf_grammar": "ebnf"}

# ---- llmrpc's field names -> this contract's, in errors of the shared request path ----------

_RENAMED = {
    # The grammar's own field; the oneof's name where no one kind is at fault (a model without a tokenizer).
    **{f"sampling.constraint.{ours}": f"sampling_params.{theirs}" for theirs, ours in _CONSTRAINT_KINDS.items()},
    "sampling.constraint": "sampling_params.constraint",
    "input": "tokenized",
    "tokens.ids": "tokenized.input_ids",
    "max_tokens": "sampling_params.max_new_tokens",  # the core's AdmissionError names it bare
    "sampling.max_tokens": "sampling_params.max_new_tokens",
    "sampling.min_tokens": "sampling_params.min_new_tokens",
    "sampling.logprobs": "top_logprobs_num",
}
_LLMRPC_FIELD = re.compile(r"\b(?:sampling\.\w+(?:\.\w+)*|tokens\.ids|max_tokens)\b|^input\b")


def smg_field_names(text: str) -> str:
    """`text` (an error message or a field path) with llmrpc's request fields named as this contract names them."""
    return _LLMRPC_FIELD.sub(
        lambda m: _RENAMED.get(m[0]) or m[0].replace("sampling.", "sampling_params.", 1), text)


def _renamed_status(status: grpc.Status) -> grpc.Status:
    rich = next((status_pb2.Status.FromString(value) for key, value in status.trailing_metadata or ()
                 if key == _DETAILS_KEY), None)
    if rich is None:
        return rpc_status.to_status(status_pb2.Status(code=status.code.value[0],
                                                      message=smg_field_names(status.details)))
    for detail in rich.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                violation.field = smg_field_names(violation.field)
                violation.description = smg_field_names(violation.description)
            detail.Pack(bad)
    rich.message = smg_field_names(rich.message)
    return rpc_status.to_status(rich)


class _SmgContext:
    """An SMG call's servicer context, lent to the shared request path: its errors name this contract's fields."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> NoReturn:
        await self._context.abort(code, smg_field_names(details), trailing_metadata)
        raise AssertionError("abort returned")

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self._context.abort_with_status(_renamed_status(status))
        raise AssertionError("abort_with_status returned")


class _ProbeContext:
    """The context of the health probe's own generation: a status it ends with is raised, not sent."""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> NoReturn:
        raise StatusError(code, details)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise StatusError.from_status(status)  # keeps the details (the field named)


# ---- llmrpc's responses -> SMG's ------------------------------------------------------------


def _output_logprobs(logprobs: Sequence[generation_pb2.TokenLogprob]) -> sg.OutputLogProbs:
    return sg.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in logprobs], token_ids=[lp.token_id for lp in logprobs],
        top_logprobs=[sg.TopLogProbs(values=[t.logprob for t in lp.top], token_ids=[t.token_id for t in lp.top])
                      for lp in logprobs if lp.top])


class _Answer:
    """One SMG request's answer: chunks as tokens come (streaming), then one GenerateComplete per completion.

    Chunks carry the tokens and cumulative counts; the complete message carries the finish, the
    usage and, only without streaming, every output token (SMG accumulates the chunks itself).
    """

    def __init__(self, request: sg.GenerateRequest) -> None:
        self._prompt_tokens = len(request.tokenized.input_ids)
        self._logprobs = request.return_logprob
        self._completion_tokens: dict[int, int] = {}
        self._cached_tokens: dict[int, int] = {}  # from the usage on each completion's first message
        self._last_token: dict[int, int] = {}

    def messages(self, response: generation_pb2.GenerateResponse, stream: bool) -> list[sg.GenerateResponse]:
        index, tokens = response.index, list(response.token_ids)
        if response.HasField("usage"):
            self._cached_tokens[index] = response.usage.cached_prompt_tokens
        if tokens:
            self._last_token[index] = tokens[-1]
        count = self._completion_tokens[index] = self._completion_tokens.get(index, 0) + len(tokens)
        out = []
        if stream and tokens:
            chunk = sg.GenerateStreamChunk(token_ids=tokens, prompt_tokens=self._prompt_tokens,
                                           completion_tokens=count, cached_tokens=self._cached_tokens.get(index, 0),
                                           index=index)
            if self._logprobs:
                chunk.output_logprobs.CopyFrom(_output_logprobs(response.logprobs))
            out.append(sg.GenerateResponse(request_id=response.request_id, chunk=chunk))
        if response.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
            reason = FINISH_REASON_NAMES[response.finish_reason]
            usage = response.usage
            complete = sg.GenerateComplete(
                output_ids=[] if stream else tokens, finish_reason=reason, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_prompt_tokens, index=index)
            if reason == "stop" and index in self._last_token:  # EOS or a stop token ended it
                complete.matched_token_id = self._last_token[index]
            if self._logprobs and not stream:
                complete.output_logprobs.CopyFrom(_output_logprobs(response.logprobs))
            out.append(sg.GenerateResponse(request_id=response.request_id, complete=complete))
        return out


# ---- the servicer ---------------------------------------------------------------------------


class SmgScheduler(sg_grpc.SglangSchedulerServicer):  # type: ignore[misc]  # an untyped generated stub
    """SMG's SglangScheduler contract over one SchedulerService (its request path and its core)."""

    def __init__(self, service: SchedulerService, config: SchedulerServiceConfig) -> None:
        self._service = service
        self._config = config
        self._started = time.time()
        self._last_request = 0.0
        # (time, decode tokens, core, tokens/s) at the last GetLoads
        self._throughput: tuple[float, int, Scheduler | None, float] = (0.0, 0, None, 0.0)

    def add_to(self, server: grpc.aio.Server) -> None:
        sg_grpc.add_SglangSchedulerServicer_to_server(self, server)

    async def Generate(self, request: sg.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[sg.GenerateResponse]:
        self._last_request = time.time()
        try:
            converted = generation_request(request)
        except StatusError as exc:
            await exc.abort(context)
        answer = _Answer(request)
        # An async generator (the shared path's), closed below so that its clean-up runs at once.
        responses = cast("AsyncGenerator[generation_pb2.GenerateResponse, None]",
                         self._service.Generate(converted, _SmgContext(context)))
        try:
            async for response in responses:
                for message in answer.messages(response, request.stream):
                    yield message
        finally:
            await responses.aclose()  # a cancelled call frees its pages there

    async def Abort(self, request: sg.AbortRequest, context: grpc.aio.ServicerContext) -> sg.AbortResponse:
        found = self._service.abort(request.request_id)
        return sg.AbortResponse(success=found,
                                message=f"request {request.request_id} {'aborted' if found else 'not found'}")

    async def HealthCheck(self, request: sg.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> sg.HealthCheckResponse:
        """Healthy when a one-token generation comes back, or the step loop moves while it waits behind others."""
        core = self._service.core
        if core is None:
            return sg.HealthCheckResponse(healthy=False, message="scheduler has no worker connected")
        probe = generation_pb2.GenerateRequest(
            request_id=f"health-{uuid.uuid4().hex}", tokens=generation_pb2.TokenIds(ids=[0]),
            sampling=generation_pb2.SamplingParams(max_tokens=1, temperature=0.0), stream=False)
        steps = core.metrics.steps

        async def generate() -> None:
            async for _ in self._service.Generate(probe, _ProbeContext()):
                pass

        try:
            await asyncio.wait_for(generate(), HEALTH_TIMEOUT_S)
        except StatusError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a full queue: busy, and alive
                return sg.HealthCheckResponse(healthy=True, message=f"busy: {exc.message}")
            return sg.HealthCheckResponse(healthy=False, message=f"{exc.code.name}: {exc.message}")
        except asyncio.TimeoutError:
            if core is self._service.core and core.metrics.steps > steps:
                return sg.HealthCheckResponse(healthy=True, message="busy: the probe is queued, steps are running")
            return sg.HealthCheckResponse(healthy=False, message=f"no step ran in {HEALTH_TIMEOUT_S:.0f} s")
        return sg.HealthCheckResponse(healthy=True, message="a one-token generation passed")

    async def GetModelInfo(self, request: sg.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> sg.GetModelInfoResponse:
        info = await self._worker_info(context)
        # No model_path or tokenizer_path: the worker's files need not be on this host; SMG loads
        # its tokenizer from its own --model-path.
        return sg.GetModelInfoResponse(
            is_generation=True, served_model_name=info.model_name, max_context_length=info.context_length,
            vocab_size=info.vocab_size, supports_vision=False, architectures=[info.architecture],
            eos_token_ids=list(info.eos_token_ids), max_req_input_len=self._max_prompt_tokens(info))

    async def GetServerInfo(self, request: sg.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> sg.GetServerInfoResponse:
        info = await self._worker_info(context)
        core = self._service.core
        total_tokens = core.config.num_pages * core.config.page_size if core else 0
        c = self._config
        server_args = struct_pb2.Struct()
        server_args.update(dict(  # SMG flattens these into the worker's labels
            served_model_name=info.model_name, tp_size=info.tp_size, dp_size=1,
            pp_size=1, page_size=info.page_size, context_length=info.context_length,
            max_running_requests=core.config.max_slots if core else 0, max_total_tokens=total_tokens,
            chunked_prefill_size=c.max_prefill_tokens, schedule_policy=c.schedule_policy,
            max_queued_requests=c.max_queued_requests, disaggregation_mode="null", is_embedding=False,
            device=info.device, dtype=info.dtype))
        scheduler_info = struct_pb2.Struct()
        scheduler_info.update(dict(max_total_num_tokens=total_tokens, is_generation=True,
                                   max_req_input_len=self._max_prompt_tokens(info)))
        start = timestamp_pb2.Timestamp()
        start.FromSeconds(int(self._started))
        return sg.GetServerInfoResponse(
            server_args=server_args, scheduler_info=scheduler_info,
            active_requests=core.num_running + core.num_waiting if core else 0, is_paused=False,
            last_receive_timestamp=self._last_request, uptime_seconds=time.time() - self._started,
            server_type="grpc", start_time=start, max_total_num_tokens=total_tokens)

    async def GetLoads(self, request: sg.GetLoadsRequest, context: grpc.aio.ServicerContext) -> sg.GetLoadsResponse:
        for i, section in enumerate(request.include):
            if section not in LOAD_SECTIONS:
                await FieldError(f"include[{i}]", f"include[{i}]: {section!r} is not one of "
                                 f"{', '.join(sorted(LOAD_SECTIONS))}").abort(context)
        if request.HasField("dp_rank") and request.dp_rank != 0:
            await FieldError("dp_rank", f"dp_rank: this scheduler is rank 0 only, got {request.dp_rank}").abort(context)
        core = self._service.core
        if core is None:
            await StatusError(grpc.StatusCode.UNAVAILABLE, "scheduler has no worker connected").abort(context)
        c = core.config
        total = c.num_pages * c.page_size
        # In use as vLLM and SGLang count it (Scheduler.kv_cache_usage): a warm prefix cache does not
        # look like a full pool to SMG's overload and balance checks.
        used = core.num_used_pages * c.page_size
        load = sg.SchedulerLoad(
            dp_rank=0, num_running_reqs=core.num_running, num_waiting_reqs=core.num_waiting,
            num_total_reqs=core.num_running + core.num_waiting, num_used_tokens=used,
            max_total_num_tokens=total, token_usage=used / total, gen_throughput=self._tokens_per_s(core),
            cache_hit_rate=core.metrics.cache_hit_rate, max_running_requests=c.max_slots,
            num_waiting_uncached_tokens=sum(len(r.prompt) - core.kv.match_len(r.prompt) for r in core.waiting))
        sections = set(request.include) or {"all"}
        if sections & {"all", "memory"}:
            load.memory.CopyFrom(sg.MemoryMetrics(token_capacity=total))
        if sections & {"all", "queues"}:
            load.queues.CopyFrom(sg.QueueMetrics(waiting=core.num_waiting))
        if sections & {"all", "disagg"}:
            load.disaggregation.CopyFrom(sg.DisaggregationMetrics(mode="null"))
        return sg.GetLoadsResponse(
            timestamp=datetime.now(timezone.utc).isoformat(), dp_rank_count=1, loads=[load],
            aggregate=sg.AggregateMetrics(total_running_reqs=load.num_running_reqs,
                                          total_waiting_reqs=load.num_waiting_reqs,
                                          total_reqs=load.num_total_reqs, avg_token_usage=load.token_usage,
                                          avg_throughput=load.gen_throughput))

    async def FlushCache(self, request: common_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.FlushCacheResponse:
        """Evicts the prefix cache once nothing runs, waiting up to timeout_s for that."""
        deadline = time.monotonic() + max(request.timeout_s, 0.0)
        while True:
            core = self._service.core
            if core is not None and core.flush_cache():
                return common_pb2.FlushCacheResponse(success=True, message="prefix cache flushed")
            if time.monotonic() >= deadline:
                why = "no worker is connected" if core is None else "requests are running"
                return common_pb2.FlushCacheResponse(success=False, message=f"not flushed: {why}")
            await asyncio.sleep(0.05)

    # ---- what llmrpc does not serve: UNIMPLEMENTED with the reason (SMG handles each) ---------

    async def _unimplemented(self, context: grpc.aio.ServicerContext, what: str) -> NoReturn:
        await StatusError(grpc.StatusCode.UNIMPLEMENTED, f"llmrpc's scheduler does not serve {what}").abort(context)

    async def Embed(self, request: object, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._unimplemented(context, "embeddings")

    async def SubscribeKvEvents(self, request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        await self._unimplemented(context, "KV cache events")
        yield  # a server-streaming method

    async def GetTokenizer(self, request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        await self._unimplemented(context, "its tokenizer files: give SMG --model-path")
        yield  # a server-streaming method

    async def StartProfile(self, request: object, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._unimplemented(context, "profiling")

    async def StopProfile(self, request: object, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._unimplemented(context, "profiling")

    async def LoadLoRAAdapter(self, request: object, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._unimplemented(context, "LoRA adapters")

    async def UnloadLoRAAdapter(self, request: object, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._unimplemented(context, "LoRA adapters")

    async def ListLoadedLoRAAdapters(self, request: object, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._unimplemented(context, "LoRA adapters")

    # ---- helpers ----------------------------------------------------------------------------

    async def _worker_info(self, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerInfo:
        info = self._service.worker_info
        if info is None:
            await StatusError(grpc.StatusCode.UNAVAILABLE, "scheduler has no worker connected").abort(context)
        return info

    def _max_prompt_tokens(self, info: worker_pb2.WorkerInfo) -> int:
        longest = info.context_length - 1  # one position stays for the first output token
        limit = self._config.max_prompt_tokens
        return min(limit, longest) if limit > 0 else longest

    def _tokens_per_s(self, core: Scheduler) -> float:
        """Decode tokens per second since the previous poll (SMG polls every few seconds)."""
        now, tokens = time.monotonic(), core.metrics.decode_tokens
        then, before, seen, rate = self._throughput
        if seen is core and now - then < 0.5:
            return rate
        rate = (tokens - before) / (now - then) if seen is core else 0.0
        self._throughput = (now, tokens, core, rate)
        return rate
