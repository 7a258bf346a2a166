"""Request limits: request line (414), header size and count (431), body size (413, before reading
the body when its length is known). Every refusal is JSON with a request id and closes the connection;
none reaches the backend as a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import pytest

from tests.support import RawClient, Seen, gateway_config, request, rss_mb, wait_until

pytestmark = pytest.mark.integration

H = b"Host: gw.test\r\n"
LIMITS = {"max_request_line": 1024, "max_header_size": 4096, "max_headers": 10, "max_body_size": 1000}


@pytest.fixture
def limited(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, limits=LIMITS))
    return gw, be


def refused(gw, data: bytes, status: int) -> dict:
    client = RawClient(gw.port)
    try:
        with contextlib.suppress(OSError):  # the gateway may close before it has read everything
            client.send(data)
        resp = client.read_response()
        assert resp.status == status, resp
        assert resp.header("connection") == "close"
        assert client.closed_by_peer()
        body = resp.json()
        assert body["request_id"] == resp.header("x-request-id")
        return body
    finally:
        client.close()


def test_request_line_too_long_is_414(limited) -> None:
    gw, be = limited
    refused(gw, b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\n" + H + b"\r\n", 414)
    assert request(gw.port, path="/" + "a" * 1000).status == 200  # just under the limit
    assert [s.target for s in be.seen] == ["/" + "a" * 1000]


def test_request_line_too_long_sent_in_pieces(limited) -> None:
    gw, _ = limited
    client = RawClient(gw.port)
    client.send(b"GET /")
    with contextlib.suppress(OSError):
        for _ in range(20):
            client.send(b"b" * 100)
    resp = client.read_response()
    assert resp.status == 414
    client.close()


def test_header_block_too_large_is_431(limited) -> None:
    gw, be = limited
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 600) for i in range(8))
    refused(gw, b"GET / HTTP/1.1\r\n" + H + headers + b"\r\n", 431)
    assert be.raw == b""


def test_too_many_header_fields_is_431(limited) -> None:
    gw, be = limited
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(11))
    refused(gw, b"GET / HTTP/1.1\r\n" + H + headers + b"\r\n", 431)
    assert be.raw == b""
    ok = b"".join(b"X-H%d: v\r\n" % i for i in range(8))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + ok + b"\r\n")
    assert client.read_response().status == 200
    client.close()


def test_endless_header_value_is_431_with_bounded_memory(gateway, backend) -> None:
    """A field without an end: httptools would buffer it whole, so the gateway counts head bytes."""
    be = backend()
    gw = gateway(gateway_config(be.url))  # default limits
    (pid,) = gw.worker_pids()
    base = rss_mb(pid)
    client = RawClient(gw.port)
    sent = [0]

    def flood() -> None:
        with contextlib.suppress(OSError):
            client.send(b"GET / HTTP/1.1\r\n" + H + b"X-Endless: ")
            piece = b"z" * 65536
            for _ in range(4096):  # up to 256 MB
                client.sock.sendall(piece)
                sent[0] += len(piece)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    resp = client.read_response()
    assert resp.status == 431
    assert client.closed_by_peer()
    client.close()
    sender.join(10)
    assert sent[0] < 64 * 1024 * 1024
    assert rss_mb(pid) - base < 32
    assert be.raw == b""


def test_body_with_content_length_over_the_limit_is_413_before_reading_it(limited) -> None:
    gw, be = limited
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n")  # no body sent at all
    resp = client.read_response()
    assert resp.status == 413
    assert resp.json()["message"] == "request body exceeds 1000 bytes"
    assert client.closed_by_peer()
    client.close()
    assert be.raw == b""
    assert request(gw.port, "POST", body=b"x" * 1000).status == 200


def test_chunked_body_over_the_limit_is_413(limited) -> None:
    gw, be = limited
    assert request(gw.port).status == 200  # a pooled connection: the head goes out at once
    chunks = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    refused(gw, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunks, 413)
    assert len(be.seen) == 1  # only the warm-up: the oversized body never completed a request


def test_limits_default_to_safe_values(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert client.read_response().status == 414
    client.close()
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n")
    assert client.read_response().status == 431
    client.close()
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % (100 * 1024 * 1024 + 1))
    assert client.read_response().status == 413
    client.close()


def test_response_head_limit_is_configurable(gateway, backend) -> None:
    async def big_head(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        size = int(seen.target.strip("/"))
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * size + b"\r\nContent-Length: 2\r\n\r\nok")
        return True

    be = backend(big_head)
    gw = gateway(gateway_config(be.url, limits={"max_response_header_size": "2k"}))
    assert request(gw.port, path="/1500").status == 200
    resp = request(gw.port, path="/3000")  # one read holds the whole head: still too large
    assert resp.status == 502
    assert resp.json()["message"] == "upstream response head is too large"
    assert request(gw.port, path="/100000").status == 502  # over several reads
    # A reload raises the limit, for the pooled connections too.
    gw.write_config(gateway_config(be.url, limits={"max_response_header_size": "8k"}))
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: request(gw.port, path="/3000").status == 200)


def test_oversized_body_of_a_queued_request_is_answered_in_its_turn(gateway, backend) -> None:
    """A pipelined request's 413 must not overtake the response to the request before it."""

    async def slow(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        return True

    be = backend(slow)
    gw = gateway(gateway_config(be.url, limits={"max_body_size": 1000}))
    client = RawClient(gw.port)
    chunks = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    client.send(
        b"GET /first HTTP/1.1\r\n" + H + b"\r\n"
        b"POST /second HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    )
    first = client.read_response()
    assert (first.status, first.body) == (200, b"slow")
    second = client.read_response()
    assert second.status == 413
    assert client.closed_by_peer()
    client.close()
    assert [s.target for s in be.seen] == ["/first"]
