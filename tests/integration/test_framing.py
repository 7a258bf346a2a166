"""Message framing and proxy semantics (RFC 9110/9112) through a real gateway: keep-alive and
pipelining from HTTP/1.1 and 1.0 clients, the backend pool, HEAD/1xx/204/304, Expect: 100-continue,
hop-by-hop fields, X-Forwarded-*, Host, request ids, close-delimited and chunked responses.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.support import RawClient, Seen, gateway_config, request, response, wait_until

pytestmark = pytest.mark.integration

H = b"Host: gw.test\r\n"


def scripted(*chunks: bytes, keep: bool = True):
    """A responder that writes `chunks` as they are (with a flush between them)."""

    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        for data in chunks:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0.01)
        return keep

    return respond


# -- keep-alive and pipelining ------------------------------------------------------------------------
def test_backend_connection_is_reused_across_client_connections(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    for i in range(10):
        assert request(gw.port, "GET", f"/c/{i}").json()["connection"] == 1
    assert be.connections == 1


def test_pipelined_requests_are_answered_in_order(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"".join(b"GET /p/%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(20)))
    targets = [client.read_response().json()["target"] for _ in range(20)]
    assert targets == [f"/p/{i}" for i in range(20)]
    # The connection is still usable afterwards.
    client.send(b"GET /after HTTP/1.1\r\n" + H + b"\r\n")
    assert client.read_response().json()["target"] == "/after"
    client.close()


def test_pipelined_requests_split_at_every_byte(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    data = (
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"
        b"POST /b HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\n" + H + b"\r\n"
    )
    client.sock.setsockopt(6, 1, 1)  # TCP_NODELAY: really one byte per segment
    for i in range(len(data)):
        client.send(data[i : i + 1])
    answers = [client.read_response().json() for _ in range(3)]
    client.close()
    assert [a["target"] for a in answers] == ["/a", "/b", "/c"]
    assert [s.body for s in be.seen] == [b"hello", b"hi", b""]


def test_http10_client_without_keep_alive_is_closed(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET /old HTTP/1.0\r\n\r\n")  # no Host: allowed in HTTP/1.0
    resp = client.read_response()
    assert resp.status == 200
    assert resp.header("connection") == "close"
    assert client.closed_by_peer()
    client.close()
    assert be.seen[-1].version == "HTTP/1.1"  # the backend always gets HTTP/1.1, with a Host
    assert be.seen[-1].header("host") == f"127.0.0.1:{be.port}"


def test_http10_keep_alive(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    for i in range(3):
        client.send(b"GET /k/%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
        resp = client.read_response()
        assert resp.status == 200
        assert resp.header("connection") == "keep-alive"
    assert not client.closed_by_peer(0.3)
    client.close()


def test_connection_close_from_client_is_honoured(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    resp = client.read_response()
    assert resp.header("connection") == "close"
    assert client.closed_by_peer()
    client.close()
    # ...but the backend connection is still pooled: the client's Connection is hop-by-hop.
    assert request(gw.port).json()["connection"] == 1


def test_backend_connection_close_is_not_reused(gateway, backend) -> None:
    async def closing(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(200, b"bye", [("Connection", "close")]))
        return False

    be = backend(closing)
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    for _ in range(3):
        client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        resp = client.read_response()
        assert resp.body == b"bye"
        assert resp.header("connection") is None  # the backend's close is not the client's
    client.close()
    assert be.connections == 3


def test_pooled_connection_closed_by_backend_while_idle_is_never_a_client_error(gateway, backend) -> None:
    """The backend closes idle keep-alive connections now and then (its own idle timeout). A request that
    meets such a connection as it closes is sent again on a fresh one when it is safe to repeat (here GET
    and PUT with a body; a POST only with `replay_non_idempotent`, see test_connection_end.py)."""
    state = {"n": 0}

    async def close_after(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        state["n"] += 1
        writer.write(response(200, b"ok"))
        await writer.drain()
        return state["n"] % 2 == 1  # every second response: close the connection right after it

    be = backend(close_after)
    gw = gateway(gateway_config(be.url))
    for i in range(20):
        resp = request(gw.port, "PUT" if i % 3 else "GET", f"/{i}", body=b"x" * 10 if i % 3 else None)
        assert resp.status == 200, resp
        assert resp.body == b"ok"
    assert len(be.seen) == 20


# -- HEAD, 1xx, 204, 304 --------------------------------------------------------------------------------
def test_head_response_has_no_body_and_keeps_the_connection(gateway, backend) -> None:
    async def head(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Kind: head\r\n\r\n")
        else:
            writer.write(response(200, b"body"))
        return True

    be = backend(head)
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"HEAD / HTTP/1.1\r\n" + H + b"\r\n" + b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = client.read_response(head_request=True)
    assert first.header("content-length") == "1000"
    assert first.header("x-kind") == "head"
    second = client.read_response()
    assert second.body == b"body"
    client.close()
    assert be.connections == 1


def test_head_with_chunked_response_head(gateway, backend) -> None:
    be = backend(scripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"HEAD / HTTP/1.1\r\n" + H + b"\r\n" + b"HEAD / HTTP/1.1\r\n" + H + b"\r\n")
    assert client.read_response(head_request=True).status == 200
    assert client.read_response(head_request=True).status == 200
    assert not client.closed_by_peer(0.3)
    assert client.buf == b""  # no body bytes (no "0\r\n\r\n") after either head
    client.close()


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(gateway, backend, status: int) -> None:
    # A body-less status with a Content-Length (for 304, the length of the representation): no body.
    head = f'HTTP/1.1 {status} Status\r\nETag: "x"\r\nContent-Length: 10\r\n\r\n'.encode()
    be = backend(scripted(head))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    for _ in range(2):
        client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        resp = client.read_response()
        assert resp.status == status
        assert resp.header("etag") == '"x"'
        assert resp.header("transfer-encoding") is None
    assert not client.closed_by_peer(0.3)
    assert client.buf == b""
    client.close()
    assert be.connections == 1


def test_interim_103_is_forwarded_and_100_is_not(gateway, backend) -> None:
    be = backend(
        scripted(
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
            b"Connection: x-hop\r\nX-Hop: 1\r\n\r\n",
            response(200, b"done"),
        )
    )
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    early = client.read_response()
    assert early.status == 103
    assert early.header("link") == "</a.css>; rel=preload"
    assert early.header("x-hop") is None and early.header("connection") is None
    final = client.read_response()
    assert final.status == 200 and final.body == b"done"
    # An HTTP/1.0 client gets no interim response at all.
    client10 = RawClient(gw.port)
    client10.send(b"GET / HTTP/1.0\r\n\r\n")
    resp = client10.read_response()
    assert resp.status == 200 and resp.body == b"done"
    client.close()
    client10.close()


# -- Expect: 100-continue ---------------------------------------------------------------------------------
def test_expect_100_continue(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"PUT /up HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = client.read_response()
    assert interim.status == 100
    client.send(b"hello")
    resp = client.read_response()
    assert resp.status == 200
    client.close()
    assert be.seen[-1].body == b"hello"
    assert be.seen[-1].header("expect") is None  # the gateway answered it


def test_expect_100_continue_over_the_body_limit_is_413_without_reading(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, limits={"max_body_size": 1000}))
    client = RawClient(gw.port)
    client.send(b"PUT /up HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 1001\r\n\r\n")
    resp = client.read_response()
    assert resp.status == 413
    assert resp.json()["message"]
    assert client.closed_by_peer()
    client.close()
    assert be.raw == b""


def test_expect_100_continue_to_a_404_is_refused_without_reading(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, routes=[{"name": "api", "service": "backend", "paths": ["/api"]}]))
    client = RawClient(gw.port)
    client.send(b"PUT /other HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    resp = client.read_response()
    assert resp.status == 404
    assert resp.header("connection") == "close"
    assert client.closed_by_peer()
    client.close()


def test_expect_without_body_or_from_http10_gets_no_100(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n\r\n")
    assert client.read_response().status == 200
    client.close()
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
    assert client.read_response().status == 200
    client.close()


# -- hop-by-hop fields ---------------------------------------------------------------------------------
def test_hop_by_hop_request_fields_are_removed(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(
        b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, X-Hop-A, x-hop-b\r\nConnection: X-Hop-C\r\n"
        b"X-Hop-A: 1\r\nX-Hop-B: 2\r\nX-Hop-C: 3\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
        b"X-End-To-End: kept\r\n\r\n"
    )
    assert client.read_response().status == 200
    client.close()
    names = {name.lower() for name, _ in be.seen[-1].headers}
    for hop in (
        "connection",
        "x-hop-a",
        "x-hop-b",
        "x-hop-c",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
    ):
        assert hop not in names, hop
    assert be.seen[-1].header("x-end-to-end") == "kept"


def test_hop_by_hop_response_fields_are_removed(gateway, backend) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
        b"Upgrade: h2c\r\nTrailer: X-T\r\nProxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
    )
    be = backend(scripted(head))
    gw = gateway(gateway_config(be.url))
    resp = request(gw.port)
    assert resp.body == b"ok"
    names = {name.lower() for name, _ in resp.headers}
    for hop in (
        "x-secret",
        "keep-alive",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-connection",
        "te",
    ):
        assert hop not in names, hop
    assert resp.header("x-kept") == "yes"


# -- X-Forwarded-*, Host, request ids ------------------------------------------------------------------
def test_forwarded_headers_from_an_untrusted_client_are_replaced(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    request(
        gw.port,
        headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.test"},
    )
    seen = be.seen[-1]
    assert seen.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert seen.header_all("x-forwarded-proto") == ["http"]
    assert seen.header_all("x-forwarded-host") == ["gateway.test"]


def test_forwarded_headers_from_a_trusted_proxy_are_extended(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, trusted_proxies=["127.0.0.0/8"]))
    client = RawClient(gw.port)
    client.send(
        b"GET / HTTP/1.1\r\n" + H + b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: public.test\r\n\r\n"
    )
    client.read_response()
    client.close()
    seen = be.seen[-1]
    assert seen.header_all("x-forwarded-for") == ["1.2.3.4, 5.6.7.8, 127.0.0.1"]
    assert seen.header_all("x-forwarded-proto") == ["https"]
    assert seen.header_all("x-forwarded-host") == ["public.test"]
    # Without forwarded headers, a trusted proxy's request gets the gateway's own values.
    request(gw.port)
    assert be.seen[-1].header("x-forwarded-for") == "127.0.0.1"
    assert be.seen[-1].header("x-forwarded-host") == "gateway.test"


@pytest.mark.parametrize(
    ("mode", "expected"), [("backend", None), ("preserve", "gateway.test"), ("api.internal", "api.internal")]
)
def test_host_per_service(gateway, backend, mode: str, expected: str | None) -> None:
    be = backend()
    config = gateway_config(be.url)
    config["services"][0]["host_header"] = mode
    gw = gateway(config)
    request(gw.port)
    assert be.seen[-1].header_all("host") == [expected or f"127.0.0.1:{be.port}"]


def test_request_id_is_generated_or_passed_through(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    request(gw.port)
    request(gw.port)
    generated = [s.header("x-request-id") for s in be.seen]
    assert all(len(rid or "") == 32 for rid in generated)
    assert generated[0] != generated[1]
    request(gw.port, headers={"X-Request-Id": "client-chose-this"})
    assert be.seen[-1].header_all("x-request-id") == ["client-chose-this"]


def test_absolute_form_target(gateway, backend) -> None:
    be = backend()
    gw = gateway(
        gateway_config(
            be.url, routes=[{"name": "a", "service": "backend", "hosts": ["api.test"], "paths": ["/"]}]
        )
    )
    client = RawClient(gw.port)
    client.send(b"GET http://API.test:8080/x/y?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert client.read_response().status == 200
    client.send(b"GET http://api.test?q=2 HTTP/1.1\r\nHost: api.test\r\n\r\n")
    assert client.read_response().status == 200
    client.close()
    assert [s.target for s in be.seen] == ["/x/y?q=1", "/?q=2"]
    assert be.seen[0].header("x-forwarded-host") == "API.test:8080"


def test_path_is_normalised_before_routing_and_forwarding(gateway, backend) -> None:
    be = backend()
    gw = gateway(
        gateway_config(be.url, routes=[{"name": "public", "service": "backend", "paths": ["/public"]}])
    )
    assert request(gw.port, path="/admin/../public/x?y=1").status == 200
    assert be.seen[-1].target == "/public/x?y=1"
    assert request(gw.port, path="/public/../admin").status == 404


# -- response bodies: chunked, close-delimited, HTTP/1.0 clients -------------------------------------------
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
)


def test_chunked_response_passes_through_to_http11(gateway, backend) -> None:
    be = backend(scripted(CHUNKED[:60], CHUNKED[60:]))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    for _ in range(2):
        client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        resp = client.read_response()
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == b"hello world"
    client.close()
    assert be.connections == 1


def test_chunked_response_to_http10_client_is_dechunked_and_closed(gateway, backend) -> None:
    be = backend(scripted(CHUNKED[:60], CHUNKED[60:]))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    resp = client.read_response()  # no length: reads until the gateway closes
    client.close()
    assert resp.header("transfer-encoding") is None
    assert resp.header("connection") == "close"
    assert resp.body == b"hello world"
    # The backend connection was fully read, so it is reused.
    assert request(gw.port).status == 200
    assert be.connections == 1


def test_close_delimited_response_is_chunked_for_http11_clients(gateway, backend) -> None:
    be = backend(
        scripted(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"part one, ", b"part two", keep=False
        )
    )
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    for _ in range(2):
        client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        resp = client.read_response()
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == b"part one, part two"
    client.close()
    assert be.connections == 2  # a close-delimited response leaves no reusable connection


def test_close_delimited_response_to_http10_client(gateway, backend) -> None:
    be = backend(scripted(b"HTTP/1.0 200 OK\r\n\r\n", b"old style", keep=False))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    resp = client.read_response()
    client.close()
    assert resp.body == b"old style"
    assert resp.header("transfer-encoding") is None


def test_chunked_request_body_is_forwarded_chunked(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    for piece in (b"a" * 10, b"b" * 100, b"c" * 1000):
        client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    client.send(b"0\r\n\r\n")
    assert json.loads(client.read_response().body)["body_length"] == 1110
    client.close()
    seen = be.seen[-1]
    assert seen.header("transfer-encoding") == "chunked"
    assert seen.header("content-length") is None
    assert seen.body == b"a" * 10 + b"b" * 100 + b"c" * 1000


def test_empty_body_with_content_length_zero(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    resp = request(gw.port, "POST", body=b"")
    assert resp.status == 200
    assert be.seen[-1].header("content-length") == "0"


# -- backends that misbehave ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad : yes\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-CR: a\rb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"garbage\r\n\r\n",
    ],
)
def test_invalid_backend_response_is_502(gateway, backend, head: bytes) -> None:
    be = backend(scripted(head))
    gw = gateway(gateway_config(be.url))
    resp = request(gw.port)
    assert resp.status == 502
    assert resp.json()["request_id"] == resp.header("x-request-id")
    assert b"ok" not in resp.body


def test_unrequested_101_is_502(gateway, backend) -> None:
    be = backend(
        scripted(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    )
    gw = gateway(gateway_config(be.url))
    resp = request(gw.port)
    assert resp.status == 502
    assert "switched protocols" in resp.json()["message"]
    assert wait_until(lambda: be.closed == 1)  # that connection is not kept


def test_backend_sending_more_than_its_content_length_is_not_reused(gateway, backend) -> None:
    be = backend(scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    for _ in range(2):
        client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        assert client.read_response().body == b"ok"
    client.close()
    assert be.connections == 2
