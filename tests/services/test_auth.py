"""The API-key check shared by the gRPC interceptor and the HTTP server, and Security's rules."""
from __future__ import annotations

import pytest

from llmrpc.services.auth import Security, bearer_ok


@pytest.mark.parametrize("header, ok", [
    ("Bearer s3cret", True),
    ("bearer s3cret", True),  # the scheme is case-insensitive (RFC 7235)
    ("Bearer  s3cret ", True),
    ("Bearer s3cre", False),
    ("Bearer s3cret2", False),
    ("Basic s3cret", False),
    ("s3cret", False),
    ("", False),
    (None, False),
])
def test_bearer_token_must_match_the_key(header, ok) -> None:
    assert bearer_ok(header, "s3cret") is ok


def test_no_key_configured_lets_everyone_in() -> None:
    assert bearer_ok(None, None) and bearer_ok("Bearer anything", "")


def test_security_refuses_half_configurations(tmp_path) -> None:
    with pytest.raises(ValueError, match="--tls-key"):
        Security(tls_cert="cert.pem")
    with pytest.raises(ValueError, match="--tls-ca"):
        Security(tls_ca="ca.pem")
    assert Security().server_credentials(True) is None and Security().channel_credentials() is None


def test_internal_services_bind_to_loopback_by_default() -> None:
    from llmrpc.services.cli import build_parser

    parser = build_parser()
    for command in (["worker"], ["scheduler"], ["tokenizer"], ["serve"]):
        assert parser.parse_args(command).host == "127.0.0.1", command
