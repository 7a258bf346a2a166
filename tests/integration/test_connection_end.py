"""What follows a connection's last request, and what a backend may be sent twice.

- A request pipelined after one the gateway rejected never reaches a backend (issue: `GET /%zz`
  followed in the same packet by `POST /after` ran the POST at the backend).
- Bytes after a request that closes the connection (`Connection: close`, HTTP/1.0) are discarded: the
  client gets the backend's answer, not a 400.
- A reused keep-alive connection reset without an answer: the request is sent again only if it is
  safe to repeat (an idempotent method), or if the service says so (`replay_non_idempotent`).
- A malformed first chunk reaches no backend: the head waits for the first chunk to parse.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support import RawClient, Seen, gateway_config, request, response, wait_until

pytestmark = pytest.mark.integration

H = b"Host: gw.test\r\n"


@pytest.fixture
def warm(gateway, backend):
    """A gateway with a pooled backend connection, so a forwarded head would go out at once."""
    be = backend()
    gw = gateway(gateway_config(be.url))
    for _ in range(3):
        assert request(gw.port, "GET", "/warm").status == 200
    return gw, be


# -- item 2: nothing after a rejected request ------------------------------------------------------------
REJECTED = [
    ("bad-escape", b"GET /%zz HTTP/1.1\r\n" + H + b"\r\n"),
    ("bad-host", b"GET /x HTTP/1.1\r\nHost: bad host\r\n\r\n"),
    ("bad-absolute-target", b"GET ftp://gw.test/x HTTP/1.1\r\n" + H + b"\r\n"),
    ("bad-escape-with-body", b"POST /%zz HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"),
]


@pytest.mark.parametrize(("case", "bad"), REJECTED, ids=[c[0] for c in REJECTED])
def test_nothing_pipelined_after_a_rejected_request_reaches_the_backend(warm, case: str, bad: bytes) -> None:
    gw, be = warm
    for _ in range(5):  # the bug hit 9 of 10 tries with warm pooled connections
        seen_before = len(be.seen)
        client = RawClient(gw.port)
        try:
            after = b"POST /after HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nhi"
            client.send(bad + after + b"GET /after2 HTTP/1.1\r\n" + H + b"\r\n")
            resp = client.read_response()
            assert resp.status == 400 and resp.header("connection") == "close"
            assert client.closed_by_peer()
            assert client.buf == b""  # one answer only
        finally:
            client.close()
        # A later request reaches the backend, and nothing of the pipelined ones came before it.
        assert request(gw.port, "GET", "/probe").status == 200
        assert [s.target for s in be.seen[seen_before:]] == ["/probe"]


def test_a_404_keeps_the_connection_and_the_next_pipelined_request(warm) -> None:
    """Not every gateway answer ends the connection: after a 404 (no route) pipelining goes on."""
    gw, be = warm
    gw.write_config(gateway_config(be.url, routes=[{"name": "only", "service": "backend", "paths": ["/ok"]}]))
    gw.signal(__import__("signal").SIGHUP)
    gw.wait_for_output(r"config v2 applied", stream="output")
    client = RawClient(gw.port)
    try:
        client.send(b"GET /nowhere HTTP/1.1\r\n" + H + b"\r\nGET /ok HTTP/1.1\r\n" + H + b"\r\n")
        assert client.read_response().status == 404
        assert client.read_response().status == 200
    finally:
        client.close()
    assert be.seen[-1].target == "/ok"


# -- item 3: bytes after the last request -----------------------------------------------------------------
def slow_echo(delay: float):
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(delay)
        writer.write(response(200, b"ran " + seen.target.encode()))
        return True

    return respond


LAST = [
    ("connection-close", b"POST /run HTTP/1.1\r\n" + H + b"Connection: close\r\nContent-Length: 2\r\n\r\nhi"),
    ("http-1.0", b"GET /run HTTP/1.0\r\n" + H + b"\r\n"),
]


@pytest.mark.parametrize(("case", "last"), LAST, ids=[c[0] for c in LAST])
@pytest.mark.parametrize("when", ["same-packet", "later"])
def test_bytes_after_the_last_request_are_discarded(
    gateway, backend, case: str, last: bytes, when: str
) -> None:
    be = backend(slow_echo(0.3))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    try:
        if when == "same-packet":
            client.send(last + b"X")
        else:
            client.send(last)
            assert wait_until(lambda: len(be.seen) == 1)
            client.send(b"GET /more HTTP/1.1\r\n" + H + b"\r\n")  # a whole request: not served either
        resp = client.read_response()
        assert resp.status == 200 and resp.body == b"ran /run"  # the backend's answer, not a 400
        assert client.closed_by_peer()
        assert client.buf == b""
    finally:
        client.close()
    time.sleep(0.2)
    assert [s.target for s in be.seen] == ["/run"]


# -- item 4: replay after a reused connection is reset ----------------------------------------------------
def drops_second_request_per_connection(counts: dict[int, int]):
    """Answers the first request of each connection; drops the connection on the second one, as a
    backend closing an idle keep-alive connection just as the gateway reuses it (after it has read the
    request, so it may have run it)."""

    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        counts[seen.connection] = counts.get(seen.connection, 0) + 1
        if counts[seen.connection] >= 2:
            writer.transport.abort()
            return False
        writer.write(response(200, b"ok " + seen.method.encode()))
        return True

    return respond


def replay_setup(gateway, backend, **service: Any):
    counts: dict[int, int] = {}
    be = backend(drops_second_request_per_connection(counts))
    config = gateway_config(be.url)
    config["services"][0].update(service)
    gw = gateway(config)
    assert request(gw.port, "GET", "/warm").status == 200  # one pooled connection, one request on it
    assert wait_until(lambda: be.connections == 1)
    return gw, be


def test_a_post_is_not_replayed_after_a_reset_by_default(gateway, backend) -> None:
    gw, be = replay_setup(gateway, backend)
    resp = request(gw.port, "POST", "/pay", body=b"once")
    assert resp.status == 502
    time.sleep(0.2)
    assert [s.method for s in be.seen if s.target == "/pay"] == ["POST"]  # never twice


def test_a_get_is_replayed_once_after_a_reset(gateway, backend) -> None:
    gw, be = replay_setup(gateway, backend)
    resp = request(gw.port, "GET", "/read")
    assert resp.status == 200 and resp.body == b"ok GET"
    assert [s.connection for s in be.seen if s.target == "/read"] == [1, 2]  # the second on a fresh one


def test_a_service_can_allow_replaying_non_idempotent_requests(gateway, backend) -> None:
    gw, be = replay_setup(gateway, backend, replay_non_idempotent=True)
    resp = request(gw.port, "POST", "/pay", body=b"twice")
    assert resp.status == 200 and resp.body == b"ok POST"
    assert [s.body for s in be.seen if s.target == "/pay"] == [b"twice", b"twice"]


# -- item 6: a bad first chunk reaches no backend ---------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "body"),
    [("size-0x5", b"0x5\r\nhello\r\n0\r\n\r\n"), ("data-longer-than-size", b"5\r\nhelloXX\r\n0\r\n\r\n")],
)
def test_a_bad_first_chunk_sends_nothing_to_the_backend(warm, case: str, body: bytes) -> None:
    gw, be = warm
    raw_before, closed_before = len(be.raw), be.closed
    client = RawClient(gw.port)
    try:
        client.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)  # the head alone: it is held, not forwarded
        assert len(be.raw) == raw_before
        client.send(body)
        assert client.read_response().status == 400
    finally:
        client.close()
    time.sleep(0.2)
    assert len(be.raw) == raw_before and be.closed == closed_before  # the pooled connection is untouched


def test_a_later_chunk_error_cuts_the_forwarded_request(warm) -> None:
    """Documented (docs/operations.md): once the first chunk has parsed, head and chunks stream on; an
    error in a later chunk closes that backend connection, so the backend sees an unfinished body."""
    gw, be = warm
    raw_before, seen_before, closed_before = len(be.raw), len(be.seen), be.closed
    client = RawClient(gw.port)
    try:
        client.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert wait_until(lambda: b"5\r\nhello\r\n" in be.raw[raw_before:])
        client.send(b"zz\r\n")
        assert client.read_response().status == 400
    finally:
        client.close()
    assert wait_until(lambda: be.closed > closed_before)
    assert len(be.seen) == seen_before  # the backend never had a complete request


def test_chunked_request_with_expect_continue_and_a_large_first_chunk(gateway, backend) -> None:
    """The held head does not stall: 100 Continue still goes out, and a first chunk larger than the
    hold buffer streams on."""
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    try:
        client.send(
            b"POST /big HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        interim = client.read_response()
        assert interim.status == 100
        data = b"x" * 300_000
        client.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        resp = client.read_response()
        assert resp.status == 200 and resp.json()["body_length"] == len(data)
    finally:
        client.close()
