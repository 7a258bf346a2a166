"""Routes and TLS: matching on scheme and SNI, per-route https_redirect and hsts, WebSocket over TLS,
and a real aiohttp client over HTTPS."""

from __future__ import annotations

import asyncio
import http.client
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.sync.client import connect

from tests.integration.test_tls_listeners import https_get, tls_port
from tests.integration.test_upgrade import AiohttpEcho
from tests.support import LoopThread, gateway_config
from tests.tls_support import CA, client_context

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA()
    return {
        "ca_file": ca.write(tmp_path),
        "api": ca.issue(["api.test", "admin.test", "localhost"]).write(tmp_path, "api"),
    }


def config_with_tls(backend_url: str, pki: dict[str, Any], routes: list[dict[str, Any]]) -> dict[str, Any]:
    config = gateway_config(backend_url, routes=routes, listen=["127.0.0.1:0", "127.0.0.1:0 tls"])
    config["certificates"] = [
        {
            "name": "api",
            "cert": pki["api"][0],
            "key": pki["api"][1],
            "snis": ["api.test", "admin.test", "localhost"],
        }
    ]
    return config


def clear_get(port: int, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers={"Host": "api.test:8080"}, body=b"x" if method == "POST" else None)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_routes_match_scheme_and_sni(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    seen = backend()
    routes = [
        {"name": "admin-tls", "service": "backend", "paths": ["/"], "snis": ["admin.test"], "priority": 2},
        {"name": "secure", "service": "backend", "paths": ["/"], "protocols": ["https"], "priority": 1},
        {"name": "plain", "service": "backend", "paths": ["/"]},
    ]
    config = config_with_tls(seen.url, pki, routes)
    config["gateway"]["access_log"] = {"fields": ["route", "status"]}
    gw = gateway(config)
    port = tls_port(gw)
    assert https_get(port, pki["ca_file"], "admin.test")[0] == 200
    assert https_get(port, pki["ca_file"], "api.test")[0] == 200
    assert clear_get(gw.listeners[0][1], "/").status == 200
    # Host header says admin.test over clear text: SNI is what counts, so not the admin route.
    conn = http.client.HTTPConnection("127.0.0.1", gw.listeners[0][1], timeout=10)
    conn.request("GET", "/", headers={"Host": "admin.test"})
    assert conn.getresponse().status == 200
    conn.close()
    deadline = time.monotonic() + 10
    while len(gw.access_log()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [line["route"] for line in gw.access_log()] == ["admin-tls", "secure", "plain", "plain"]


def test_scheme_and_sni_routes_are_chosen_on_every_request(
    gateway: Any, backend: Any, pki: dict[str, Any]
) -> None:
    """The same method, Host and URL over clear text and over TLS, alternately: a scheme or SNI route
    is never memoised (docs/routing.md, "Match cache"), so each request routes by its own connection."""
    seen = backend()
    routes = [
        {"name": "admin-tls", "service": "backend", "paths": ["/a"], "snis": ["admin.test"]},
        {"name": "secure", "service": "backend", "paths": ["/s"], "protocols": ["https"]},
        {"name": "plain", "service": "backend", "paths": ["/"]},
    ]
    config = config_with_tls(seen.url, pki, routes)
    config["gateway"]["access_log"] = {"fields": ["route", "status"]}
    gw = gateway(config)
    port, clear_port = tls_port(gw), gw.listeners[0][1]
    expected = []
    for _ in range(2):
        for path, route in (("/a", "admin-tls"), ("/s", "secure")):
            assert https_get(port, pki["ca_file"], "admin.test", path)[0] == 200
            conn = http.client.HTTPConnection("127.0.0.1", clear_port, timeout=10)
            conn.request("GET", path, headers={"Host": "admin.test"})  # the same Host and URL
            assert conn.getresponse().status == 200
            conn.close()
            expected += [route, "plain"]
    deadline = time.monotonic() + 10
    while len(gw.access_log()) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [line["route"] for line in gw.access_log()] == expected


def test_https_redirect_and_hsts(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    seen = backend()
    routes = [
        {"name": "app", "service": "backend", "paths": ["/app"], "hsts": "max-age=31536000"},
        {"name": "login", "service": "backend", "paths": ["/login"], "https_redirect": True},
    ]
    config = config_with_tls(seen.url, pki, routes)
    gw = gateway(config)
    port = tls_port(gw)
    config["routes"][0]["https_redirect"] = port  # the TLS port is known once the gateway runs
    gw.write_config(config)
    gw.signal(__import__("signal").SIGHUP)
    gw.wait_for_output("config version 2 applied")
    resp = clear_get(gw.listeners[0][1], "/app/x?y=1")
    assert resp.status == 301
    assert resp.getheader("location") == f"https://api.test:{port}/app/x?y=1"
    assert resp.getheader("strict-transport-security") is None  # never over clear text
    resp = clear_get(gw.listeners[0][1], "/login", method="POST")
    assert resp.status == 308  # keeps the method and body
    assert resp.getheader("location") == "https://api.test/login"
    assert not seen.seen  # nothing reached the backend in clear text
    status, headers, _ = https_get(port, pki["ca_file"], "api.test", "/app/x")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=31536000"
    status, headers, _ = https_get(port, pki["ca_file"], "api.test", "/login")
    assert status == 200 and "strict-transport-security" not in headers


def test_websocket_over_tls(gateway: Any, loop_thread: LoopThread, pki: dict[str, Any]) -> None:
    echo = AiohttpEcho(loop_thread)
    try:
        gw = gateway(config_with_tls(echo.url, pki, [{"name": "ws", "service": "backend", "paths": ["/"]}]))
        context = client_context(pki["ca_file"])
        url = f"wss://localhost:{tls_port(gw)}/ws"
        with connect(url, ssl=context, open_timeout=10) as ws:
            ws.send("over tls")
            assert ws.recv(timeout=10) == "echo: over tls"
        assert echo.requests[-1]["X-Forwarded-Proto"] == "https"
    finally:
        echo.stop()


def test_aiohttp_client_over_tls(gateway: Any, backend: Any, pki: dict[str, Any]) -> None:
    seen = backend()
    gw = gateway(config_with_tls(seen.url, pki, [{"name": "all", "service": "backend", "paths": ["/"]}]))
    port = tls_port(gw)

    async def run() -> list[int]:
        connector = aiohttp.TCPConnector(ssl=client_context(pki["ca_file"]), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses = []
            for i in range(5):
                async with session.get(f"https://localhost:{port}/n{i}") as resp:
                    await resp.read()
                    statuses.append(resp.status)
            return statuses

    assert asyncio.run(run()) == [200] * 5
    assert [s.target for s in seen.seen] == [f"/n{i}" for i in range(5)]
    assert all(s.header("x-forwarded-proto") == "https" for s in seen.seen)
