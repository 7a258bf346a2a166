"""Bad input: every malformed request gets a JSON error with a request id, the connection is closed,
and nothing of it reaches the backend — not one byte for a bad head, and never a whole request for a
bad body. Valid pipelined requests with bodies reach the backend as exactly as many requests (no
request smuggling either way).
"""

from __future__ import annotations

import pytest

from tests.support import RawClient, RawResponse, gateway_config, request, wait_until

pytestmark = pytest.mark.integration

H = b"Host: gw.test\r\n"

# (id, raw request, expected status). Each is refused while its head is parsed: the backend gets nothing.
BAD_HEADS = [
    (
        "cl-and-te",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-and-cl",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "duplicate-cl-same",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "duplicate-cl-differ",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-not-a-number", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3x\r\n\r\nabc", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    ("cl-overflow", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-chunked-gzip",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    (
        "te-twice",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-in-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n\tc\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n", 400),
    ("space-before-first-field", b"GET / HTTP/1.1\r\n X-A: b\r\n" + H + b"\r\n", 400),
    ("invalid-name-char", b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400),
    ("value-nul", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400),
    ("value-control", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x01c\r\n\r\n", 400),
    ("value-del", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x7fc\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n", 400),
    ("bare-cr-line-end", b"GET / HTTP/1.1\r" + H + b"\r\n", 400),
    ("bare-lf-line-end", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("bare-lf-header-end", b"GET / HTTP/1.1\r\nHost: gw.test\nX-A: b\r\n\r\n", 400),
    ("missing-host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    ("duplicate-host", b"GET / HTTP/1.1\r\n" + H + b"Host: other.test\r\n\r\n", 400),
    ("empty-then-real-host", b"GET / HTTP/1.1\r\nHost: \r\nHost: other.test\r\n\r\n", 400),
    ("invalid-host", b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400),
    ("host-with-userinfo", b"GET / HTTP/1.1\r\nHost: user@gw.test\r\n\r\n", 400),
    ("http09", b"GET /\r\n\r\n", 400),
    ("http12", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("http2-in-http1", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("control-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad-escape-in-path", b"GET /a%zzb HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("relative-target", b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-target-no-host", b"GET http:///a HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-target-userinfo", b"GET http://u@gw.test/a HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT gw.test:443 HTTP/1.1\r\nHost: gw.test:443\r\n\r\n", 400),
    ("unsupported-expect", b"POST / HTTP/1.1\r\n" + H + b"Expect: tea\r\nContent-Length: 1\r\n\r\nx", 400),
    (
        "upgrade-with-body",
        b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        400,
    ),
    (
        "upgrade-with-chunked-body",
        b"POST / HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
]

# Refused while the body is parsed: the head may already be on its way to the backend, but the
# backend never receives a complete request, and the connection carrying the partial one is closed.
BAD_BODIES = [
    ("chunk-size-not-hex", b"zz\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-space", b"3 \r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-0x", b"0x3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-overflow", b"fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-bare-lf", b"3\nabc\r\n0\r\n\r\n"),
    ("chunk-ext-control", b"3;a\x01\r\nabc\r\n0\r\n\r\n"),
    ("chunk-ext-bare-cr", b"3;a\rb\r\nabc\r\n0\r\n\r\n"),
    ("chunk-ext-unterminated-quote", b'3;a="b\r\nabc\r\n0\r\n\r\n'),
    ("chunk-data-overrun", b"3\r\nabcd\r\n0\r\n\r\n"),
    ("chunk-data-bare-lf", b"3\r\nabc\n0\r\n\r\n"),
    ("trailer-content-length", b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n"),
]


@pytest.fixture
def warm(gateway, backend):
    """A gateway with a backend connection already pooled (so a forwarded head would go out at once)."""
    be = backend()
    gw = gateway(gateway_config(be.url))
    assert request(gw.port, "GET", "/warm").status == 200
    return gw, be


def assert_error(resp: RawResponse, status: int) -> None:
    assert resp.status == status, resp
    body = resp.json()
    assert set(body) == {"message", "request_id"}
    assert body["message"]
    assert len(body["request_id"]) == 32
    assert resp.header("x-request-id") == body["request_id"]
    assert resp.header("content-type") == "application/json"
    assert resp.header("connection") == "close"


@pytest.mark.parametrize(("case", "data", "status"), BAD_HEADS, ids=[c[0] for c in BAD_HEADS])
def test_bad_head_is_refused_and_never_forwarded(warm, case: str, data: bytes, status: int) -> None:
    gw, be = warm
    raw_before, seen_before = len(be.raw), len(be.seen)
    client = RawClient(gw.port)
    try:
        client.send(data)
        assert_error(client.read_response(), status)
        assert client.closed_by_peer()
    finally:
        client.close()
    # The pooled connection is still idle and clean: a later request reuses it and nothing came before.
    assert request(gw.port, "GET", "/after").status == 200
    assert bytes(be.raw[raw_before:]).startswith(b"GET /after HTTP/1.1\r\n"), bytes(be.raw[raw_before:])
    assert [s.target for s in be.seen[seen_before:]] == ["/after"]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_chunked_body_is_refused_and_the_backend_never_gets_a_request(
    warm, case: str, body: bytes
) -> None:
    gw, be = warm
    seen_before, closed_before, raw_before = len(be.seen), be.closed, len(be.raw)
    client = RawClient(gw.port)
    try:
        client.send(b"POST /upload HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        assert_error(client.read_response(), 400)
        assert client.closed_by_peer()
    finally:
        client.close()
    if case.startswith("trailer"):
        # An error after the first chunk: head and chunk went out; that backend connection was cut.
        assert wait_until(lambda: be.closed > closed_before, 5)
    assert len(be.seen) == seen_before
    assert request(gw.port, "GET", "/after").status == 200
    assert [s.target for s in be.seen[seen_before:]] == ["/after"]
    if not case.startswith("trailer"):
        # A bad first chunk: the head waited for it, so not one byte reached the backend, and the
        # pooled connection carried the next request.
        assert bytes(be.raw[raw_before:]).startswith(b"GET /after HTTP/1.1\r\n"), bytes(be.raw[raw_before:])
        assert be.closed == closed_before


def test_bad_chunked_body_before_any_backend_connection(gateway, backend) -> None:
    """With a cold pool, the request is refused while the connection is still being opened."""
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert_error(client.read_response(), 400)
    client.close()
    assert request(gw.port, "GET", "/after").status == 200
    assert [s.target for s in be.seen] == ["/after"]
    assert be.raw.count(b"HTTP/1.1\r\n") == 1


def test_bad_request_pipelined_after_a_good_one(warm) -> None:
    """The good request is answered, then the bad one gets its 400 and the connection closes."""
    gw, be = warm
    seen_before = len(be.seen)
    client = RawClient(gw.port)
    client.send(b"GET /good HTTP/1.1\r\n" + H + b"\r\n" + b"GET /bad HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n")
    first = client.read_response()
    assert first.status == 200
    assert first.json()["target"] == "/good"
    assert_error(client.read_response(), 400)
    assert client.closed_by_peer()
    client.close()
    assert [s.target for s in be.seen[seen_before:]] == ["/good"]


def test_bad_request_after_queued_good_ones(warm) -> None:
    """Every valid request before the bad one is answered, in order."""
    gw, be = warm
    seen_before = len(be.seen)
    client = RawClient(gw.port)
    good = b"".join(b"GET /good/%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(3))
    client.send(good + b"GET /bad HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n")
    for i in range(3):
        resp = client.read_response()
        assert resp.status == 200
        assert resp.json()["target"] == f"/good/{i}"
    assert_error(client.read_response(), 400)
    assert client.closed_by_peer()
    client.close()
    assert [s.target for s in be.seen[seen_before:]] == [f"/good/{i}" for i in range(3)]


# -- no smuggling: what the backend parses is exactly what the client sent -------------------------------
def test_pipelined_requests_with_bodies_arrive_as_exactly_as_many_requests(warm) -> None:
    gw, be = warm
    seen_before = len(be.seen)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    requests = [
        b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
        b"POST /two HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunked_body,
        # A body that *looks like* the end of a chunked body followed by a request.
        b"POST /three HTTP/1.1\r\n"
        + H
        + b"Content-Length: %d\r\n\r\n" % len(b"0\r\n\r\n" + smuggled)
        + b"0\r\n\r\n"
        + smuggled,
        b"GET /four HTTP/1.1\r\n" + H + b"\r\n",
        b"POST /five HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\nContent-Length: 3\r\n\r\nabc",
    ]
    client = RawClient(gw.port)
    client.send(b"".join(requests))
    answers = [client.read_response() for _ in requests]
    client.close()
    assert [a.json()["target"] for a in answers] == ["/one", "/two", "/three", "/four", "/five"]
    seen = be.seen[seen_before:]
    assert [s.target for s in seen] == ["/one", "/two", "/three", "/four", "/five"]
    assert [s.body for s in seen] == [smuggled, smuggled, b"0\r\n\r\n" + smuggled, b"", b"abc"]
    assert all(s.method in ("GET", "POST") for s in seen)


def test_chunk_extensions_and_trailers_are_not_forwarded(warm) -> None:
    """The gateway re-frames a chunked body: extensions and trailer fields never reach the backend,
    so no field can be injected through them."""
    gw, be = warm
    raw_before = len(be.raw)
    client = RawClient(gw.port)
    client.send(
        b"POST /t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b'3;name=value;q="quoted"\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\nHost: evil.test\r\n\r\n'
    )
    resp = client.read_response()
    assert resp.status == 200
    forwarded = bytes(be.raw[raw_before:])
    assert be.seen[-1].body == b"abcde"
    assert b"name=value" not in forwarded
    assert b"X-Trailer" not in forwarded and b"evil.test" not in forwarded
    # The connection goes on: the trailers did not confuse the request state.
    client.send(b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
    assert client.read_response().json()["target"] == "/next"
    client.close()


def test_unread_request_body_closes_the_connection(gateway, backend) -> None:
    """A 404 answered before the body was read: the rest of the body must not be parsed as a request."""
    be = backend()
    gw = gateway(gateway_config(be.url, routes=[{"name": "api", "service": "backend", "paths": ["/api"]}]))
    client = RawClient(gw.port)
    smuggled = b"GET /api/smuggled HTTP/1.1\r\n" + H + b"\r\n"
    client.send(b"POST /nope HTTP/1.1\r\n" + H + b"Content-Length: 100000\r\n\r\n" + smuggled)
    resp = client.read_response()
    assert resp.status == 404
    assert resp.header("connection") == "close"
    assert client.closed_by_peer()
    client.close()
    assert be.seen == []
