"""Who may talk to a port: TLS credentials and the API key (a bearer token).

One `Security` per service, built by the CLI. The public ports (the tokenizer's
gRPC and HTTP) take an optional server certificate and API key; the internal
ports (scheduler, workers) can require mutual TLS: with `tls_ca` set they accept
only clients whose certificate that CA signed, and their own outgoing channels
present `tls_cert` as the client certificate.

The key check is one function, `bearer_ok`, so the gRPC interceptor here and the
HTTP server check exactly the same thing: HTTP calls
`bearer_ok(request.headers.get("authorization"), api_key)` and answers 401 when false.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc

# Health stays open so probes (`llmrpc health`, compose, kubelet) work without the key.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


@dataclass(frozen=True)
class Security:
    tls_cert: str | None = None  # PEM certificate chain this service presents
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_ca: str | None = None  # PEM CA: clients of this port must present a cert it signed (mTLS)
    api_key: str | None = None  # required as `authorization: Bearer <key>` on every call

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key (this service's own certificate)")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials | None:
        """None: plain TCP. With `require_client_cert` and a CA: mutual TLS."""
        if not self.tls:
            return None
        pair = [(_read(self.tls_key), _read(self.tls_cert))]
        if require_client_cert and self.tls_ca:
            return grpc.ssl_server_credentials(pair, root_certificates=_read(self.tls_ca),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For this service's calls to the next one: TLS when a CA is given, presenting our own cert."""
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca), private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def bearer_ok(authorization: str | None, api_key: str | None) -> bool:
    """True when no key is configured, or `authorization` is exactly `Bearer <api_key>`."""
    if not api_key:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    # Constant-time compare: the time taken must not leak how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the bearer token with UNAUTHENTICATED (health excepted)."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if bearer_ok(authorization, self._api_key):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED without running the method."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key (authorization: Bearer <key>)")

    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
