"""What every llmrpc gRPC server shares: health, reflection, binding, message limits.

Each service builds its servicer, then calls `start_server`; the health status
stays NOT_SERVING until the service calls `set_serving(True)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

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
) -> Server:
    """Binds each address (host:port or unix:path), registers servicers, health and reflection."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
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
        bound = server.add_insecure_port(address)
        if bound == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot bind {address}")
        port = port or bound
    await server.start()
    result = Server(server, health_servicer, names, addresses[0], port)
    await result.set_serving(False)
    return result


def channel(target: str) -> grpc.aio.Channel:
    """An insecure aio channel with llmrpc's message limits and keepalives."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
