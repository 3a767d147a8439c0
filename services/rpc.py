"""What every llmrpc gRPC server shares: health, reflection, binding, message limits, security.

Each service builds its servicer, then calls `start_server`; the health status
stays NOT_SERVING until the service calls `set_serving(True)`. Internal links
(scheduler <-> worker steps) allow 64 MiB messages; public ports receive at most
`PUBLIC_MAX_RECEIVE_BYTES` unless configured otherwise, so one client cannot make
the front door buffer a huge request.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmrpc.services.auth import ApiKeyInterceptor, Security

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PUBLIC_MAX_RECEIVE_BYTES = 16 * 1024 * 1024  # default receive limit of the public (client-facing) ports

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


@dataclass
class Server:
    """A started grpc.aio server with its health servicer."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0  # the bound TCP port (useful with port 0); 0 for unix sockets

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)


async def start_server(
    addresses: str | list[str],
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    security: Security | None = None,
    require_client_cert: bool = True,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> Server:
    """Binds each address (host:port or unix:path), registers servicers, health and reflection.

    `security`: TLS on the TCP addresses (mutual when it has a CA and `require_client_cert`),
    and the API key checked on every call but health. Unix sockets stay plain: only
    processes on this host, with file access to the socket, can reach them.
    """
    security = security or Security()
    options = [o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", max_receive_bytes))
    interceptors = [ApiKeyInterceptor(security.api_key)] if security.api_key else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    credentials = security.server_credentials(require_client_cert)
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    if isinstance(addresses, str):
        addresses = [addresses]
    port = 0
    for address in addresses:
        if credentials is not None and not address.startswith("unix:"):
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
        if bound == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot bind {address}")
        port = port or bound
    await server.start()
    result = Server(server, health_servicer, names, addresses[0], port)
    await result.set_serving(False)
    return result


def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """An aio channel with llmrpc's message limits and keepalives; TLS when given credentials."""
    if credentials is not None and not target.startswith("unix:"):
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may still take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
