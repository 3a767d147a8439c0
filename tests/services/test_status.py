"""Structured errors (services/status.py): one bad field reaches every kind of client as that field.

Through the real `llmrpc serve` processes (tokenizer in front of scheduler): a Python gRPC
client reads the google.rpc.BadRequest with `grpc_status.rpc_status.from_call`; the
reflection-only client of examples/ (a grpcurl stand-in) prints the status message and the
details it decodes through the server's reflection; an HTTP client gets OpenAI's error body
whose `param` is the field's OpenAI name. The cases are refused at each hop: the scheduler's
field checks, the scheduler's core (the context), and the tokenizer itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmrpc.services.status import CALLER_CODES, FieldError, StatusError, bad_fields
from llmrpc.v1 import generation_pb2 as pb
from llmrpc.v1 import generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

CASES = [  # (GenerateRequest as JSON, the field path, where it is refused, HTTP body, OpenAI param)
    ({"text": "hi", "sampling": {"top_p": 5}}, "sampling.top_p", "the scheduler's checks",
     ("/v1/completions", {"prompt": "hi", "top_p": 5}), "top_p"),
    ({"text": "hi", "sampling": {"max_tokens": 10**7}}, "sampling.max_tokens", "the scheduler's core",
     ("/v1/completions", {"prompt": "hi", "max_tokens": 10**7}), "max_tokens"),
    ({"chat": {"messages": [{"role": "robot", "content": "hi"}]}}, "chat.messages[0].role", "the tokenizer",
     ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}), "messages"),
]
IDS = [case[1] for case in CASES]


def rich_status(target: str, request: pb.GenerateRequest) -> tuple[grpc.RpcError, object]:
    """The error a plain (sync) grpc client gets, and the google.rpc.Status it carries."""
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    return error.value, rpc_status.from_call(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("request_json, field, _where, http, param", CASES, ids=IDS)
def test_a_grpc_client_reads_the_field_from_the_status_details(default_stack, request_json, field, _where, http,
                                                                param) -> None:
    request = json_format.ParseDict(request_json, pb.GenerateRequest())
    error, status = rich_status(default_stack.tokenizer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status.message == error.details()
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field] == bad_fields(error)
    assert bad.field_violations[0].description == error.details()
    assert error.details().startswith(field)  # readable as it stands
    assert not error.details().startswith("scheduler at")  # the caller's fault: no hop in it


@pytest.mark.slow
def test_the_tokenizer_relays_the_schedulers_status_intact(default_stack) -> None:
    sampling = pb.SamplingParams(top_p=5)
    tokens = pb.TokenIds(ids=[1, 504, 3458])
    _, direct = rich_status(default_stack.scheduler, pb.GenerateRequest(tokens=tokens, sampling=sampling))
    _, relayed = rich_status(default_stack.tokenizer, pb.GenerateRequest(text="hi", sampling=sampling))
    assert relayed == direct  # code, message and details, byte for byte


@pytest.mark.slow
@pytest.mark.parametrize("request_json, field, _where, http, param", CASES, ids=IDS)
def test_a_reflection_only_client_sees_the_field_as_grpcurl_would(default_stack, request_json, field, _where, http,
                                                                 param) -> None:
    done = subprocess.run([sys.executable, "-I", "examples/python/reflection_client.py", "--target",
                           default_stack.tokenizer, json.dumps(request_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines[:2] == ["ERROR:", "  Code: InvalidArgument"]
    assert lines[2].startswith(f"  Message: {field}")
    assert lines[3] == "  Details:"
    detail = json.loads(lines[4].removeprefix("  1) "))
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["field"] for v in detail["fieldViolations"]] == [field]
    assert detail["fieldViolations"][0]["description"] == lines[2].removeprefix("  Message: ")


@pytest.mark.slow
@pytest.mark.parametrize("request_json, field, _where, http, param", CASES, ids=IDS)
def test_an_http_client_gets_the_field_as_the_openai_param(default_stack, request_json, field, _where, http,
                                                          param) -> None:
    path, body = http
    request = urllib.request.Request(default_stack.http + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    answer = json.loads(error.value.read())
    assert error.value.code == 400
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"].startswith(field)  # the gRPC message, as it stands


@pytest.mark.slow
def test_other_codes_carry_an_error_info_reason(default_stack) -> None:
    """A request id in use: ALREADY_EXISTS from the scheduler, its ErrorInfo passed on by the tokenizer."""
    request = pb.GenerateRequest(request_id="status-test-busy", text="Count to a thousand:",
                                 sampling=pb.SamplingParams(max_tokens=4000, ignore_eos=True))
    with grpc.insecure_channel(default_stack.tokenizer) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        busy = stub.Generate(request, timeout=120)
        next(busy)  # the first holds the id now
        try:
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Generate(request, timeout=60))
        finally:
            busy.cancel()
    status = StatusError.of(error.value)
    assert status.code == grpc.StatusCode.ALREADY_EXISTS and status.reason == "REQUEST_ID_IN_USE"
    assert status.message == "request_id 'status-test-busy' is in use" and status.field is None


def test_a_hop_names_itself_only_in_what_the_caller_cannot_fix() -> None:
    bad = FieldError("sampling.n", "sampling.n must be in [1, 16], got 0")
    assert bad.relayed("scheduler at h:1") is bad
    down = StatusError(grpc.StatusCode.UNAVAILABLE, "scheduler has no worker connected", reason="NO_WORKER")
    relayed = down.relayed("scheduler at h:1")
    assert (relayed.code, relayed.message) == (grpc.StatusCode.UNAVAILABLE,
                                               "scheduler at h:1: scheduler has no worker connected")
    assert relayed.details == down.details and relayed.reason == "NO_WORKER"
    assert grpc.StatusCode.UNAVAILABLE not in CALLER_CODES and grpc.StatusCode.INVALID_ARGUMENT in CALLER_CODES


def test_a_status_goes_on_the_wire_as_a_google_rpc_status() -> None:
    error = FieldError("tokens.ids[2]", "tokens.ids[2] = -3 is outside the vocabulary [0, 10)")
    status = error.status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details == error.message
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    assert status_pb2.Status.FromString(value).message == error.message
    back = StatusError.from_status(status)
    assert (back.code, back.message, back.details) == (error.code, error.message, error.details)
    assert back.field == "tokens.ids[2]" and back.field_violations[0].description == error.message
    plain = StatusError.from_status(StatusError(grpc.StatusCode.INTERNAL, "boom").status())
    assert (plain.code, plain.message, plain.field, plain.reason) == (grpc.StatusCode.INTERNAL, "boom", None, None)
    assert str(error) == error.message
