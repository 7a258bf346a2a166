"""The router's match memo (docs/routing.md, "Match cache") through a real gateway: a request seen
before (same method, Host and URL) is forwarded exactly as the first one was, whatever the route's
kind; what the memo must never keep (header, query, method-chosen routes; 404s and 405s) still
answers right on repetition; a reload's routes apply to URLs seen before."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.integration.test_reload import _config_ready
from tests.support import RawClient, RawResponse, gateway_config, wait_until

pytestmark = pytest.mark.integration

GW = "gw.test"
# Each route has its own service whose URL path names it, so the target the backend sees tells which
# route the gateway chose (and what it forwarded); "root" has no base path: forwarded as received.
ROUTES: list[dict[str, Any]] = [
    {"name": "root", "service": "bare", "hosts": [GW], "paths": ["/"]},
    {"name": "plain", "service": "plain", "hosts": [GW], "paths": ["/plain"]},
    {"name": "get", "service": "get", "hosts": [GW], "paths": ["/m"], "methods": ["GET", "HEAD"]},
    {"name": "post", "service": "post", "hosts": [GW], "paths": ["/m"], "methods": ["POST"]},
    {"name": "strip", "service": "strip", "hosts": [GW], "paths": ["/strip"], "strip_path": True},
    {"name": "rewrite", "service": "rewrite", "hosts": [GW], "paths": ["/users/{id}"], "rewrite": "/p/{id}"},
    {"name": "v2", "service": "v2", "hosts": [GW], "paths": ["/h"], "headers": {"X-Version": ["2"]}},
    {"name": "q2", "service": "q2", "hosts": [GW], "paths": ["/q"], "query": {"v": ["2"]}},
    {"name": "exact-host", "service": "exact", "hosts": ["api.test"], "paths": ["/"]},
    {"name": "wild-host", "service": "wild", "hosts": ["*.wild.test"], "paths": ["/"]},
    {"name": "strict", "service": "strict", "hosts": ["strict.test"], "paths": ["/s"], "methods": ["GET"]},
]


def memo_config(backend_url: str, routes: list[dict[str, Any]] = ROUTES) -> dict[str, Any]:
    config = gateway_config(backend_url, routes=routes, forwarded_headers={"x_forwarded_prefix": True})
    services = {route["service"] for route in routes} - {"bare"}
    config["services"] = [{"name": "bare", "url": backend_url}] + [
        {"name": name, "url": f"{backend_url}/{name}"} for name in sorted(services)
    ]
    return config


def send(client: RawClient, method: str, target: str, host: str, headers: dict[str, str]) -> RawResponse:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    body = b"x" if method == "POST" else b""
    if body:
        lines.append(f"Content-Length: {len(body)}")
    client.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return client.read_response()


def outcome(be: Any, resp: RawResponse, before: int) -> tuple[Any, ...]:
    """What the client got, and what the backend received (None: nothing reached it)."""
    if len(be.seen) == before:
        return (resp.status, resp.header("allow"), None)
    seen = be.seen[-1]
    return (resp.status, resp.header("allow"), seen.method, seen.target, seen.header("x-forwarded-prefix"))


def fresh(be: Any, port: int, method: str, target: str, host: str) -> tuple[Any, ...]:
    client = RawClient(port)
    try:
        before = len(be.seen)
        return outcome(be, send(client, method, target, host, {}), before)
    finally:
        client.close()


def three_times(
    be: Any, port: int, method: str, target: str, host: str = GW, **headers: str
) -> tuple[Any, ...]:
    """The request on a fresh connection (a miss the first time), then twice on one kept-alive
    connection (hits): all three outcomes must be the same; returns it."""
    outcomes = []
    client = RawClient(port)
    keep = RawClient(port)
    try:
        for conn in (client, keep, keep):
            before = len(be.seen)
            outcomes.append(outcome(be, send(conn, method, target, host, headers), before))
    finally:
        client.close()
        keep.close()
    assert outcomes[0] == outcomes[1] == outcomes[2], (method, target, host, outcomes)
    return outcomes[0]


def test_a_request_seen_before_is_forwarded_as_the_first(gateway, backend) -> None:
    be = backend()
    port = gateway(memo_config(be.url)).port
    # plain routes: forwarded as received (no base path), or under the service's base path
    assert three_times(be, port, "GET", "/a/b?x=1") == (200, None, "GET", "/a/b?x=1", None)
    assert three_times(be, port, "GET", "/plain/x?y=2") == (200, None, "GET", "/plain/plain/x?y=2", None)
    # method-only routes: the method is part of the key
    assert three_times(be, port, "GET", "/m/1") == (200, None, "GET", "/get/m/1", None)
    assert three_times(be, port, "POST", "/m/1") == (200, None, "POST", "/post/m/1", None)
    assert three_times(be, port, "GET", "/m/1") == (200, None, "GET", "/get/m/1", None)
    assert three_times(be, port, "DELETE", "/m/1") == (200, None, "DELETE", "/m/1", None)  # root
    # strip_path, with X-Forwarded-Prefix on; a rewrite with a parameter
    assert three_times(be, port, "GET", "/strip/x?q") == (200, None, "GET", "/strip/x?q", "/strip")
    assert three_times(be, port, "GET", "/strip") == (200, None, "GET", "/strip/", "/strip")
    assert three_times(be, port, "GET", "/users/7?z=1") == (200, None, "GET", "/rewrite/p/7?z=1", None)
    assert three_times(be, port, "GET", "/users/8") == (200, None, "GET", "/rewrite/p/8", None)
    # host-specific and wildcard-host routes; the port and the case of the Host do not matter
    assert three_times(be, port, "GET", "/x", "api.test") == (200, None, "GET", "/exact/x", None)
    assert three_times(be, port, "GET", "/x", "API.test:8080") == (200, None, "GET", "/exact/x", None)
    assert three_times(be, port, "GET", "/x", "a.wild.test") == (200, None, "GET", "/wild/x", None)
    assert three_times(be, port, "GET", "/x", "b.a.wild.test") == (200, None, "GET", "/wild/x", None)
    assert three_times(be, port, "GET", "/x", "wild.test")[:2] == (404, None)
    assert three_times(be, port, "GET", "/x") == (200, None, "GET", "/x", None)


def test_paths_are_normalised_the_same_on_a_hit(gateway, backend) -> None:
    be = backend()
    port = gateway(memo_config(be.url)).port
    assert three_times(be, port, "GET", "/a/./b/../c?k=%2F") == (200, None, "GET", "/a/c?k=%2F", None)
    assert three_times(be, port, "GET", "/%70lain//%7e/x") == (200, None, "GET", "/plain/plain/~/x", None)
    assert three_times(be, port, "GET", "/plain/a%2fb") == (200, None, "GET", "/plain/plain/a%2Fb", None)
    assert three_times(be, port, "GET", "/strip/../strip/y") == (200, None, "GET", "/strip/y", "/strip")
    assert three_times(be, port, "GET", "/users/%37") == (200, None, "GET", "/rewrite/p/7", None)
    for _ in range(3):  # a 400 closes the connection: one each time
        assert fresh(be, port, "GET", "/a%zz", GW) == (400, None, None)
        assert fresh(be, port, "GET", "/x", "bad/host") == (400, None, None)
        assert fresh(be, port, "GET", "/x", "api.test/x") == (400, None, None)


def test_header_and_query_routes_and_errors_on_repetition(gateway, backend) -> None:
    be = backend()
    port = gateway(memo_config(be.url)).port
    # The same method, Host and URL, routed by a header: the route follows the header each time.
    for _ in range(2):
        assert three_times(be, port, "GET", "/h/1", **{"X-Version": "2"})[3] == "/v2/h/1"
        assert three_times(be, port, "GET", "/h/1")[3] == "/h/1"  # root
        assert three_times(be, port, "GET", "/h/1", **{"X-Version": "3"})[3] == "/h/1"
    assert three_times(be, port, "GET", "/q?v=2")[3] == "/q2/q?v=2"
    assert three_times(be, port, "GET", "/q?v=1")[3] == "/q?v=1"
    # 405 (with its Allow) and 404, again and again; then the allowed method still passes
    assert three_times(be, port, "DELETE", "/s", "strict.test") == (405, "GET", None)
    assert three_times(be, port, "GET", "/nope", "strict.test") == (404, None, None)
    assert three_times(be, port, "GET", "/s", "strict.test") == (200, None, "GET", "/strict/s", None)
    assert three_times(be, port, "DELETE", "/s", "strict.test") == (405, "GET", None)
    assert three_times(be, port, "GET", "/", "nowhere.test") == (404, None, None)


def test_long_urls_route_as_short_ones(gateway, backend) -> None:
    be = backend()
    port = gateway(memo_config(be.url)).port
    for size in (200, 256, 257, 2000):
        target = "/plain/" + "a" * (size - len("/plain/"))
        assert three_times(be, port, "GET", target) == (200, None, "GET", "/plain" + target, None)
    host = "h" * 300 + ".wild.test"
    assert three_times(be, port, "GET", "/x", host) == (200, None, "GET", "/wild/x", None)


def test_a_reload_routes_urls_seen_before_by_the_new_routes(gateway, backend) -> None:
    be = backend()
    gw = gateway(memo_config(be.url))
    client = RawClient(gw.port)
    for _ in range(3):
        before = len(be.seen)
        assert outcome(be, send(client, "GET", "/plain/x", GW, {}), before)[3] == "/plain/plain/x"
    routes = [{"name": "plain", "service": "strip", "hosts": [GW], "paths": ["/plain"], "strip_path": True}]
    gw.write_config(memo_config(be.url, routes))
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: _config_ready(gw, 2))
    # the same connection (opened before the reload), the same URL: the new route
    before = len(be.seen)
    assert outcome(be, send(client, "GET", "/plain/x", GW, {}), before)[3:] == ("/strip/x", "/plain")
    before = len(be.seen)
    assert outcome(be, send(client, "GET", "/a", GW, {}), before)[:1] == (404,)  # "root" is gone
    client.close()
