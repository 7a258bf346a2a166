"""https-policy: redirects of clear-text requests (target, port, status by method) through the real
pipeline in process; HSTS over real TLS is in tests/integration/test_tls_routes.py."""

from __future__ import annotations

import pytest

from tests.plugins.harness import Harness
from tollway.errors import ConfigError


def harness(**route: object) -> Harness:
    return Harness({"routes": [{"name": "r", "service": "backend", "paths": ["/"], **route}]})


def test_redirect_keeps_path_and_query_and_picks_status_by_method() -> None:
    gw = harness(https_redirect=True)
    result = gw.request("GET", "/a/b?c=1&d=%20")
    assert result.status == 301
    assert result.header("location") == "https://gateway.test/a/b?c=1&d=%20"
    assert result.upstream is None
    post = gw.request("POST", "/form", body=b"x=1")
    assert post.status == 308
    head = gw.request("HEAD", "/x")
    assert head.status == 301


def test_redirect_port_host_port_and_ipv6() -> None:
    gw = harness(https_redirect=8443)
    result = gw.request("GET", "/p", raw=b"GET /p HTTP/1.1\r\nHost: api.test:8080\r\n\r\n")
    assert result.header("location") == "https://api.test:8443/p"
    result = gw.request("GET", "/p", raw=b"GET /p HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert result.header("location") == "https://[::1]:8443/p"
    result = gw.request("GET", "/", raw=b"GET http://api.test/abs?q=1 HTTP/1.1\r\nHost: api.test\r\n\r\n")
    assert result.header("location") == "https://api.test:8443/abs?q=1"


def test_hsts_alone_never_on_clear_text_and_plugin_form() -> None:
    gw = harness(hsts="max-age=60")
    result = gw.request("GET", "/")
    assert result.status == 200 and result.header("strict-transport-security") is None
    gw = Harness({"plugins": [{"name": "https-policy", "config": {"redirect": True, "https_port": 443}}]})
    assert gw.request("GET", "/x").header("location") == "https://gateway.test/x"


def test_invalid_options() -> None:
    with pytest.raises(ConfigError, match="https_redirect"):
        harness(https_redirect=70000)
    with pytest.raises(ConfigError, match="hsts"):
        Harness({"plugins": [{"name": "https-policy", "config": {"hsts": "a\nb"}}]})
