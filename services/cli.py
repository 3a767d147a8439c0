"""The `llmrpc` command: serve the stack, run one service, or talk to a running server.

This is the only layer that reads flags (and, for containers, LLMRPC_* environment
variables); it builds the frozen configs and passes them down.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

DEFAULT_TOKENIZER_PORT = 50051
DEFAULT_SCHEDULER_PORT = 50052
DEFAULT_WORKER_PORT = 50060
DEFAULT_HTTP_PORT = 8000
DEFAULT_OVERLAP_DEPTH = 2


def _env(name: str, default: object) -> object:
    """Flags default to LLMRPC_<NAME> when set, so compose files can configure by environment."""
    value = os.environ.get(f"LLMRPC_{name.upper()}")
    if value is None:
        return default
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def default_cache_dir() -> Path:
    return Path(_env("cache_dir", str(Path.home() / ".cache" / "llmrpc"))).expanduser()


def resolve_model(model: str | None) -> str:
    """A local HF directory or .gguf file as given; the default model when none."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise SystemExit(f"--model: {model} does not exist (give a local HF directory or a .gguf file)")
        return str(path.resolve())
    from llmrpc.engine.default_model import ensure_default_model

    return str(ensure_default_model(default_cache_dir()))


# ---- argument groups shared by `serve` and the single-service commands -----------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=_env("log_level", "info"), choices=["debug", "info", "warning", "error"])


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_env("model", None),
                   help="local HF-layout directory or .gguf file (default: SmolLM2-135M-Instruct)")


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=_env("device", "auto"), help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=_env("dtype", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--page-size", type=int, default=_env("page_size", 16))
    p.add_argument("--max-total-tokens", type=int, default=_env("max_total_tokens", 0),
                   help="cap the KV pool at this many tokens (0: size from memory)")
    p.add_argument("--max-running-requests", type=int, default=_env("max_running_requests", 256))
    from llmrpc.kernels import attention_backend_names

    p.add_argument("--attention-backend", default=_env("attention_backend", "auto"), choices=attention_backend_names())
    p.add_argument("--cuda-graph-max-bs", type=int, default=_env("cuda_graph_max_bs", 256),
                   help="decode steps up to this many rows replay CUDA graphs (0: never)")
    p.add_argument("--load-format", default=_env("load_format", "auto"),
                   choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--tp", type=int, default=_env("tp", 1), help="tensor-parallel ranks")
    p.add_argument("--dist-init-addr", default=_env("dist_init_addr", None),
                   help="HOST:PORT where rank 0 hosts the ranks' rendezvous (--tp > 1; serve picks a free port)")
    p.add_argument("--seed", type=int, default=_env("seed", 0))


def _add_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-prefill-tokens", type=int, default=_env("max_prefill_tokens", 8192))
    p.add_argument("--schedule-policy", default=_env("schedule_policy", "fcfs"), choices=["fcfs", "lpm"])
    p.add_argument("--check-kv-invariants", action="store_true", default=_env("check_kv_invariants", False))
    p.add_argument("--overlap-depth", type=_non_negative_int,
                   default=_env("overlap_depth", DEFAULT_OVERLAP_DEPTH),
                   help="steps sent to the worker ahead of the oldest unread result (deeper hides the round "
                        "trip from single streams; a finish is then seen that many steps late)")
    p.add_argument("--disable-overlap", action="store_true", default=_env("disable_overlap", False),
                   help="one step at a time (--overlap-depth 0), for ablation")
    p.add_argument("--max-queued-requests", type=int, default=_env("max_queued_requests", 1024),
                   help="waiting requests beyond this are refused at once with RESOURCE_EXHAUSTED (0: no bound)")
    p.add_argument("--max-prompt-tokens", type=int, default=_env("max_prompt_tokens", 0),
                   help="refuse longer prompts with INVALID_ARGUMENT (0: only the context length bounds them)")


def _add_http(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=_env("http_port", DEFAULT_HTTP_PORT),
                   help="OpenAI-compatible HTTP on the tokenizer's host (0: off)")


def _add_security(p: argparse.ArgumentParser, public: bool, internal_links: bool = True) -> None:
    """TLS flags; `public` adds the API key and receive limit; `internal_links` the mTLS CA."""
    p.add_argument("--tls-cert", default=_env("tls_cert", None), help="PEM certificate this service presents")
    p.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key of --tls-cert")
    if internal_links:
        p.add_argument("--tls-ca", default=_env("tls_ca", None),
                   help="PEM CA for the internal links: calls to the next service use TLS verified by it"
                            + ("" if public else ", and clients of this port must present a cert it signed (mTLS)"))
    if public:
        p.add_argument("--api-key", default=_env("api_key", None),
                       help="require `authorization: Bearer <key>` on every call (gRPC metadata and HTTP)")
        p.add_argument("--max-receive-bytes", type=int, default=_env("max_receive_bytes", 16 * 1024 * 1024),
                       help="largest request message the public port accepts")


def _security(args: argparse.Namespace):
    from llmrpc.services.auth import Security

    return Security(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=getattr(args, "tls_ca", None),
                    api_key=getattr(args, "api_key", None))


def _engine_config(args: argparse.Namespace, model_path: str, rank: int):
    from llmrpc.engine.config import EngineConfig

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and args.tp > 1:
        import torch

        # One GPU per rank; a container that sees only its own GPU gets cuda:0.
        device = f"cuda:{rank % max(1, torch.cuda.device_count())}"
    return EngineConfig(
        model_path=model_path,
        device=device,
        dtype=args.dtype,
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens or None,
        max_slots=args.max_running_requests,
        attention_backend=args.attention_backend,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        load_format=args.load_format,
        seed=args.seed,
        tp_rank=rank,
        tp_size=args.tp,
        dist_init_addr=args.dist_init_addr,
    )


# ---- single services ------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> None:
    from llmrpc.services.worker.server import WorkerConfig, serve

    try:
        engine = _engine_config(args, resolve_model(args.model), args.rank)
    except ValueError as exc:  # e.g. --tp 2 without --dist-init-addr
        raise SystemExit(f"llmrpc worker: {exc}") from None
    config = WorkerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        unix_socket=args.unix_socket,
        security=_security(args),
    )
    asyncio.run(serve(config))


def cmd_scheduler(args: argparse.Namespace) -> None:
    from llmrpc.services.scheduler.server import SchedulerServiceConfig, serve

    try:
        config = SchedulerServiceConfig(
            workers=tuple(w.strip() for w in args.workers.split(",") if w.strip()),
            host=args.host,
            port=args.port,
            max_prefill_tokens=args.max_prefill_tokens,
            schedule_policy=args.schedule_policy,
            check_invariants=args.check_kv_invariants,
            overlap_depth=0 if args.disable_overlap else args.overlap_depth,
            max_queued_requests=args.max_queued_requests,
            max_prompt_tokens=args.max_prompt_tokens,
            security=_security(args),
        )
    except ValueError as exc:  # e.g. LLMRPC_OVERLAP_DEPTH=-1
        raise SystemExit(f"llmrpc scheduler: {exc}") from None
    asyncio.run(serve(config))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from llmrpc.services.tokenizer.server import TokenizerConfig, serve

    config = TokenizerConfig(
        host=args.host,
        port=args.port,
        scheduler=args.scheduler,
        model_path=resolve_model(args.model),
        max_receive_bytes=args.max_receive_bytes,
        security=_security(args),
        http_port=args.http_port or None,  # 0 turns HTTP off
    )
    asyncio.run(serve(config))


def cmd_serve(args: argparse.Namespace) -> None:
    from llmrpc.services.launcher import Launcher

    model_path = resolve_model(args.model)
    Launcher(args, model_path).run()


def cmd_generate(args: argparse.Namespace) -> None:
    from llmrpc.services.client import generate_text

    async def run() -> None:
        async for piece in generate_text(args.target, args.text, max_tokens=args.max_tokens,
                                         temperature=args.temperature, chat=not args.raw):
            print(piece, end="", flush=True)
        print()

    asyncio.run(run())


def cmd_chat(args: argparse.Namespace) -> None:
    from llmrpc.services.client import chat_repl

    asyncio.run(chat_repl(args.target, max_tokens=args.max_tokens, temperature=args.temperature))


def cmd_download(args: argparse.Namespace) -> None:
    print(resolve_model(args.model))  # fetches and converts the default model into the cache once


def cmd_health(args: argparse.Namespace) -> None:
    from llmrpc.services.client import check_health

    serving = check_health(args.target, timeout=args.timeout)
    print("SERVING" if serving else "NOT_SERVING")
    raise SystemExit(0 if serving else 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start tokenizer, scheduler and worker(s) as local processes")
    _add_common(p); _add_model(p); _add_engine(p); _add_scheduler(p)
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address of the public tokenizer port")
    p.add_argument("--port", type=int, default=_env("port", DEFAULT_TOKENIZER_PORT))
    _add_http(p)
    p.add_argument("--scheduler-port", type=int, default=_env("scheduler_port", DEFAULT_SCHEDULER_PORT))
    p.add_argument("--worker-port", type=int, default=_env("worker_port", DEFAULT_WORKER_PORT),
                   help="rank r listens on this port + r")
    _add_security(p, public=True, internal_links=False)  # the public port; internal links are local sockets
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one worker rank")
    _add_common(p); _add_model(p); _add_engine(p)
    p.add_argument("--rank", type=int, default=_env("rank", 0))
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("port", DEFAULT_WORKER_PORT))
    p.add_argument("--unix-socket", default=_env("unix_socket", None), help="also listen on this unix socket path")
    _add_security(p, public=False)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("scheduler", help="run the scheduler")
    _add_common(p); _add_scheduler(p)
    p.add_argument("--workers", default=_env("workers", f"127.0.0.1:{DEFAULT_WORKER_PORT}"),
                   help="comma-separated worker targets in rank order (host:port or unix:path)")
    _add_security(p, public=False)
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("port", DEFAULT_SCHEDULER_PORT))
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("tokenizer", help="run the public front door")
    _add_common(p); _add_model(p)
    p.add_argument("--scheduler", default=_env("scheduler", f"127.0.0.1:{DEFAULT_SCHEDULER_PORT}"))
    _add_security(p, public=True)
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("port", DEFAULT_TOKENIZER_PORT))
    _add_http(p)
    p.set_defaults(func=cmd_tokenizer)

    for name, func, help_ in (("generate", cmd_generate, "stream a completion to the terminal"),
                              ("chat", cmd_chat, "interactive multi-turn chat")):
        p = sub.add_parser(name, help=help_)
        _add_common(p)
        if name == "generate":
            p.add_argument("text")
            p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
        p.add_argument("--target", default=_env("target", f"127.0.0.1:{DEFAULT_TOKENIZER_PORT}"))
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.7)
        p.set_defaults(func=func)

    p = sub.add_parser("download", help="fetch and convert the model into the cache, print its directory")
    _add_common(p); _add_model(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("health", help="exit 0 when HOST:PORT reports SERVING (container health checks)")
    _add_common(p)
    p.add_argument("target")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
