"""The upstream pool and connection, without sockets: pool bookkeeping (acquire/release/discard/forget,
retirement, idle sweep, open), and whole exchanges driven through in-memory transports the way the event
loop would drive them (as bench/hotpath.py does): reuse, response framing, flow control between the two
sides, a client leaving while its backend connection is opened, stale pooled connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.memory_transport import MemoryTransport
from tollway.config.loader import load_text
from tollway.errors import UpstreamConnectError, UpstreamTimeout
from tollway.proxy.server import ClientConnection
from tollway.runtime.worker import Worker
from tollway.upstream.connection import UpstreamConnection
from tollway.upstream.pool import Pool, PoolSettings

CONFIG = """
gateway: {access_log: {enabled: false}}
services: [{name: backend, url: "http://127.0.0.1:9001", read_timeout: 5s}]
routes: [{name: all, service: backend, paths: ["/"]}]
"""
GET = b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeLoop:
    """time/call_later/call_at with a manual clock, for pool bookkeeping."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        return self.call_at(self.now + delay, callback)

    def call_at(self, when: float, callback: Callable[[], None]) -> Any:
        handle = asyncio.TimerHandle(when, callback, (), self)  # type: ignore[arg-type]
        self.timers.append(handle)
        return handle

    def _timer_handle_cancelled(self, handle: Any) -> None:
        pass

    def get_debug(self) -> bool:
        return False

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := [t for t in self.timers if not t.cancelled() and t.when() <= self.now]:
            timer = min(due, key=lambda t: t.when())
            self.timers.remove(timer)
            timer._run()


def pool_with(settings: PoolSettings | None = None, loop: Any = None) -> Pool:
    return Pool(loop or FakeLoop(), "127.0.0.1", 9001, settings or PoolSettings())


def connected(pool: Pool) -> tuple[UpstreamConnection, MemoryTransport]:
    conn = UpstreamConnection(pool)
    transport = MemoryTransport(("127.0.0.1", 9001))
    conn.connection_made(transport)  # type: ignore[arg-type]
    pool.active += 1  # as `open` counts it
    return conn, transport


# -- pool bookkeeping -------------------------------------------------------------------------------
def test_release_keeps_and_acquire_returns_the_warmest_first() -> None:
    pool = pool_with()
    assert pool.acquire() is None
    a, _ = connected(pool)
    b, _ = connected(pool)
    pool.release(a)
    pool.release(b)
    assert repr(pool) == "<Pool 127.0.0.1:9001 [active=0 idle=2 opened=0]>"
    assert pool.acquire() is b
    assert pool.acquire() is a
    assert repr(pool) == "<Pool 127.0.0.1:9001 [active=2 idle=0 opened=0]>"


def test_connections_that_cannot_carry_another_request_are_closed() -> None:
    pool = pool_with(PoolSettings(max_idle=1, max_requests=3))
    no_keep, t1 = connected(pool)
    no_keep.keep_alive = False
    pool.release(no_keep)
    closing, t2 = connected(pool)
    t2.closing = True
    pool.release(closing)
    retired, t3 = connected(pool)
    retired.requests = 3
    pool.release(retired)
    kept, t4 = connected(pool)
    pool.release(kept)
    over, t5 = connected(pool)
    pool.release(over)  # max_idle reached
    assert [t.closing for t in (t1, t2, t3, t4, t5)] == [True, True, True, False, True]
    assert pool.idle == [kept] and kept.idle_since == pool.loop.time()
    assert pool.active == 0


def test_acquire_skips_connections_closed_while_idle() -> None:
    pool = pool_with()
    a, _ta = connected(pool)
    b, tb = connected(pool)
    pool.release(a)
    pool.release(b)
    tb.closing = True
    assert pool.acquire() is a
    assert pool.idle == []


def test_forget_and_discard() -> None:
    pool = pool_with()
    a, _ = connected(pool)
    pool.release(a)
    a.connection_lost(None)  # the backend closed it while idle
    assert pool.idle == []
    b, tb = connected(pool)
    pool.discard(b)
    assert tb.aborted and pool.active == 0


def test_idle_connections_are_swept_after_the_idle_timeout() -> None:
    loop = FakeLoop()
    pool = pool_with(PoolSettings(idle_timeout=10), loop)
    old, t_old = connected(pool)
    pool.release(old)
    loop.advance(6)
    new, t_new = connected(pool)
    pool.release(new)
    loop.advance(4.5)
    assert t_old.closing and not t_new.closing
    assert pool.idle == [new]
    loop.advance(6)
    assert t_new.closing and pool.idle == []


def test_close_closes_every_idle_connection() -> None:
    pool = pool_with()
    conns = [connected(pool) for _ in range(3)]
    for conn, _ in conns:
        pool.release(conn)
    pool.close()
    assert all(t.closing for _, t in conns) and pool.idle == []


class LoopProxy:
    """The running loop, with `create_connection` under the test's control."""

    def __init__(self, real: asyncio.AbstractEventLoop) -> None:
        self._real = real
        self.connect: Callable[..., Any] | None = None
        self.gate: asyncio.Future[None] | None = None
        self.opened: list[tuple[UpstreamConnection, MemoryTransport]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def create_connection(self, factory: Callable[[], Any], host: str, port: int, **kw: Any) -> Any:
        if self.connect is not None:
            self.connect()
        if self.gate is not None:
            await self.gate
        protocol = factory()
        transport = MemoryTransport((host, port))
        protocol.connection_made(transport)
        self.opened.append((protocol, transport))
        return transport, protocol


async def test_open_counts_the_connection() -> None:
    loop = LoopProxy(asyncio.get_running_loop())
    pool = pool_with(loop=loop)
    conn = await pool.open(1)
    assert isinstance(conn, UpstreamConnection)
    assert (pool.active, pool.opened) == (1, 1)
    assert repr(conn) == "<UpstreamConnection 127.0.0.1:9001 idle requests=0>"


async def test_open_failures_are_translated() -> None:
    loop = LoopProxy(asyncio.get_running_loop())
    pool = pool_with(loop=loop)

    def refuse() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    loop.connect = refuse
    refused = r"connecting to 127\.0\.0\.1:9001 failed: Connection refused"
    with pytest.raises(UpstreamConnectError, match=refused):
        await pool.open(1)
    loop.connect = None
    loop.gate = asyncio.get_running_loop().create_future()  # never completes
    with pytest.raises(UpstreamTimeout, match="timed out"):
        await pool.open(0.05)
    assert (pool.active, pool.opened) == (0, 0)


# -- whole exchanges ---------------------------------------------------------------------------------
class Harness:
    def __init__(self, loop: Any, config: str = CONFIG, settings: PoolSettings | None = None) -> None:
        self.worker = Worker(loop, 0, None, [])  # type: ignore[arg-type]
        self.worker.pool_settings = settings or PoolSettings()
        self.worker.apply_config(1, load_text(config))
        self.pool = next(iter(self.worker.snapshot.services.values())).cluster.targets[0].pool

    def client(self) -> tuple[ClientConnection, MemoryTransport]:
        client = ClientConnection(self.worker)
        transport = MemoryTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        return client, transport

    def pooled(self) -> tuple[UpstreamConnection, MemoryTransport]:
        conn, transport = connected(self.pool)
        self.pool.release(conn)
        return conn, transport


@pytest.fixture
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_pooled_connection_carries_requests_of_several_clients(loop: Any) -> None:
    h = Harness(loop)
    conn, upstream = h.pooled()
    for i in range(3):
        client, downstream = h.client()
        client.data_received(GET)
        assert upstream.take().startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n")
        assert repr(conn) == f"<UpstreamConnection 127.0.0.1:9001 active requests={i + 1}>"
        conn.data_received(OK)
        assert downstream.take() == OK
        assert h.pool.idle[-1] is conn
    assert h.pool.active == 0


@pytest.mark.parametrize(
    "response",
    [
        OK,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
)
def test_response_split_at_every_byte(loop: Any, response: bytes) -> None:
    for cut in range(1, len(response)):
        h = Harness(loop)
        conn, _upstream = h.pooled()
        client, downstream = h.client()
        client.data_received(GET)
        conn.data_received(response[:cut])
        assert h.pool.idle == []  # not complete yet
        conn.data_received(response[cut:])
        assert h.pool.idle and h.pool.idle[-1] is conn, cut
        assert client.active is None
        out = downstream.take()
        assert out.startswith(b"HTTP/1.1 ")
        assert b"100 Continue" not in out


def test_extra_bytes_after_a_response_make_the_connection_unusable(loop: Any) -> None:
    h = Harness(loop)
    conn, upstream = h.pooled()
    client, downstream = h.client()
    client.data_received(GET)
    conn.data_received(OK + b"HTTP/1.1 200 OK\r\n")
    assert downstream.take() == OK
    assert upstream.closing and h.pool.idle == []


def test_data_on_an_idle_connection_closes_it(loop: Any) -> None:
    h = Harness(loop)
    conn, upstream = h.pooled()
    conn.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert upstream.closing
    conn.connection_lost(None)
    assert h.pool.idle == []


def test_response_ending_while_the_client_is_paused_leaves_the_connection_reading(loop: Any) -> None:
    """The slow-client race: the last body bytes fill the client's buffer (pause_writing pauses the
    backend connection) and complete the response in the same read. The connection goes back to the pool
    reading again, and the client's connection keeps its send timeout."""
    h = Harness(loop)
    conn, upstream = h.pooled()
    client, downstream = h.client()
    downstream.on_write = lambda data: client.pause_writing() if len(downstream.data) > 10 else None
    client.data_received(GET)
    body = b"x" * 100
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body)
    assert downstream.data.endswith(body)
    assert h.pool.idle[-1] is conn
    assert not conn.reading_paused and upstream.reading
    assert client.deadline.reason == "send"  # not "keepalive": the client has not read the response
    downstream.on_write = None
    client.resume_writing()
    assert client.deadline.reason == "keepalive"
    # The next request on that connection is answered.
    other, out = h.client()
    other.data_received(GET)
    conn.data_received(OK)
    assert out.take() == OK


def test_slow_client_pauses_the_backend_and_its_read_timeout(loop: Any) -> None:
    h = Harness(loop)
    conn, upstream = h.pooled()
    client, _downstream = h.client()
    client.data_received(GET)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    client.pause_writing()
    assert not upstream.reading and conn.reading_paused
    assert conn.deadline.at == 0.0  # a slow client is not a slow backend
    assert client.deadline.reason == "send"
    client.resume_writing()
    assert upstream.reading and conn.deadline.reason == "read" and conn.deadline.at > 0
    assert client.deadline.at == 0.0  # waiting for the backend: its timeouts apply


def test_backend_that_stops_reading_the_body_arms_the_write_timeout(loop: Any) -> None:
    h = Harness(loop)
    conn, upstream = h.pooled()
    client, downstream = h.client()
    client.data_received(b"POST /x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10\r\n\r\nabc")
    assert conn.deadline.at == 0.0  # the body comes at the client's pace
    assert client.deadline.reason == "body"
    conn.pause_writing()
    assert conn.deadline.reason == "write" and conn.deadline.at > 0
    assert not downstream.reading  # the client is not read while the backend takes nothing
    conn.resume_writing()
    assert conn.deadline.at == 0.0 and downstream.reading
    client.data_received(b"defghij")
    assert conn.deadline.reason == "read"
    assert upstream.take().endswith(b"\r\n\r\nabcdefghij")


async def test_client_gone_while_connecting_keeps_the_fresh_connection(monkeypatch: Any) -> None:
    proxy = LoopProxy(asyncio.get_running_loop())
    proxy.gate = asyncio.get_running_loop().create_future()
    h = Harness(proxy)
    client, _ = h.client()
    client.data_received(GET)
    await asyncio.sleep(0)
    assert h.pool.idle == [] and proxy.opened == []
    client.connection_lost(None)  # the client leaves while the connection is being opened
    proxy.gate.set_result(None)
    for _ in range(5):
        await asyncio.sleep(0)
    ((conn, upstream),) = proxy.opened
    assert upstream.data == b"" and not upstream.closing  # nothing sent, and not thrown away
    assert h.pool.idle == [conn]
    assert h.pool.active == 0
    # The next request uses it.
    other, out = h.client()
    other.data_received(GET)
    assert upstream.take().startswith(b"GET /x ")
    conn.data_received(OK)
    assert out.take() == OK
    assert len(proxy.opened) == 1


async def test_pooled_connection_closed_by_the_backend_is_replayed_on_a_new_one() -> None:
    """An idempotent request (PUT, with its body) is sent again on a fresh connection."""
    proxy = LoopProxy(asyncio.get_running_loop())
    h = Harness(proxy)
    stale, stale_t = connected(h.pool)
    stale.requests = 5  # it has served before: the backend may have closed it as we wrote
    h.pool.release(stale)
    client, out = h.client()
    client.data_received(b"PUT /x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 3\r\n\r\nabc")
    first = stale_t.take()
    stale.connection_lost(ConnectionResetError())
    for _ in range(5):
        await asyncio.sleep(0)
    ((fresh, fresh_t),) = proxy.opened
    assert fresh_t.take() == first  # the same request, body included
    fresh.data_received(OK)
    assert out.take() == OK
    assert (
        h.pool.active == 0
    )  # the stale connection left the pool's count (Pool.detach), the fresh one came back


async def test_a_post_on_a_pooled_connection_closed_by_the_backend_is_not_replayed() -> None:
    """The backend may have run it before closing: a POST is not sent twice (502 instead)."""
    proxy = LoopProxy(asyncio.get_running_loop())
    h = Harness(proxy)
    stale, stale_t = connected(h.pool)
    stale.requests = 5
    h.pool.release(stale)
    client, out = h.client()
    client.data_received(b"POST /x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 3\r\n\r\nabc")
    assert stale_t.take().startswith(b"POST /x ")
    stale.connection_lost(ConnectionResetError())
    for _ in range(5):
        await asyncio.sleep(0)
    assert proxy.opened == []
    assert out.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


async def test_a_fresh_connection_failing_before_responding_is_not_replayed() -> None:
    proxy = LoopProxy(asyncio.get_running_loop())
    h = Harness(proxy)
    client, out = h.client()
    client.data_received(GET)
    for _ in range(5):
        await asyncio.sleep(0)
    ((conn, _),) = proxy.opened
    conn.connection_lost(ConnectionResetError())
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(proxy.opened) == 1
    assert out.take().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert h.pool.active == 0 and h.pool.idle == []


async def test_client_gone_with_pipelined_requests_forwards_none_of_the_queued_ones() -> None:
    proxy = LoopProxy(asyncio.get_running_loop())
    h = Harness(proxy)
    _, upstream = h.pooled()
    client, _ = h.client()
    client.data_received(GET + b"POST /second HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1\r\n\r\nx")
    assert upstream.take().startswith(b"GET /x ")
    client.connection_lost(None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert upstream.aborted  # the request in flight is abandoned
    assert proxy.opened == []  # and the queued one never reaches a backend
    assert h.pool.active == 0
