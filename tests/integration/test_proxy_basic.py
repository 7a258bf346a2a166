"""The basics through a real gateway process: forwarding, proxy headers, keep-alive, routing errors."""

from __future__ import annotations

import pytest

from tests.support import RawClient, gateway_config, request

pytestmark = pytest.mark.integration


def test_forwards_request_and_response(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url))
    resp = request(gw.port, "GET", "/users/7?x=1", headers={"X-Custom": "yes"})
    assert resp.status == 200
    seen = be.seen[-1]
    assert seen.method == "GET"
    assert seen.target == "/users/7?x=1"
    assert seen.header("x-custom") == "yes"
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == "gateway.test"
    assert seen.header("host") == f"127.0.0.1:{be.port}"
    assert len(seen.header("x-request-id") or "") == 32


def test_keep_alive_client_and_pooled_backend_connections(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url))
    for _ in range(3):
        client = RawClient(gw.port)
        for i in range(5):
            client.send(f"GET /n/{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert client.read_response().status == 200
        client.close()
    assert len(be.seen) == 15
    assert be.connections == 1  # one pooled backend connection carried all 15 requests


def test_no_route_is_404_json_with_request_id(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, routes=[{"name": "api", "service": "backend", "paths": ["/api"]}]))
    resp = request(gw.port, "GET", "/other")
    assert resp.status == 404
    body = resp.json()
    assert body["message"] == "no route matched"
    assert body["request_id"] == resp.header("x-request-id")
    assert be.seen == []


def test_wrong_method_is_405_with_allow(gateway, backend):
    be = backend()
    routes = [{"name": "read", "service": "backend", "paths": ["/api"], "methods": ["GET", "HEAD"]}]
    gw = gateway(gateway_config(be.url, routes=routes))
    resp = request(gw.port, "DELETE", "/api/x")
    assert resp.status == 405
    assert resp.header("allow") == "GET, HEAD"
