"""cors, correlation-id and request-size-limit: schema, handler, integration."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from tests.support import RawClient, echo, gateway_config, request, response
from tollway.plugins.builtin.correlation_id import CorrelationIdConfig
from tollway.plugins.builtin.cors import CorsConfig
from tollway.plugins.builtin.request_size_limit import RequestSizeLimitConfig

APP = "https://app.example.com"


def cors(**conf) -> dict:
    return {"plugins": [{"name": "cors", "config": {"origins": [APP], **conf}}]}


def preflight(method: str = "PUT", headers: str | None = "Content-Type, X-Trace", origin: str = APP) -> dict:
    found = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        found["Access-Control-Request-Headers"] = headers
    return found


# -- cors ---------------------------------------------------------------------------------------------------
def test_cors_schema():
    assert CorsConfig(origins=["*"]).methods == ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"]
    for bad in (["app.example.com"], ["https://a.com/path"], ["~(unclosed"], []):
        with pytest.raises(ValidationError):
            CorsConfig(origins=bad)
    with pytest.raises(ValidationError, match="not an HTTP method"):
        CorsConfig(origins=["*"], methods=["GET POST"])
    assert CorsConfig(origins=["*"], methods=["get"]).methods == ["GET"]


def test_preflight_is_answered_at_the_gateway(harness):
    gw = harness(cors(credentials=True, max_age="10m", exposed_headers=["X-Total"]))
    result = gw.request("OPTIONS", "/items", preflight())
    assert result.status == 204
    assert result.upstream is None
    assert result.header("access-control-allow-origin") == APP
    assert result.header("access-control-allow-methods") == "GET, HEAD, PUT, PATCH, POST, DELETE"
    assert result.header("access-control-allow-headers") == "Content-Type, X-Trace"
    assert result.header("access-control-allow-credentials") == "true"
    assert result.header("access-control-max-age") == "600"
    assert "Origin" in result.header("vary")
    assert result.response.body == b""


@pytest.mark.parametrize(
    "headers",
    [preflight(origin="https://evil.example.com"), preflight(method="TRACE"), preflight(headers="X-Nope")],
)
def test_disallowed_preflights_get_403_without_cors_headers(harness, headers):
    gw = harness(cors(headers=["Content-Type", "X-Trace"]))
    result = gw.request("OPTIONS", "/items", headers)
    assert result.status == 403
    assert result.header("access-control-allow-origin") is None


def test_actual_requests_get_cors_headers_replacing_the_backends(harness):
    gw = harness(cors(credentials=True, exposed_headers=["X-Total"]))
    backend = (200, [("Content-Type", "application/json"), ("Access-Control-Allow-Origin", "*")], b"{}")
    result = gw.request("GET", "/items", {"Origin": APP}, backend=backend)
    assert result.status == 200
    assert result.response.header_all("access-control-allow-origin") == [APP]
    assert result.header("access-control-allow-credentials") == "true"
    assert result.header("access-control-expose-headers") == "X-Total"
    assert result.header("vary") == "Origin"
    other = gw.request("GET", "/items", {"Origin": "https://evil.example.com"})
    assert other.status == 200  # not blocked: the browser withholds it, having no CORS headers
    assert other.header("access-control-allow-origin") is None
    plain = gw.request("GET", "/items")
    assert plain.header("access-control-allow-origin") is None


def test_a_refused_origin_loses_the_backends_own_cors_grant(harness):
    gw = harness(cors(preflight_continue=True))
    grants = [
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Expose-Headers", "X-Secret"),
        ("X-Other", "kept"),
    ]
    backend = (200, [("Content-Type", "application/json"), *grants], b'{"secret": 1}')
    evil = gw.request("GET", "/items", {"Origin": "https://evil.example.com"}, backend=backend)
    assert evil.status == 200
    for name in ("access-control-allow-origin", "access-control-allow-credentials"):
        assert evil.response.header_all(name) == [], name
    assert evil.header("access-control-expose-headers") is None
    assert evil.header("x-other") == "kept"
    assert evil.response.body == b'{"secret": 1}'  # intact: only the browser's permission is gone
    # a preflight forwarded to the backend (preflight_continue) loses it too
    forwarded = gw.request("OPTIONS", "/items", preflight(origin="https://evil.example.com"), backend=backend)
    assert forwarded.upstream is not None
    assert forwarded.header("access-control-allow-origin") is None
    # without Origin (not a cross-origin request) the backend's headers pass untouched
    assert gw.request("GET", "/items", backend=backend).header("access-control-allow-origin") == "*"


def test_gateway_answers_carry_cors_headers_too(harness):
    gw = harness({"plugins": [{"name": "cors", "config": {"origins": [APP]}}, {"name": "key-auth"}]})
    denied = gw.request("GET", "/", {"Origin": APP})
    assert denied.status == 401
    assert denied.header("access-control-allow-origin") == APP  # so the page can read the 401


def test_wildcards_and_patterns(harness):
    star = harness({"plugins": [{"name": "cors", "config": {"origins": ["*"]}}]})
    assert star.request("GET", "/", {"Origin": "https://x.test"}).header("access-control-allow-origin") == "*"
    star_credentials = harness(
        {"plugins": [{"name": "cors", "config": {"origins": ["*"], "credentials": True}}]}
    )
    reflected = star_credentials.request("GET", "/", {"Origin": "https://x.test"})
    assert reflected.header("access-control-allow-origin") == "https://x.test"  # never "*" with credentials
    pattern = harness(cors(origins=[r"~https://[a-z]+\.example\.com"]))
    assert (
        pattern.request("GET", "/", {"Origin": "https://shop.example.com"}).header(
            "access-control-allow-origin"
        )
        == "https://shop.example.com"
    )
    assert (
        pattern.request("GET", "/", {"Origin": "https://shop.example.com.evil.io"}).header(
            "access-control-allow-origin"
        )
        is None
    )


def test_preflight_continue_forwards_to_the_backend(harness):
    gw = harness(cors(preflight_continue=True))
    result = gw.request("OPTIONS", "/", preflight())
    assert result.upstream is not None and result.upstream.start.startswith("OPTIONS")


# -- correlation-id ------------------------------------------------------------------------------------------
def test_correlation_id_schema():
    assert CorrelationIdConfig().header_name == "X-Correlation-ID"
    with pytest.raises(ValidationError):
        CorrelationIdConfig(generator="sequence")
    with pytest.raises(ValidationError):
        CorrelationIdConfig(header_name="X Bad")


def test_correlation_id_reuses_the_request_id_by_default(harness):
    result = harness({"plugins": [{"name": "correlation-id"}]}).request()
    seen = result.upstream
    assert seen.header("x-correlation-id") == seen.header("x-request-id")
    assert result.header("x-correlation-id") is None  # not echoed unless asked


def test_correlation_id_keeps_the_clients_and_echoes(harness):
    gw = harness({"plugins": [{"name": "correlation-id", "config": {"echo_downstream": True}}]})
    result = gw.request("GET", "/", {"X-Correlation-ID": "abc-123"})
    assert result.upstream.header_all("x-correlation-id") == ["abc-123"]
    assert result.header("x-correlation-id") == "abc-123"


@pytest.mark.parametrize(
    ("generator", "pattern"),
    [
        ("uuid", r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"),
        ("uuid#counter", r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}#\d+$"),
    ],
)
def test_correlation_id_generators(harness, generator, pattern):
    gw = harness(
        {"plugins": [{"name": "correlation-id", "config": {"generator": generator, "header_name": "Trace"}}]}
    )
    first = gw.request().upstream.header("trace")
    second = gw.request().upstream.header("trace")
    assert re.match(pattern, first) and re.match(pattern, second)
    assert first != second


def test_correlation_id_as_x_request_id_echoes_the_gateways_id(harness):
    gw = harness(
        {
            "plugins": [
                {"name": "correlation-id", "config": {"header_name": "X-Request-Id", "echo_downstream": True}}
            ]
        }
    )
    result = gw.request("GET", "/", {"X-Request-Id": "client-chosen"})
    assert result.upstream.header_all("x-request-id") == ["client-chosen"]
    assert result.response.header_all("x-request-id") == ["client-chosen"]


# -- request-size-limit --------------------------------------------------------------------------------------
def test_size_limit_schema():
    assert RequestSizeLimitConfig(max_body_size="1k").max_body_size == 1024
    with pytest.raises(ValidationError):
        RequestSizeLimitConfig()


def test_content_length_over_the_limit_is_413_before_forwarding(harness):
    gw = harness({"plugins": [{"name": "request-size-limit", "config": {"max_body_size": 10}}]})
    assert gw.request("POST", "/", body=b"x" * 10).status == 200
    over = gw.request("POST", "/", body=b"x" * 11)
    assert over.status == 413
    assert over.upstream is None
    assert over.json()["message"] == "request body too large"
    assert over.header("connection") == "close"


def test_chunked_bodies_are_counted(harness):
    gw = harness({"plugins": [{"name": "request-size-limit", "config": {"max_body_size": 10}}]})
    small = gw.request(
        raw=b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert small.status == 200
    big = gw.request(
        raw=b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
    )
    assert big.status == 413
    strict = harness(
        {
            "plugins": [
                {
                    "name": "request-size-limit",
                    "config": {"max_body_size": 10, "require_content_length": True},
                }
            ]
        }
    )
    assert (
        strict.request(
            raw=b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).status
        == 411
    )


# -- integration --------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cors_correlation_and_size_limit_through_a_real_gateway(gateway, backend):
    async def grants_everyone(seen, writer):  # a backend that says "*" itself, on /grant
        if seen.target == "/grant":
            headers = [("Access-Control-Allow-Origin", "*"), ("X-Backend", "grant")]
            writer.write(response(200, b"{}", headers))
            return True
        return await echo(seen, writer)

    be = backend(grants_everyone)
    cfg = gateway_config(
        be.url,
        routes=[
            {
                "name": "api",
                "service": "backend",
                "paths": ["/"],
                "plugins": [
                    {"name": "cors", "config": {"origins": [APP], "max_age": 60}},
                    {"name": "correlation-id", "config": {"echo_downstream": True}},
                    {"name": "request-size-limit", "config": {"max_body_size": "1k"}},
                ],
            },
        ],
    )
    gw = gateway(cfg)
    evil = request(gw.port, "GET", "/grant", headers={"Origin": "https://evil.example.com"})
    assert evil.status == 200
    assert evil.header("access-control-allow-origin") is None  # the backend's "*" is removed
    assert evil.header("x-backend") == "grant"
    assert len(be.seen) == 1
    be.seen.clear()
    pre = request(gw.port, "OPTIONS", "/x", headers=preflight())
    assert pre.status == 204
    assert pre.header("access-control-max-age") == "60"
    assert be.seen == []
    ok = request(gw.port, "POST", "/x", headers={"Origin": APP}, body=b"{}")
    assert ok.status == 200
    assert ok.header("access-control-allow-origin") == APP
    assert ok.header("x-correlation-id") == be.seen[-1].header("x-correlation-id")
    client = RawClient(gw.port)
    client.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n")  # no body needed to refuse it
    assert client.read_response().status == 413
    assert client.closed_by_peer()
    client.close()
    assert len(be.seen) == 1
