"""TLS listeners: a real gateway process with a clear and a TLS listener, real TLS clients (Python ssl and
openssl s_client), certificates made at test time."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import Gateway, gateway_config, wait_until
from tests.tls_support import CA, client_context

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA()
    api = ca.issue(["api.test"], kind="rsa").write(tmp_path, "api")
    wild = ca.issue(["*.apps.test"], kind="ec").write(tmp_path, "wild")
    # An encrypted key whose passphrase comes from a file.
    enc = ca.issue(["secret.test"], kind="ec").write(tmp_path, "secret", passphrase=b"s3cret")
    (tmp_path / "pass.txt").write_text("s3cret\n")
    return {"ca": ca, "ca_file": ca.write(tmp_path), "api": api, "wild": wild, "enc": enc, "dir": tmp_path}


def tls_config(backend_url: str, pki: dict[str, Any], **tls: Any) -> dict[str, Any]:
    config = gateway_config(backend_url, listen=["127.0.0.1:0", "127.0.0.1:0 tls"])
    config["gateway"]["tls"] = tls
    config["certificates"] = [
        {"name": "api", "cert": pki["api"][0], "key": pki["api"][1], "snis": ["api.test"]},
        {"name": "wild", "cert": pki["wild"][0], "key": pki["wild"][1], "snis": ["*.apps.test"]},
        {
            "name": "secret",
            "cert": pki["enc"][0],
            "key": pki["enc"][1],
            "passphrase_file": str(pki["dir"] / "pass.txt"),
            "snis": ["secret.test"],
        },
    ]
    return config


def tls_port(gw: Gateway) -> int:
    return next(port for scheme, port in gw.listeners if scheme == "https")


def handshake(port: int, ca_file: str, name: str | None, **options: Any) -> ssl.SSLSocket:
    context = client_context(ca_file, **options)
    context.set_alpn_protocols(["http/1.1"])
    if name is None:
        context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=name)


def common_name(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    return dict(item[0] for item in cert["subject"])["commonName"]


def https_get(port: int, ca_file: str, name: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    with handshake(port, ca_file, name) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_sni_picks_certificate_wildcard_default_and_alpn(
    gateway: Any, backend: Any, pki: dict[str, Any]
) -> None:
    seen = backend()
    gw = gateway(tls_config(seen.url, pki))
    assert [scheme for scheme, _ in gw.listeners] == ["http", "https"]
    port = tls_port(gw)
    with handshake(port, pki["ca_file"], "api.test") as sock:
        assert common_name(sock) == "api.test"
        assert sock.selected_alpn_protocol() == "http/1.1"
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
    with handshake(port, pki["ca_file"], "x.apps.test") as sock:
        assert common_name(sock) == "*.apps.test"
    with handshake(port, pki["ca_file"], "secret.test") as sock:  # an encrypted key, passphrase from a file
        assert common_name(sock) == "secret.test"
    with handshake(port, pki["ca_file"], None) as sock:  # no SNI: the default (first) certificate
        assert common_name(sock) == "api.test"
    # A wildcard covers one label only: a.b.apps.test gets the default certificate, which does not match.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, pki["ca_file"], "a.b.apps.test")


def test_requests_over_tls_carry_the_real_scheme(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    seen = backend()
    config = tls_config(seen.url, pki)
    gw = gateway(config)
    forged = {"X-Forwarded-Proto": "https", "Forwarded": "for=1.2.3.4;proto=https"}
    status, _, _ = https_get(tls_port(gw), pki["ca_file"], "api.test", "/over-tls")
    assert status == 200
    request = seen.seen[-1]
    assert request.header("x-forwarded-proto") == "https"
    assert request.header("forwarded") is None  # off by default
    status, _, _ = https_get_clear(gw.listeners[0][1], "/clear", forged)
    assert status == 200
    assert seen.seen[-1].header("x-forwarded-proto") == "http"  # the client's claim is not believed
    assert seen.seen[-1].header("forwarded") is None
    config["gateway"]["forwarded_headers"] = {"forwarded": True}
    gw.write_config(config)
    gw.signal(__import__("signal").SIGHUP)
    gw.wait_for_output("config version 2 applied")
    https_get(tls_port(gw), pki["ca_file"], "api.test", "/over-tls")
    assert seen.seen[-1].header_all("forwarded") == ['for=127.0.0.1;proto=https;host="api.test"']
    https_get_clear(gw.listeners[0][1], "/clear", forged)
    clear_host = f"127.0.0.1:{gw.listeners[0][1]}"
    assert seen.seen[-1].header_all("forwarded") == [f'for=127.0.0.1;proto=http;host="{clear_host}"']


def https_get_clear(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_old_protocols_refused(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    gw = gateway(tls_config(backend().url, pki))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["ca_file"])
    try:  # the client side may refuse to even offer TLS 1.1 (OpenSSL security level): lower it
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all")
    raw = socket.create_connection(("127.0.0.1", tls_port(gw)), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        context.wrap_socket(raw, server_hostname="api.test")
    raw.close()


def test_min_version_13_and_refuse_unknown_sni(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    gw = gateway(tls_config(backend().url, pki, min_version="1.3", unknown_sni="refuse"))
    port = tls_port(gw)
    with pytest.raises(ssl.SSLError):
        handshake(port, pki["ca_file"], "api.test", maximum=ssl.TLSVersion.TLSv1_2)
    with handshake(port, pki["ca_file"], "api.test") as sock:
        assert sock.version() == "TLSv1.3"
    with pytest.raises(ssl.SSLError):  # the handshake fails (alert, or uvloop closes before it is flushed)
        handshake(port, pki["ca_file"], "unknown.test")
    with handshake(port, pki["ca_file"], None) as sock:  # no SNI at all: still the default
        assert common_name(sock) == "api.test"


def test_session_resumption(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    gw = gateway(tls_config(backend().url, pki))
    port = tls_port(gw)
    context = client_context(pki["ca_file"], maximum=ssl.TLSVersion.TLSv1_2)
    first = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="api.test"
    )
    session = first.session
    assert not first.session_reused
    first.close()
    second = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="api.test", session=session
    )
    assert second.session_reused  # one worker: its ticket keys decrypt the ticket
    second.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_s_client_sees_the_sni_certificate(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    gw = gateway(tls_config(backend().url, pki))
    for name, expected in (("api.test", "CN = api.test"), ("z.apps.test", "CN = *.apps.test")):
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{tls_port(gw)}",
                "-servername",
                name,
                "-CAfile",
                pki["ca_file"],
                "-verify_return_error",
                "-brief",
            ],
            input=b"",
            capture_output=True,
            timeout=20,
            check=False,
        )
        text = (out.stdout + out.stderr).decode()
        assert expected in text, text
        assert "Verification: OK" in text, text


def test_certificate_replaced_during_traffic_without_failures(
    gateway: Any, backend: Any, pki: dict[str, Any]
) -> None:
    seen = backend()
    config = tls_config(seen.url, pki)
    gw = gateway(config, workers=2)
    port = tls_port(gw)
    renewed = (
        pki["ca"].issue(["api.test"], kind="ec", common_name="api.test renewed").write(pki["dir"], "api2")
    )
    failures: list[str] = []
    names: set[str] = set()
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            try:
                status, _, _ = https_get(port, pki["ca_file"], "api.test")
                if status != 200:
                    failures.append(f"status {status}")
            except Exception as exc:  # any failed request fails the test
                failures.append(repr(exc))

    def watch_names() -> None:
        while not done.is_set():
            with handshake(port, pki["ca_file"], "api.test") as sock:
                names.add(common_name(sock))
            time.sleep(0.05)

    threads = [threading.Thread(target=traffic) for _ in range(2)] + [threading.Thread(target=watch_names)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        config["certificates"][0].update(cert=renewed[0], key=renewed[1])
        gw.write_config(config)
        gw.signal(__import__("signal").SIGHUP)
        wait_until(lambda: "api.test renewed" in names, timeout=15)
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join(20)
    assert not failures, failures[:5]
    assert names == {"api.test", "api.test renewed"}


def test_stalled_handshake_times_out_without_holding_the_worker(
    gateway: Any, backend: Any, pki: dict[str, Any]
) -> None:
    gw = gateway(tls_config(backend().url, pki, handshake_timeout="1s"))
    port = tls_port(gw)
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalled.sendall(b"\x16\x03\x01\x00\x50")  # the start of a ClientHello, then nothing
    started = time.monotonic()
    # Meanwhile the same single worker serves others.
    status, _, _ = https_get(port, pki["ca_file"], "api.test")
    assert status == 200
    assert time.monotonic() - started < 1.0
    assert stalled.recv(100) == b""  # closed by the gateway once the handshake timeout passed
    assert time.monotonic() - started < 5.0
    stalled.close()


def test_rsa_and_ecdsa_side_by_side_for_one_name(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    rsa = pki["ca"].issue(["dual.test"], kind="rsa", common_name="dual rsa").write(pki["dir"], "dual-rsa")
    ecdsa = pki["ca"].issue(["dual.test"], kind="ec", common_name="dual ecdsa").write(pki["dir"], "dual-ec")
    config = tls_config(backend().url, pki)
    config["certificates"].append(
        {
            "name": "dual",
            "cert": rsa[0],
            "key": rsa[1],
            "cert_alt": ecdsa[0],
            "key_alt": ecdsa[1],
            "snis": ["dual.test"],
        }
    )
    port = tls_port(gateway(config))
    rsa_only = client_context(pki["ca_file"], maximum=ssl.TLSVersion.TLSv1_2)
    rsa_only.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    ecdsa_only = client_context(pki["ca_file"], maximum=ssl.TLSVersion.TLSv1_2)
    ecdsa_only.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    for context, expected in ((rsa_only, "dual rsa"), (ecdsa_only, "dual ecdsa")):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname="dual.test") as sock:
            assert common_name(sock) == expected


def test_certificate_expiry_metric(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    import urllib.request

    gw = gateway(tls_config(backend().url, pki))
    with urllib.request.urlopen(gw.status_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {
        line.split('certificate="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tollway_tls_certificate_expiry_timestamp_seconds{")
    }
    assert set(values) == {"api", "wild", "secret"}
    for expiry in values.values():  # issued for 365 days by tls_support
        assert 364 * 86400 < expiry - time.time() < 366 * 86400


def test_resumption_across_workers_with_shared_ticket_keys(
    gateway: Any, backend: Any, pki: dict[str, Any]
) -> None:
    gw = gateway(tls_config(backend().url, pki), workers=2)
    port = tls_port(gw)
    context = client_context(pki["ca_file"], maximum=ssl.TLSVersion.TLSv1_2)
    first = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="api.test"
    )
    session = first.session
    first.close()
    reused = []
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname="api.test", session=session) as sock:
            reused.append(sock.session_reused)
    assert all(reused), reused


def test_certificate_chain_with_an_intermediate(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    root = CA("Chain Root")
    leaf = root.intermediate().issue(["chain.test"]).write(pki["dir"], "chain")  # leaf, then intermediate
    config = tls_config(backend().url, pki)
    config["certificates"].append({"name": "chain", "cert": leaf[0], "key": leaf[1], "snis": ["chain.test"]})
    port = tls_port(gateway(config))
    # The client trusts the root only: the handshake verifies because the gateway sends the intermediate.
    with handshake(port, root.write(pki["dir"], "chain-root"), "chain.test") as sock:
        assert common_name(sock) == "chain.test"
