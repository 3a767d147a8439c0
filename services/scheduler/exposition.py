"""The scheduler's numbers in Prometheus' text format, served over gRPC as `SchedulerMetrics/Scrape`.

The front door's /metrics appends this text to its own, so one scrape sees the
whole stack without the scheduler opening an HTTP port. The method is raw bytes
in, raw bytes out (no proto): the payload is already a wire format, the
Prometheus text exposition, and a message would only wrap one string. The method's
name is services/contract.py's, which the front door reads it by.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmrpc.services.contract import FINISH_REASONS, SCRAPE_SERVICE

if TYPE_CHECKING:
    from llmrpc.services.scheduler.scheduler import Scheduler


class _CoreCollector:
    """Reads the live core at scrape time; nothing is mirrored or updated on the hot path."""

    def __init__(self, core: Callable[[], Scheduler | None]) -> None:
        self._core = core

    def collect(self) -> Iterator[Metric]:
        core = self._core()
        if core is None:
            return
        m = core.metrics
        yield GaugeMetricFamily("llmrpc_scheduler_waiting_requests", "Requests in the waiting queue",
                                value=core.num_waiting)
        yield GaugeMetricFamily("llmrpc_scheduler_running_requests", "Requests holding a slot",
                                value=core.num_running)
        yield GaugeMetricFamily("llmrpc_scheduler_kv_usage_ratio",
                                "Fraction of KV pages not free (running requests and the whole prefix cache)",
                                value=core.kv_usage)
        # What a router's KV scorer wants (llm-d's kvUsageSpec, vLLM's kv_cache_usage_perc): cached
        # pages no request holds count as free.
        yield GaugeMetricFamily("llmrpc_scheduler_kv_cache_usage_perc",
                                "Fraction of KV pages held by requests (unreferenced cached pages count as free)",
                                value=core.kv_cache_usage)
        c = core.config
        info = GaugeMetricFamily("llmrpc_cache_config_info", "The KV pool's layout, in the labels",
                                 labels=["page_size", "num_pages", "block_size", "num_gpu_blocks"])
        # block_size / num_gpu_blocks: the same facts under vLLM's label names, which llm-d's
        # prefix scorer reads from cacheInfoSpec.
        info.add_metric([str(c.page_size), str(c.num_pages), str(c.page_size), str(c.num_pages)], 1)
        yield info
        yield GaugeMetricFamily("llmrpc_scheduler_prefix_cache_hit_ratio",
                                "Prompt tokens served from the prefix cache over all prompt tokens",
                                value=m.cache_hit_rate)
        for name, doc, value in (
            ("retractions", "Running requests sent back to the queue for lack of KV pages", m.retractions),
            ("steps", "Steps sent to the workers", m.steps),
            ("prefill_tokens", "Tokens scheduled in prefill chunks, recomputation included", m.prefill_tokens),
            ("decode_tokens", "Decode rows scheduled", m.decode_tokens),
            ("multi_step_decodes", "Steps of more than one decode pass", m.multi_step_decodes),
            ("prompt_tokens", "Prompt tokens of admitted requests", m.prompt_tokens),
            ("cached_prompt_tokens", "Prompt tokens served from the prefix cache", m.cached_prompt_tokens),
            ("evicted_pages", "Prefix-cache pages evicted to make room", m.evicted_pages),
        ):
            yield CounterMetricFamily(f"llmrpc_scheduler_{name}", doc, value=value)
        finished = CounterMetricFamily("llmrpc_scheduler_requests_finished", "Requests ended, by reason",
                                       labels=["reason"])
        for reason in FINISH_REASONS:
            finished.add_metric([reason], m.requests_finished.get(reason, 0))
        yield finished


def scrape_handler(core: Callable[[], Scheduler | None]) -> grpc.GenericRpcHandler:
    """The gRPC handler answering SCRAPE_METHOD with the current text exposition."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_CoreCollector(core))

    async def scrape(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return generate_latest(registry)

    return grpc.method_handlers_generic_handler(SCRAPE_SERVICE, {
        "Scrape": grpc.unary_unary_rpc_method_handler(scrape),  # no (de)serializers: raw bytes
    })
