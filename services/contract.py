"""What the tokenizer and the scheduler services agree on beyond the .proto files.

Both import this module and never each other: the rule for request ids, a request's limits
(`Limits`: SamplingParams' names and defaults for how much to generate and when to end), the
finish reasons as the core names them and as the wire encodes them, and the method through which
the front door scrapes the scheduler's metrics. Errors are in status.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from llmrpc.services.status import FieldError
from llmrpc.v1 import generation_pb2

MAX_REQUEST_ID_LEN = 256
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=-]+")


def check_request_id(request_id: str) -> None:
    """Raises FieldError unless `request_id` is a usable id (the server assigns one when empty)."""
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise FieldError("request_id", f"request_id is longer than {MAX_REQUEST_ID_LEN} characters")
    if _REQUEST_ID.fullmatch(request_id) is None:
        raise FieldError("request_id", "request_id may only hold letters, digits and . _ : / @ + = -")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How many completions a request asks for and when each one ends: SamplingParams' fields of these names.

    Read from a message with `messages.from_message(Limits, sampling)` (unset fields take these
    defaults); the scheduler checks the values (services/scheduler/validation.py).
    """

    max_tokens: int = 128
    min_tokens: int = 0  # EOS and stop tokens (and stop strings) do not count before this many tokens
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1


# The core's finish reasons (TokenEvent.finish_reason, the metrics' labels) → the wire's enum.
FINISH_REASONS: dict[str, generation_pb2.FinishReason] = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "abort": generation_pb2.FINISH_REASON_ABORT,
    "error": generation_pb2.FINISH_REASON_ERROR,
}
FINISH_REASON_NAMES: dict[generation_pb2.FinishReason, str] = {wire: name for name, wire in FINISH_REASONS.items()}

# The scheduler's Prometheus text over its gRPC port: raw bytes in and out, no proto (the payload
# already is a wire format). Served by scheduler/exposition.py, read by the front door's /metrics.
SCRAPE_SERVICE = "llmrpc.v1.SchedulerMetrics"
SCRAPE_METHOD = f"/{SCRAPE_SERVICE}/Scrape"
