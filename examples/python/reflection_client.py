"""Calls llmrpc with no compiled stubs and no .proto files: everything comes from server reflection.

Needs only grpcio, grpcio-reflection and protobuf (not llmrpc itself):

    python examples/python/reflection_client.py --target 127.0.0.1:50051 \
        '{"text": "The capital of France is", "sampling": {"max_tokens": 8, "temperature": 0}}'

It prints the services the port offers, one line each, then streams Generate's
answers as JSON lines (the request is JSON too, as grpcurl takes it).
"""
from __future__ import annotations

import argparse
import json

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "llmrpc.v1.Generation"


def main() -> None:
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
        for response in generate(request):
            print(json.dumps(json_format.MessageToDict(response, preserving_proto_field_name=True)))


if __name__ == "__main__":
    main()
