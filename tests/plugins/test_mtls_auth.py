"""mtls-auth: credential schemas, and requests without a certificate (clear text) through the real
pipeline in process. Certificates over real TLS: tests/integration/test_tls_mtls.py."""

from __future__ import annotations

import pytest

from tests.plugins.harness import Harness
from tollway.errors import ConfigError
from tollway.plugins.builtin.mtls_auth import ClientCertificate, MtlsCredential

FP = "AB:" * 31 + "AB"


def test_credentials_validate_and_normalize() -> None:
    assert MtlsCredential.model_validate({"fingerprint": FP}).fingerprint == "ab" * 32
    for bad in ({}, {"fingerprint": "12"}, {"san": "a", "subject_cn": "b"}):
        with pytest.raises(ValueError):
            MtlsCredential.model_validate(bad)


def test_consumer_credentials_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="exactly one of fingerprint, san or subject_cn"):
        Harness(
            {
                "consumers": [{"username": "a", "credentials": {"mtls-auth": [{}]}}],
                "plugins": [{"name": "mtls-auth"}],
            }
        )


def test_no_certificate_is_401_or_the_anonymous_consumer() -> None:
    consumers = [
        {"username": "alice", "credentials": {"mtls-auth": [{"subject_cn": "alice"}]}},
        {"username": "guest"},
    ]
    gw = Harness({"consumers": consumers, "plugins": [{"name": "mtls-auth"}]})
    result = gw.request("GET", "/", {"X-Consumer-Username": "alice"})
    assert result.status == 401 and result.upstream is None
    assert result.json()["message"] == "missing or invalid credentials"
    config = {"anonymous": "guest", "forward_header": "X-Client-Cert"}
    gw = Harness({"consumers": consumers, "plugins": [{"name": "mtls-auth", "config": config}]})
    result = gw.request("GET", "/", {"X-Client-Cert": "Hash=forged"})
    assert result.status == 200
    assert result.upstream is not None
    assert result.upstream.header("x-consumer-username") == "guest"
    assert result.upstream.header("x-client-cert") is None  # a client's own claim never passes


def test_forwarded_identity_format() -> None:
    cert = ClientCertificate("alice", ("alice.example", "spiffe://x/y", "bad;name"), "00" * 32)
    assert cert.forwarded() == "Hash=" + "00" * 32 + ';Subject="CN=alice";SAN=alice.example;SAN=spiffe://x/y'
