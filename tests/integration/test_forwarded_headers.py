"""X-Real-IP, X-Forwarded-Port and X-Forwarded-Prefix (gateway.forwarded_headers) as a real backend
receives them: off by default, the gateway's own values when on, a trusted proxy's kept."""

from __future__ import annotations

import pytest

from tests.support import gateway_config, request
from tollway.proxy.forwarded import stripped_prefix

pytestmark = pytest.mark.integration

ALL_ON = {"x_real_ip": True, "x_forwarded_port": True, "x_forwarded_prefix": True}
FORGED = {"X-Real-IP": "6.6.6.6", "X-Forwarded-Port": "1", "X-Forwarded-Prefix": "/evil"}
ROUTES = [
    {"name": "api", "service": "backend", "paths": ["/api"], "strip_path": True},
    {"name": "versioned", "service": "backend", "paths": ["~^/v[0-9]+/"], "strip_path": True, "priority": 1},
    {
        "name": "rewritten",
        "service": "backend",
        "paths": ["/old/{id}"],
        "rewrite": "/new/{id}",
        "strip_path": True,
    },
    {"name": "rest", "service": "backend", "paths": ["/"]},
]


def test_off_by_default_and_client_values_pass_as_before(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, routes=ROUTES))
    assert request(gw.port, "GET", "/api/users").status == 200
    seen = be.seen[-1]
    assert seen.target == "/users"
    for name in FORGED:
        assert seen.header(name) is None
    request(gw.port, "GET", "/api/users", headers=FORGED)
    assert be.seen[-1].header("x-real-ip") == "6.6.6.6"  # an ordinary header while the option is off


def test_gateway_values_replace_an_untrusted_clients(gateway, backend):
    be = backend()
    gw = gateway(
        gateway_config(be.url, routes=ROUTES, forwarded_headers=ALL_ON, trusted_proxies=["10.0.0.0/8"])
    )
    assert request(gw.port, "GET", "/api/users?x=1", headers=FORGED).status == 200
    seen = be.seen[-1]
    assert seen.target == "/users?x=1"
    assert seen.header_all("x-real-ip") == ["127.0.0.1"]
    assert seen.header_all("x-forwarded-port") == [str(gw.port)]
    assert seen.header_all("x-forwarded-prefix") == ["/api"]
    assert seen.header("x-forwarded-for") == "127.0.0.1"  # unchanged by the option
    request(gw.port, "GET", "/api")
    assert (be.seen[-1].target, be.seen[-1].header("x-forwarded-prefix")) == ("/", "/api")
    request(gw.port, "GET", "/v2/items/7")
    assert (be.seen[-1].target, be.seen[-1].header("x-forwarded-prefix")) == ("/items/7", "/v2")
    # nothing stripped (no strip_path, or a rewrite): no prefix at all, and the forged one is gone
    for path in ("/other", "/old/5"):
        request(gw.port, "GET", path, headers=FORGED)
        seen = be.seen[-1]
        assert seen.header("x-forwarded-prefix") is None, path
        assert seen.header_all("x-real-ip") == ["127.0.0.1"]
    assert be.seen[-1].target == "/new/5"


def test_a_trusted_proxys_values_are_kept(gateway, backend):
    be = backend()
    gw = gateway(
        gateway_config(be.url, routes=ROUTES, forwarded_headers=ALL_ON, trusted_proxies=["127.0.0.0/8"])
    )
    proxy = {"X-Real-IP": "198.51.100.4", "X-Forwarded-Port": "443", "X-Forwarded-Prefix": "/edge"}
    request(gw.port, "GET", "/api/users", headers=proxy)
    seen = be.seen[-1]
    assert seen.header_all("x-real-ip") == ["198.51.100.4"]
    assert seen.header_all("x-forwarded-port") == ["443"]
    assert seen.header_all("x-forwarded-prefix") == ["/edge"]
    # a trusted proxy that only sends X-Forwarded-For: X-Real-IP is the client it vouches for
    request(gw.port, "GET", "/api/users", headers={"X-Forwarded-For": "203.0.113.7"})
    seen = be.seen[-1]
    assert seen.header_all("x-real-ip") == ["203.0.113.7"]
    assert seen.header_all("x-forwarded-port") == [str(gw.port)]
    assert seen.header_all("x-forwarded-prefix") == ["/api"]


def test_only_the_headers_turned_on_are_touched(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, routes=ROUTES, forwarded_headers={"x_forwarded_prefix": True}))
    request(gw.port, "GET", "/api/users", headers=FORGED)
    seen = be.seen[-1]
    assert seen.header_all("x-forwarded-prefix") == ["/api"]
    assert seen.header_all("x-real-ip") == ["6.6.6.6"]  # off: the client's header, as before
    assert seen.header_all("x-forwarded-port") == ["1"]


@pytest.mark.parametrize(
    ("path", "rest", "prefix"),
    [
        ("/api/users", "/users", b"/api"),
        ("/api", "/", b"/api"),
        ("/api/", "/", b"/api"),
        ("/v1users", "/users", b"/v1"),  # the router added the "/" of the rest
        ("/v1/x", "/x", b"/v1"),
        ("/apix", "/x", b"/api"),  # a prefix is not cut at a segment boundary
        ("/users/7", "/", b"/users/7"),  # a template that matched it all
        ("/files/a/b", "/a/b", b"/files"),
    ],
)
def test_stripped_prefix(path, rest, prefix):
    assert stripped_prefix(path, rest) == prefix
