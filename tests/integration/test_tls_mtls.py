"""Mutual TLS from clients: an mtls listener requiring (or requesting) a client certificate signed by the
configured CA, with a CRL; the mtls-auth plugin maps certificates to consumers, ACL works on them, and
the identity is forwarded to the backend."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.support import Gateway, gateway_config
from tests.tls_support import CA, client_context

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    server_ca, client_ca = CA("Server CA"), CA("Client CA")
    alice = client_ca.issue([], client=True, common_name="alice")
    bob = client_ca.issue(["bob@example.test"], client=True, common_name="bob")
    carol = client_ca.issue(["carol.clients.test"], client=True, common_name="not-carol")  # mapped by SAN
    mallory = client_ca.issue([], client=True, common_name="mallory")  # revoked
    stranger = CA("Stranger CA").issue([], client=True, common_name="alice")  # right name, wrong CA
    crl = tmp_path / "clients.crl"
    crl.write_bytes(client_ca.crl([mallory]))
    files = {
        name: issued.write(tmp_path, name)
        for name, issued in (
            ("alice", alice),
            ("bob", bob),
            ("carol", carol),
            ("mallory", mallory),
            ("stranger", stranger),
        )
    }
    return {
        "server": server_ca.issue(["api.test"]).write(tmp_path, "server"),
        "server_ca": server_ca.write(tmp_path, "server-ca"),
        "client_ca": client_ca.write(tmp_path, "client-ca"),
        "crl": str(crl),
        "files": files,
        "bob": bob,
    }


def mtls_config(backend_url: str, pki: dict[str, Any], mode: str = "require") -> dict[str, Any]:
    config = gateway_config(backend_url, listen=["127.0.0.1:0", "127.0.0.1:0 mtls"])
    config["gateway"]["tls"] = {
        "client_auth": {"mode": mode, "ca_file": pki["client_ca"], "crl_files": [pki["crl"]]}
    }
    config["certificates"] = [
        {"name": "api", "cert": pki["server"][0], "key": pki["server"][1], "snis": ["api.test"]}
    ]
    return config


def tls_port(gw: Gateway) -> int:
    return next(port for scheme, port in gw.listeners if scheme == "https")


def get(
    port: int, pki: dict[str, Any], who: str | None, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    cert = pki["files"][who] if who else None
    context = client_context(pki["server_ca"], cert=cert)
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="api.test"
    )
    with sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api.test\r\n{extra}Connection: close\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def refused(port: int, pki: dict[str, Any], who: str | None) -> bool:
    try:
        get(port, pki, who)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        return True
    return False


def test_required_client_certificate_with_crl(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    seen = backend()
    gw = gateway(mtls_config(seen.url, pki))
    port = tls_port(gw)
    assert get(port, pki, "alice")[0] == 200
    assert refused(port, pki, None)  # no certificate
    assert refused(port, pki, "stranger")  # signed by another CA
    assert refused(port, pki, "mallory")  # revoked in the CRL
    # The clear listener beside it is unaffected.
    conn = http.client.HTTPConnection("127.0.0.1", gw.listeners[0][1], timeout=10)
    conn.request("GET", "/clear")
    assert conn.getresponse().status == 200
    conn.close()


def test_mtls_auth_maps_certificates_to_consumers_with_acl(
    gateway: Any, backend: Any, pki: dict[str, Any]
) -> None:
    seen = backend()
    config = mtls_config(seen.url, pki, mode="request")
    config["consumers"] = [
        {"username": "alice", "groups": ["admins"], "credentials": {"mtls-auth": [{"subject_cn": "alice"}]}},
        {
            "username": "bob",
            "groups": ["users"],
            "credentials": {"mtls-auth": [{"fingerprint": pki["bob"].fingerprint().upper()}]},
        },
        {"username": "carol", "credentials": {"mtls-auth": [{"san": "carol.clients.test"}]}},
    ]
    config["routes"] = [
        {
            "name": "admin",
            "service": "backend",
            "paths": ["/admin"],
            "plugins": [
                {"name": "mtls-auth", "config": {"forward_header": "X-Forwarded-Client-Cert"}},
                {"name": "acl", "config": {"allow": ["admins"]}},
            ],
        },
        {"name": "any", "service": "backend", "paths": ["/"], "plugins": [{"name": "mtls-auth"}]},
    ]
    gw = gateway(config)
    port = tls_port(gw)
    status, _ = get(port, pki, "alice", "/admin", {"X-Forwarded-Client-Cert": "Hash=forged"})
    assert status == 200
    request = seen.seen[-1]
    assert request.header("x-consumer-username") == "alice"
    forwarded = request.header_all("x-forwarded-client-cert")
    assert len(forwarded) == 1 and 'Subject="CN=alice"' in forwarded[0] and "forged" not in forwarded[0]
    assert get(port, pki, "bob", "/admin")[0] == 403  # identified (by fingerprint), but not an admin
    assert get(port, pki, "bob", "/data")[0] == 200
    assert seen.seen[-1].header("x-consumer-username") == "bob"
    assert get(port, pki, "carol", "/data")[0] == 200
    assert seen.seen[-1].header("x-consumer-username") == "carol"
    # mode "request": a client without a certificate completes the handshake, and mtls-auth says 401.
    status, body = get(port, pki, None, "/data")
    assert status == 401 and b"credentials" in body


def test_mtls_auth_on_a_clear_listener_is_401(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    config = mtls_config(backend().url, pki)
    config["consumers"] = [{"username": "alice", "credentials": {"mtls-auth": [{"subject_cn": "alice"}]}}]
    config["plugins"] = [{"name": "mtls-auth"}]
    gw = gateway(config)
    conn = http.client.HTTPConnection("127.0.0.1", gw.listeners[0][1], timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().status == 401
    conn.close()
    assert get(tls_port(gw), pki, "alice")[0] == 200


def test_client_cas_per_sni(gateway: Any, backend: Any, pki: dict[str, Any], tmp_path: Path) -> None:
    partner_ca = CA("Partner CA")
    pki["files"]["partner"] = partner_ca.issue([], client=True, common_name="acme").write(tmp_path, "partner")
    partner_crl = tmp_path / "partner.crl"  # CRLs are checked on this listener: every CA needs one
    partner_crl.write_bytes(partner_ca.crl([]))
    partner_server = CA("Server CA 2")  # any server certificate will do for the second name
    pki["partner_server_ca"] = partner_server.write(tmp_path, "server-ca-2")
    partner_cert = partner_server.issue(["partner.test"]).write(tmp_path, "partner-server")
    config = mtls_config(backend().url, pki)
    config["certificates"].append(
        {
            "name": "partner",
            "cert": partner_cert[0],
            "key": partner_cert[1],
            "snis": ["partner.test"],
            "client_auth": {
                "ca_file": partner_ca.write(tmp_path, "partner-ca"),
                "crl_files": [str(partner_crl)],
            },
        }
    )
    port = tls_port(gateway(config))

    def on(name: str, who: str) -> bool:
        context = client_context(
            pki["partner_server_ca" if name == "partner.test" else "server_ca"], cert=pki["files"][who]
        )
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with context.wrap_socket(raw, server_hostname=name) as sock:
                sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
                resp = http.client.HTTPResponse(sock)
                resp.begin()
                return resp.status == 200
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            return False

    assert on("partner.test", "partner")
    assert not on("partner.test", "alice")  # the listener's CA does not count for this name
    assert on("api.test", "alice")
    assert not on("api.test", "partner")
