"""The `llmrpc` command: serve the stack, run one service, or talk to a running server.

This is the only layer that reads flags (and, for containers, LLMRPC_* environment
variables); it builds the frozen configs and passes them down. Each flag sets the config
field its dest names, and `command_line` writes a config back as a command's flags: the
launcher starts every child that way, so a flag is declared once, here.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from llmrpc.engine.config import EngineConfig
    from llmrpc.services.auth import Security
    from llmrpc.services.launcher import GatewayConfig, ReplicaConfig, StackConfig
    from llmrpc.services.scheduler.server import SchedulerServiceConfig
    from llmrpc.services.tokenizer.server import TokenizerConfig
    from llmrpc.services.worker.server import WorkerConfig

T = TypeVar("T")

DEFAULT_TOKENIZER_PORT = 50051
DEFAULT_SCHEDULER_PORT = 50052
DEFAULT_WORKER_PORT = 50060
DEFAULT_HTTP_PORT = 8000
DEFAULT_OVERLAP_DEPTH = 2
DEFAULT_DECODE_STEPS = 1


def _env(name: str, default: Any) -> Any:
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


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low (bench/offline.py's int_list takes lists of them)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


_non_negative_int, _positive_int = int_at_least(0), int_at_least(1)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def default_cache_dir() -> Path:
    return Path(_env("cache_dir", str(Path.home() / ".cache" / "llmrpc"))).expanduser()


def resolve_model(model: str | None) -> str:
    """A local HF directory or .gguf file as given, a Hub id's cached snapshot; the default model when none."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            from llmrpc.engine.hub import HubModelError, parse_hub_id, resolve_hub_model

            if parse_hub_id(model) is None:
                raise SystemExit(f"--model: {model} does not exist (give a local HF directory, a .gguf file "
                                 "or a Hub id ORG/NAME[@REVISION])")
            try:
                return str(resolve_hub_model(model))
            except HubModelError as exc:
                raise SystemExit(f"--model: {exc}") from None
        return str(path.resolve())
    from llmrpc.engine.default_model import ensure_default_model

    return str(ensure_default_model(default_cache_dir()))


# ---- flags: each declared once, in the group or command that owns it ---------------------
#
# A flag's dest is the name of the config field it sets (EngineConfig, SchedulerServiceConfig,
# WorkerConfig, TokenizerConfig, Security), so the configs are built from the parsed flags by
# field name, and `command_line` writes a config back as the flags of the command that builds
# it: that is how `serve` starts each child. Adding a flag to a group and the field to its
# config is the whole change; tests/services/test_launcher.py proves that every flag of
# `serve` reaches the child that takes it.

Flags = list[argparse.Action]

# How a child runs `llmrpc`: this interpreter, so it runs this installation.
COMMAND = (sys.executable, "-m", "llmrpc.services.cli")


def _zero_is_none(text: str | int) -> int | None:
    """An int flag where 0 stands for None: off, unbounded, or the model's own value."""
    value = _non_negative_int(str(text))
    return value or None


def _targets(text: str) -> tuple[str, ...]:
    """Comma-separated targets (host:port or unix:path), in rank order."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


# How a value is written back as flag text where that is not str(value).
_TEXT: dict[Callable[..., Any], Callable[[Any], str]] = {
    _zero_is_none: lambda value: str(value or 0),
    _targets: ",".join,
}
# Given to a child by environment (LLMRPC_<FLAG>), out of the process list.
_SECRETS = frozenset({"api_key"})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=_env("log_level", "info"), choices=["debug", "info", "warning", "error"])
    p.add_argument("--trace", action="store_true", default=_env("trace", False),
                   help="print a timestamped TRACE line at each hop of every request (services/trace.py; "
                        "bench/trace_ttft.py reads them)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="model_path", default=_env("model", None),
                   help="local HF-layout directory, .gguf file or Hub id ORG/NAME (default: SmolLM2-135M-Instruct)")


def add_engine_flags(p: argparse.ArgumentParser) -> Flags:
    """How each worker rank runs the model: EngineConfig's fields (`serve` passes them to every rank)."""
    from llmrpc.engine.config import FLASHINFER_DECODE, FLASHINFER_PREFILL, KV_CACHE_DTYPES
    from llmrpc.kernels import attention_backend_names

    g = p.add_argument_group("engine", "how each worker rank runs the model")
    return [
        g.add_argument("--device", default=_env("device", "auto"), help="cpu, cuda, cuda:N or auto"),
        g.add_argument("--dtype", default=_env("dtype", "auto"), choices=["auto", "float32", "bfloat16", "float16"]),
        g.add_argument("--kv-cache-dtype", default=_env("kv_cache_dtype", "auto"), choices=KV_CACHE_DTYPES,
                       help="what the KV pages store: auto (the model dtype) or fp8_e4m3 (half of bf16's bytes: "
                            "twice the tokens in the pool)"),
        g.add_argument("--page-size", type=int, default=_env("page_size", 16)),
        g.add_argument("--max-total-tokens", type=_zero_is_none, default=_env("max_total_tokens", "0"),
                       help="cap the KV pool at this many tokens (0: size from memory)"),
        g.add_argument("--max-running-requests", dest="max_slots", type=int, metavar="N",
                       default=_env("max_running_requests", 256)),
        g.add_argument("--max-context", type=_zero_is_none, default=_env("max_context", "0"),
                       help="tokens of context per request, prompt and output (0: the model's max_position_embeddings)"),
        g.add_argument("--attention-backend", default=_env("attention_backend", "auto"),
                       choices=attention_backend_names()),
        g.add_argument("--flashinfer-prefill", default=_env("flashinfer_prefill", "auto"), choices=FLASHINFER_PREFILL,
                       help="FlashInfer's prefill kernels: fa3 (Hopper), fa2, or auto (fa3 on Hopper with a 16-bit "
                            "KV cache, else fa2)"),
        g.add_argument("--flashinfer-decode", default=_env("flashinfer_decode", "auto"), choices=FLASHINFER_DECODE,
                       help="FlashInfer's decode kernels: on tensor cores, on CUDA cores, or auto (tensor cores)"),
        g.add_argument("--cuda-graph-max-bs", type=int, default=_env("cuda_graph_max_bs", 256),
                       help="decode steps up to this many rows replay CUDA graphs (0: never)"),
        g.add_argument("--prefill-graph-max-tokens", type=_non_negative_int,
                       default=_env("prefill_graph_max_tokens", 4096),
                       help="prefill steps up to this many tokens replay CUDA graphs, piecewise around attention "
                            "(0: never): the host then launches ~4 ops a layer, not ~12"),
        g.add_argument("--gemv-max-rows", type=_non_negative_int, default=_env("gemv_max_rows", 2),
                       help="CUDA linears of up to this many rows (decode at small batch) run a Triton GEMV with the "
                            "norm or SiLU before them folded in, instead of cuBLAS, where their weights are small "
                            "enough to gain (kernels/fused.py); 0: never, at most 16"),
        g.add_argument("--fused-decode-max-rows", type=_non_negative_int, default=_env("fused_decode_max_rows", 2),
                       help="CUDA-graphed decode steps of up to this many rows run each layer's attention as one "
                            "Triton kernel (Q/K norm, RoPE, K/V store, split-KV attention and its merge) instead of "
                            "FlashInfer's decode and the kernels around it (kernels/triton_decode.py); counted in "
                            "captured graph sizes (1, 2, 4, 8, 16: 3 acts as 2); 0: never, at most 16"),
        g.add_argument("--load-format", default=_env("load_format", "auto"),
                       choices=["auto", "safetensors", "gguf", "dummy"]),
        g.add_argument("--tp", dest="tp_size", type=int, metavar="N", default=_env("tp", 1), help="tensor-parallel ranks"),
        g.add_argument("--dist-init-addr", default=_env("dist_init_addr", None),
                       help="HOST:PORT where rank 0 hosts the ranks' rendezvous (--tp > 1; serve picks a free port)"),
        g.add_argument("--seed", type=int, default=_env("seed", 0)),
    ]


def add_scheduler_flags(p: argparse.ArgumentParser) -> Flags:
    """How the scheduler batches and admits: SchedulerServiceConfig's fields (`serve` passes them on)."""
    from llmrpc.services.scheduler.config import SCHEDULE_POLICIES

    g = p.add_argument_group("scheduler", "how the scheduler batches and admits requests")
    return [
        g.add_argument("--max-prefill-tokens", type=int, default=_env("max_prefill_tokens", 8192)),
        g.add_argument("--schedule-policy", default=_env("schedule_policy", "fcfs"), choices=SCHEDULE_POLICIES),
        g.add_argument("--check-kv-invariants", dest="check_invariants", action="store_true",
                       default=_env("check_kv_invariants", False), help="check the KV page accounting after every step"),
        g.add_argument("--disable-radix-cache", action="store_true", default=_env("disable_radix_cache", False),
                       help="no prefix sharing between requests: every prompt is computed in full"),
        g.add_argument("--overlap-depth", type=_non_negative_int,
                       default=_env("overlap_depth", DEFAULT_OVERLAP_DEPTH),
                       help="steps sent to the worker ahead of the oldest unread result (deeper hides the round "
                            "trip from single streams; a finish is then seen that many steps late)"),
        g.add_argument("--decode-steps", type=_positive_int, default=_env("decode_steps", DEFAULT_DECODE_STEPS),
                       help="decode passes one step may run back to back on the worker (multi-step decode: the "
                            "round trip is paid once per k tokens; a finish is seen up to k tokens late)"),
        g.add_argument("--disable-overlap", action="store_true", default=_env("disable_overlap", False),
                       help="one step at a time (--overlap-depth 0), for ablation"),
        g.add_argument("--max-queued-requests", type=int, default=_env("max_queued_requests", 1024),
                       help="waiting requests beyond this are refused at once with RESOURCE_EXHAUSTED (0: no bound)"),
        g.add_argument("--max-prompt-tokens", type=int, default=_env("max_prompt_tokens", 0),
                       help="refuse longer prompts with INVALID_ARGUMENT (0: only the context length bounds them)"),
    ]


def _add_http(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=_zero_is_none, default=_env("http_port", str(DEFAULT_HTTP_PORT)),
                   help="OpenAI-compatible HTTP on the tokenizer's host (0: off)")


def add_answer_flags(p: argparse.ArgumentParser) -> Flags:
    """How the OpenAI chat answers are read: TokenizerConfig's parser fields (`serve` passes them on)."""
    from llmrpc.services.tokenizer.reasoning import REASONING_PARSER_CHOICES
    from llmrpc.services.tokenizer.tool_parsers import TOOL_PARSER_CHOICES

    g = p.add_argument_group("answers", "how the OpenAI chat answers are read")
    return [
        g.add_argument("--tool-call-parser", default=_env("tool_call_parser", "auto"), choices=TOOL_PARSER_CHOICES,
                       help="the tool-call format of the model's output (auto: from its chat template, hermes "
                            "when it shows none)"),
        g.add_argument("--reasoning-parser", default=_env("reasoning_parser", "none"),
                       choices=REASONING_PARSER_CHOICES,
                       help="split <think>...</think> off as reasoning_content (auto: qwen3 when the chat "
                            "template mentions <think>)"),
    ]


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


@functools.cache
def _dests(add_group: Callable[[argparse.ArgumentParser], Flags]) -> tuple[str, ...]:
    return tuple(action.dest for action in add_group(argparse.ArgumentParser(add_help=False)))


def _values(args: argparse.Namespace, add_group: Callable[[argparse.ArgumentParser], Flags]) -> dict[str, Any]:
    """The parsed values of the flags that `add_group` declares, by dest (a config field)."""
    return {dest: getattr(args, dest) for dest in _dests(add_group)}


# ---- configs from flags ----------------------------------------------------------------------


def _security(args: argparse.Namespace) -> Security:
    from llmrpc.services.auth import Security

    return Security(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=getattr(args, "tls_ca", None),
                    api_key=getattr(args, "api_key", None))


def gpu_index(replica: int, rank: int, tp_size: int, device_count: int) -> int:
    """Replica r's rank k runs on GPU r * tp + k: one GPU per rank, each replica's TP group on
    consecutive GPUs; a host that shows fewer GPUs (a container that sees only its own) wraps around."""
    return (replica * tp_size + rank) % max(1, device_count)


def _device(device: str, tp_size: int, rank: int, replica: int = 0, replicas: int = 1) -> str:
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and tp_size * replicas > 1:
        import torch

        device = f"cuda:{gpu_index(replica, rank, tp_size, torch.cuda.device_count())}"
    return device


def engine_options(args: argparse.Namespace, rank: int = 0, replica: int = 0, **overrides: Any) -> dict[str, Any]:
    """EngineConfig's fields but model_path, from the engine flags: rank `rank` of replica `replica`
    (of serve's --replicas), the device resolved."""
    values = {**_values(args, add_engine_flags), **overrides, "tp_rank": rank}
    values["device"] = _device(values["device"], values["tp_size"], rank, replica, getattr(args, "replicas", 1))
    return values


def engine_config(args: argparse.Namespace, model_path: str, rank: int = 0, replica: int = 0,
                  **overrides: Any) -> EngineConfig:
    from llmrpc.engine.config import EngineConfig

    return EngineConfig(model_path=model_path, **engine_options(args, rank, replica, **overrides))


def scheduler_config(args: argparse.Namespace, **where: Any) -> SchedulerServiceConfig:
    """From the scheduler flags; `where` (workers, host, port, security) says where it runs."""
    from llmrpc.services.scheduler.server import SchedulerServiceConfig

    values = _values(args, add_scheduler_flags)
    if values.pop("disable_overlap"):
        values["overlap_depth"] = 0
    return SchedulerServiceConfig(**values, **where)


def tokenizer_config(args: argparse.Namespace, **where: Any) -> TokenizerConfig:
    """From the public port's flags; `where` (model_path, host, port, scheduler) says where it runs."""
    from llmrpc.services.tokenizer.server import TokenizerConfig

    return TokenizerConfig(http_port=args.http_port, max_receive_bytes=args.max_receive_bytes,
                           security=_security(args), **_values(args, add_answer_flags), **where)


def _worker_command_config(args: argparse.Namespace) -> WorkerConfig:
    """What `llmrpc worker` runs."""
    from llmrpc.services.worker.server import WorkerConfig

    return WorkerConfig(engine=engine_config(args, resolve_model(args.model_path), args.tp_rank),
                        host=args.host, port=args.port, unix_socket=args.unix_socket, security=_security(args))


def _scheduler_command_config(args: argparse.Namespace) -> SchedulerServiceConfig:
    """What `llmrpc scheduler` runs."""
    return scheduler_config(args, workers=args.workers, host=args.host, port=args.port, security=_security(args))


def _tokenizer_command_config(args: argparse.Namespace) -> TokenizerConfig:
    """What `llmrpc tokenizer` runs."""
    return tokenizer_config(args, model_path=resolve_model(args.model_path), host=args.host, port=args.port,
                            scheduler=args.scheduler)


def service_config(args: argparse.Namespace) -> WorkerConfig | SchedulerServiceConfig | TokenizerConfig:
    """What `llmrpc worker|scheduler|tokenizer` runs, from its parsed flags."""
    if args.command == "worker":
        return _worker_command_config(args)
    if args.command == "scheduler":
        return _scheduler_command_config(args)
    return _tokenizer_command_config(args)


def replica_config(args: argparse.Namespace, model_path: str, socket_dir: str, replica: int, *,
                   scheduler_port: int, worker_port: int) -> ReplicaConfig:
    """Replica `replica`'s worker ranks (engine flags) behind its scheduler (scheduler flags), on this host.

    The stack's ranks are numbered across replicas: replica r's rank k is the stack's rank
    i = r * tp + k, on `worker_port` + i, a unix socket worker<i>.sock in `socket_dir` and GPU i
    (`gpu_index`); replica r's scheduler is on `scheduler_port` + r.
    """
    from llmrpc.services.launcher import ReplicaConfig
    from llmrpc.services.rpc import free_port
    from llmrpc.services.worker.server import WorkerConfig

    tp = args.tp_size
    first = replica * tp
    # Rank 0 hosts the rendezvous; a restarted group meets at the same address.
    dist_init_addr = args.dist_init_addr or (f"127.0.0.1:{free_port()}" if tp > 1 else None)
    workers = tuple(
        WorkerConfig(engine=engine_config(args, model_path, rank, replica, dist_init_addr=dist_init_addr),
                     port=worker_port + first + rank,
                     unix_socket=str(Path(socket_dir) / f"worker{first + rank}.sock"))
        for rank in range(tp))
    scheduler = scheduler_config(args, workers=tuple(f"unix:{w.unix_socket}" for w in workers),
                                 port=scheduler_port + replica)
    return ReplicaConfig(workers=workers, scheduler=scheduler)


def stack_config(args: argparse.Namespace, model_path: str, socket_dir: str, *, scheduler_port: int,
                 worker_port: int, tokenizer: TokenizerConfig | None = None, gateway: GatewayConfig | None = None,
                 replicas: int = 1, log_level: str = "info", trace: bool = False) -> StackConfig:
    """`replicas` replicas (`replica_config`) on this host, and the front door `tokenizer` or `gateway` if given."""
    from llmrpc.services.launcher import StackConfig

    return StackConfig(replicas=tuple(replica_config(args, model_path, socket_dir, r, scheduler_port=scheduler_port,
                                                     worker_port=worker_port) for r in range(replicas)),
                       tokenizer=tokenizer, gateway=gateway, log_level=log_level, trace=trace)


def _smg_command() -> str:
    """The smg executable; without it `serve --replicas` ends here, before anything starts."""
    from llmrpc.services.launcher import SMG_INSTALL, find_smg

    command = find_smg()
    if command is None:
        raise SystemExit("llmrpc serve --replicas: the SMG gateway (`smg`) is not installed: "
                         f"{SMG_INSTALL} (or llmrpc's test extra), or put `smg` on PATH")
    return command


def serve_config(args: argparse.Namespace, socket_dir: str) -> StackConfig:
    """What `llmrpc serve` runs: the public port on --host/--port, the internal links on this host.

    With --replicas N > 1 the public port is SMG's OpenAI HTTP on --host/--http-port, in front of
    the N replicas' schedulers; llmrpc's own front (--port) is not started, since it would reach
    only one replica.
    """
    from llmrpc.services.launcher import GatewayConfig
    from llmrpc.services.rpc import free_port

    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas == 1:
        model_path = resolve_model(args.model_path)
        tokenizer = tokenizer_config(args, model_path=model_path, host=args.host, port=args.port,
                                     scheduler=f"127.0.0.1:{args.scheduler_port}")
        return stack_config(args, model_path, socket_dir, scheduler_port=args.scheduler_port,
                            worker_port=args.worker_port, tokenizer=tokenizer, log_level=args.log_level,
                            trace=args.trace)
    command = _smg_command()
    if args.dist_init_addr:
        raise ValueError("--dist-init-addr names one TP group's rendezvous; with --replicas each replica's "
                         "group gets a free port of its own: leave it out")
    if not args.http_port:
        raise ValueError("--replicas needs --http-port: it is the gateway's OpenAI HTTP port")
    if args.tls_cert or args.api_key:
        raise ValueError("--tls-cert and --api-key are not supported with --replicas yet (SMG is the public port)")
    model_path = resolve_model(args.model_path)
    gateway = GatewayConfig(command=command, model_path=model_path, host=args.host, port=args.http_port,
                            schedulers=tuple(f"127.0.0.1:{args.scheduler_port + r}" for r in range(args.replicas)),
                            metrics_port=free_port(), log_level={"warning": "warn"}.get(args.log_level, args.log_level))
    return stack_config(args, model_path, socket_dir, scheduler_port=args.scheduler_port,
                        worker_port=args.worker_port, gateway=gateway, replicas=args.replicas,
                        log_level=args.log_level, trace=args.trace)


def _configured(build: Callable[..., T], args: argparse.Namespace, *extra: Any) -> T:
    """`build(args, *extra)`; a value no config accepts ends the command with its message."""
    try:
        return build(args, *extra)
    except ValueError as exc:  # e.g. --tp 2 without --dist-init-addr, LLMRPC_OVERLAP_DEPTH=-1
        raise SystemExit(f"llmrpc {args.command}: {exc}") from None


# ---- configs back to flags -------------------------------------------------------------------


def _fields(config: Any) -> dict[str, Any]:
    """A config's fields by name, the fields of the configs inside it included."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        inner = _fields(value) if dataclasses.is_dataclass(value) else {f.name: value}
        if found.keys() & inner.keys():
            raise ValueError(f"{type(config).__name__}: {sorted(found.keys() & inner.keys())} name two fields")
        found.update(inner)
    return found


def command_line(command: str, config: Any, log_level: str = "info",
                 trace: bool = False) -> tuple[list[str], dict[str, str]]:
    """`llmrpc COMMAND` with the flags that make it build `config` again, and the environment it needs.

    Every flag of COMMAND whose dest names a field of `config` (or of a config inside it) is
    given that field's value; a secret goes by environment instead, out of the process list.
    """
    values = {**_fields(config), "log_level": log_level, "trace": trace}
    argv, env = [*COMMAND, command], {}
    for action in command_parser(command)._actions:
        if not action.option_strings or action.dest not in values:
            continue
        flag, value = action.option_strings[0], values[action.dest]
        if action.dest in _SECRETS:
            if value is not None:
                env["LLMRPC_" + flag.lstrip("-").replace("-", "_").upper()] = str(value)
        elif action.nargs == 0:  # a switch: given when on
            if value is True and action.const is True:
                argv.append(flag)
        elif action.type in _TEXT:
            argv += [flag, _TEXT[action.type](value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv, env


# ---- commands ------------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> None:
    from llmrpc.services.worker.server import serve

    asyncio.run(serve(_configured(_worker_command_config, args)))


def cmd_scheduler(args: argparse.Namespace) -> None:
    from llmrpc.services.scheduler.server import serve

    asyncio.run(serve(_configured(_scheduler_command_config, args)))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from llmrpc.services.tokenizer.server import serve

    asyncio.run(serve(_configured(_tokenizer_command_config, args)))


def cmd_serve(args: argparse.Namespace) -> None:
    from llmrpc.services.launcher import Launcher

    with tempfile.TemporaryDirectory(prefix="llmrpc-") as socket_dir:  # the workers' unix sockets
        Launcher(_configured(serve_config, args, socket_dir)).run()


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
    print(resolve_model(args.model_path))  # fetches and converts the default model into the cache once


def cmd_health(args: argparse.Namespace) -> None:
    from llmrpc.services.client import check_health

    serving = check_health(args.target, timeout=args.timeout)
    print("SERVING" if serving else "NOT_SERVING")
    raise SystemExit(0 if serving else 1)


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="llmrpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start tokenizer, scheduler and worker(s) as local processes")
    _add_common(p); _add_model(p); add_engine_flags(p); add_scheduler_flags(p)
    p.add_argument("--host", default=_env("host", "127.0.0.1"),
                   help="address of the public ports (the tokenizer's, or with --replicas the gateway's)")
    p.add_argument("--port", type=int, default=_env("port", DEFAULT_TOKENIZER_PORT),
                   help="llmrpc.v1.Generation (gRPC); not started with --replicas > 1, where SMG is the front door")
    _add_http(p)
    p.add_argument("--scheduler-port", type=int, default=_env("scheduler_port", DEFAULT_SCHEDULER_PORT),
                   help="replica r's scheduler listens on this port + r")
    p.add_argument("--worker-port", type=int, default=_env("worker_port", DEFAULT_WORKER_PORT),
                   help="replica r's rank k listens on this port + r * tp + k")
    p.add_argument("--replicas", type=int, metavar="N", default=_env("replicas", 1),
                   help="N replicas (each --tp ranks and a scheduler; on CUDA replica r's rank k on GPU r * tp + k) "
                        "behind the SMG gateway (`smg launch --policy cache_aware`, pip install smg), whose "
                        "OpenAI HTTP is on --host/--http-port; 1: no gateway, llmrpc's own front")
    add_answer_flags(p)
    _add_security(p, public=True, internal_links=False)  # the public port; internal links are local sockets
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one worker rank")
    _add_common(p); _add_model(p); add_engine_flags(p)
    p.add_argument("--rank", dest="tp_rank", type=int, metavar="R", default=_env("rank", 0))
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("port", DEFAULT_WORKER_PORT))
    p.add_argument("--unix-socket", default=_env("unix_socket", None), help="also listen on this unix socket path")
    _add_security(p, public=False)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("scheduler", help="run the scheduler")
    _add_common(p); add_scheduler_flags(p)
    p.add_argument("--workers", type=_targets, default=_env("workers", f"127.0.0.1:{DEFAULT_WORKER_PORT}"),
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
    add_answer_flags(p)
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
    return parser, sub.choices


def build_parser() -> argparse.ArgumentParser:
    return _build_parser()[0]


@functools.cache
def command_parser(command: str) -> argparse.ArgumentParser:
    """`llmrpc COMMAND`'s parser, for the flags it declares (their defaults are this process's)."""
    return _build_parser()[1][command]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.trace:
        from llmrpc.services import trace

        trace.enable()
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
