"""Streams one generation from llmrpc's public gRPC port with the compiled stubs (`llmrpc.v1`).

    .venv/bin/python examples/python/generate.py "Write a haiku about gRPC." --target 127.0.0.1:50051

Text goes to stdout as it arrives; the finish reason and usage go to stderr.
"""
from __future__ import annotations

import argparse
import sys

import grpc

from llmrpc.v1 import generation_pb2, generation_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Write a haiku about gRPC.")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--text", action="store_true", help="a raw text completion instead of a chat turn")
    args = parser.parse_args()

    request = generation_pb2.GenerateRequest(
        sampling=generation_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))
    if args.text:
        request.text = args.prompt
    else:
        request.chat.messages.add(role="user", content=args.prompt)

    with grpc.insecure_channel(args.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            for response in stub.Generate(request):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                if response.finish_reason:
                    reason = generation_pb2.FinishReason.Name(response.finish_reason)
                    print(f"\n[{reason}] prompt_tokens={response.usage.prompt_tokens} "
                          f"completion_tokens={response.usage.completion_tokens}", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name} {exc.details()}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
