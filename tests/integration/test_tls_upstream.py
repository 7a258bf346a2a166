"""TLS to backends: verified by default against a CA bundle, SNI sent (and configurable), client
certificates to backends, certificate errors answered 502 with a logged reason and a metric."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Backend, LoopThread, gateway_config, request
from tests.tls_support import CA

pytestmark = pytest.mark.integration


class TlsBackends:
    def __init__(self, runner: LoopThread, directory: Path) -> None:
        self.runner = runner
        self.dir = directory
        self.started: list[Backend] = []
        self.snis: list[str | None] = []

    def start(self, ca: CA, names: list[str], client_ca: CA | None = None) -> Backend:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert, key = ca.issue(names).write(self.dir, f"backend{len(self.started)}")
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca.write(self.dir, f"client-ca{len(self.started)}"))

        def record(conn: Any, name: str | None, ctx: Any) -> None:
            self.snis.append(name)

        context.sni_callback = record  # type: ignore[assignment]
        backend = Backend(tls=context).start(self.runner)
        self.started.append(backend)
        return backend


@pytest.fixture
def tls_backends(loop_thread: LoopThread, tmp_path: Path) -> Iterator[TlsBackends]:
    backends = TlsBackends(loop_thread, tmp_path)
    yield backends
    for backend in backends.started:
        backend.stop()


def metrics_text(status_url: str) -> str:
    with urllib.request.urlopen(status_url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_verified_backend_with_sni(gateway: Any, tls_backends: TlsBackends, tmp_path: Path) -> None:
    ca = CA()
    backend = tls_backends.start(ca, ["localhost"])
    config = gateway_config(f"https://localhost:{backend.port}")
    config["services"][0]["tls"] = {"ca_file": ca.write(tmp_path)}
    gw = gateway(config)
    resp = request(gw.port, "GET", "/hello")
    assert resp.status == 200
    assert backend.seen[-1].target == "/hello"
    assert "localhost" in tls_backends.snis


def test_untrusted_ca_and_wrong_name_are_502_with_reason_and_metric(
    gateway: Any, tls_backends: TlsBackends, tmp_path: Path
) -> None:
    ca, other = CA(), CA("Another CA")
    untrusted = tls_backends.start(other, ["localhost"])
    wrong_name = tls_backends.start(ca, ["elsewhere.test"])
    config = gateway_config(f"https://localhost:{untrusted.port}")
    config["services"] = [
        {
            "name": "untrusted",
            "url": f"https://localhost:{untrusted.port}",
            "tls": {"ca_file": ca.write(tmp_path)},
        },
        {
            "name": "wrong",
            "url": f"https://localhost:{wrong_name.port}",
            "tls": {"ca_file": ca.write(tmp_path)},
        },
    ]
    config["routes"] = [
        {"name": "u", "service": "untrusted", "paths": ["/u"]},
        {"name": "w", "service": "wrong", "paths": ["/w"]},
    ]
    gw = gateway(config)
    resp = request(gw.port, "GET", "/u")
    assert resp.status == 502
    assert b"internal" not in resp.body.lower() and b"traceback" not in resp.body.lower()
    gw.wait_for_output(
        rf"TLS certificate of localhost:{untrusted.port} .*rejected: .*(unable to get|self.signed)"
    )
    resp = request(gw.port, "GET", "/w")
    assert resp.status == 502
    gw.wait_for_output(rf"TLS certificate of localhost:{wrong_name.port} .*rejected: .*[Hh]ostname mismatch")
    assert not untrusted.seen and not wrong_name.seen
    text = metrics_text(gw.status_url)
    assert 'error="tls",service="untrusted"' in text or 'service="untrusted",target=' in text
    tls_lines = [
        line for line in text.splitlines() if "upstream_errors_total{" in line and 'error="tls"' in line
    ]
    assert len(tls_lines) == 2, tls_lines


def test_configured_server_name_and_client_certificate(
    gateway: Any, tls_backends: TlsBackends, tmp_path: Path
) -> None:
    ca, client_ca = CA(), CA("Client CA")
    backend = tls_backends.start(ca, ["internal.test"], client_ca=client_ca)
    client_cert, client_key = client_ca.issue(["gateway"], client=True).write(tmp_path, "gw-client")
    config = gateway_config(f"https://127.0.0.1:{backend.port}")
    config["services"][0]["tls"] = {"ca_file": ca.write(tmp_path), "server_name": "internal.test"}
    gw = gateway(config)
    assert request(gw.port, "GET", "/").status == 502  # the backend requires a client certificate
    config["services"][0]["tls"].update(client_cert=client_cert, client_key=client_key)
    gw.write_config(config)
    gw.signal(__import__("signal").SIGHUP)
    gw.wait_for_output("config version 2 applied")
    resp = request(gw.port, "GET", "/mtls")
    assert resp.status == 200
    assert backend.seen[-1].target == "/mtls"
    assert tls_backends.snis[-1] == "internal.test"


def test_https_upstream_targets_and_verify_false_warning(
    gateway: Any, tls_backends: TlsBackends, tmp_path: Path
) -> None:
    ca = CA()
    backend = tls_backends.start(ca, ["127.0.0.1"])  # an IP address SAN: verified as an address
    unverified = tls_backends.start(CA("Nobody"), ["whatever.test"])
    config = gateway_config()
    config["upstreams"] = [
        {
            "name": "pool",
            "scheme": "https",
            "tls": {"ca_file": ca.write(tmp_path)},
            "targets": [{"target": f"127.0.0.1:{backend.port}"}],
        },
        {
            "name": "lax",
            "scheme": "https",
            "tls": {"verify": False},
            "targets": [{"target": f"127.0.0.1:{unverified.port}"}],
        },
    ]
    config["services"] = [{"name": "s", "upstream": "pool"}, {"name": "lax", "upstream": "lax"}]
    config["routes"] = [
        {"name": "r", "service": "s", "paths": ["/"]},
        {"name": "lax", "service": "lax", "paths": ["/lax"]},
    ]
    gw = gateway(config)
    gw.wait_for_output(r"upstream 'lax': tls.verify is false")
    assert request(gw.port, "GET", "/pooled").status == 200
    assert backend.seen[-1].target == "/pooled"
    assert request(gw.port, "GET", "/lax").status == 200
    assert unverified.seen[-1].target == "/lax"
