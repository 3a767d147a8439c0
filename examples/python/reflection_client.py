"""Calls llmrpc with no compiled stubs and no .proto files: everything comes from server reflection.

Needs only grpcio, grpcio-reflection and protobuf (not llmrpc itself):

    python examples/python/reflection_client.py --target 127.0.0.1:50051 \
        '{"text": "The capital of France is", "sampling": {"max_tokens": 8, "temperature": 0}}'

It prints the services the port offers, one line each, then streams Generate's
answers as JSON lines (the request is JSON too, as grpcurl takes it). A refused
request is printed as grpcurl prints it, on stderr with exit status 1: the code, the
message, and the google.rpc.Status details (e.g. a BadRequest naming the bad field),
whose types are looked up through reflection too.
"""
from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "llmrpc.v1.Generation"
STATUS_DETAILS = "grpc-status-details-bin"  # the trailer holding a google.rpc.Status


def print_error(error: grpc.RpcError, pool: descriptor_pool.DescriptorPool) -> None:
    """A failed call as grpcurl shows it: code, message, then each detail as JSON."""
    code = "".join(word.capitalize() for word in error.code().name.split("_"))
    lines = ["ERROR:", f"  Code: {code}", f"  Message: {error.details()}"]
    trailer = dict(error.trailing_metadata() or ()).get(STATUS_DETAILS)
    if trailer:
        status_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))
        status = json_format.MessageToDict(status_class.FromString(trailer), descriptor_pool=pool)
        lines.append("  Details:")
        lines += [f"  {i}) {json.dumps(detail)}" for i, detail in enumerate(status.get("details", []), 1)]
    print("\n".join(lines), file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("request", nargs="?", default='{"text": "Hello", "sampling": {"max_tokens": 8}}',
                        help="the GenerateRequest as JSON")
    parser.add_argument("--target", default="127.0.0.1:50051")
    args = parser.parse_args()

    with grpc.insecure_channel(args.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        for name in database.get_services():
            print(f"service {name}")
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName(SERVICE).methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        generate = channel.unary_stream(
            f"/{SERVICE}/Generate",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        request = json_format.Parse(args.request, request_class())
        try:
            for response in generate(request):
                print(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True)))
        except grpc.RpcError as error:
            print_error(error, pool)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
