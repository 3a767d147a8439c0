"""Service-test fixtures: a tiny random Llama with the default model's tokenizer, single
service processes (the launcher's ServiceProcess) that a test can kill precisely, and test certificates.
"""
from __future__ import annotations

import datetime
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmrpc.bench.tiny_model import build_tiny_llama
from llmrpc.services.cli import COMMAND
from llmrpc.services.launcher import ServiceProcess
from llmrpc.services.local_stack import LocalStack
from llmrpc.services.rpc import free_port
from tests.conftest import start_stack


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """llmrpc.bench.tiny_model's random Llama with a 2,048-token context."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir, 2048)


TINY_MAX_PROMPT_TOKENS = 1024
TINY_MAX_RECEIVE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> LocalStack:
    """`llmrpc serve` on the tiny model: 128 slots, 1024 KV pages of 16 tokens, small input limits."""
    stack = start_stack(tmp_path_factory.mktemp("tiny-stack"), tiny_model,
                        "--max-running-requests", "128", "--max-total-tokens", "16384",
                        "--max-prompt-tokens", str(TINY_MAX_PROMPT_TOKENS),
                        "--max-receive-bytes", str(TINY_MAX_RECEIVE_BYTES))
    yield stack
    stack.stop()


def service(tmp: Path, name: str, *argv: object) -> ServiceProcess:
    """`llmrpc NAME --port P ARGV...` on a free port P, in its own process group, logging under `tmp`."""
    port = free_port()
    return ServiceProcess(name, [*COMMAND, name, "--port", str(port), *map(str, argv)], f"127.0.0.1:{port}",
                          log_path=tmp / f"{name}-{port}.log", own_group=True)


def health_status(target: str, credentials: grpc.ChannelCredentials | None = None, timeout: float = 1.0) -> str:
    """SERVING / NOT_SERVING, or DOWN when the port does not answer."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return "DOWN"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def wait_status(svc: ServiceProcess, status: str, credentials: grpc.ChannelCredentials | None = None,
                timeout: float = 120.0) -> float:
    """Polls until `svc` reports `status`; returns the seconds it took."""
    start = time.monotonic()
    while (now := health_status(svc.target, credentials)) != status:
        if svc.process is not None and svc.process.poll() is not None and status != "DOWN":
            raise RuntimeError(f"{svc.name} exited:\n{svc.log()[-3000:]}")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{svc.name} still {now}, not {status}, after {timeout} s:\n{svc.log()[-3000:]}")
        time.sleep(0.05)
    return time.monotonic() - start


@dataclass(frozen=True)
class Certificates:
    """A test CA and one leaf certificate for 127.0.0.1/localhost, good for server and client auth."""

    ca: Path
    cert: Path
    key: Path

    def channel_credentials(self, client_cert: bool = True) -> grpc.ChannelCredentials:
        if client_cert:
            return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())
        return grpc.ssl_channel_credentials(self.ca.read_bytes())


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    path = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("llmrpc test CA")).issuer_name(name("llmrpc test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (path / "cert.pem").write_bytes(leaf.public_bytes(pem))
    (path / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return Certificates(path / "ca.pem", path / "cert.pem", path / "key.pem")
