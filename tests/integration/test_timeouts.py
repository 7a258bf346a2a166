"""Timeouts, client side (head, body, keep-alive, send) and upstream side (connect, read, write), and
upstream failures (refused, reset). Short timeouts are configured so the tests finish quickly; every
wait is bounded, and nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import RawClient, Seen, gateway_config, request, wait_until

pytestmark = pytest.mark.integration

H = b"Host: gw.test\r\n"


def assert_gateway_error(resp, status: int, words: str) -> None:
    assert resp.status == status, resp
    body = resp.json()
    assert words in body["message"], body
    assert body["request_id"] == resp.header("x-request-id")


# -- client side -----------------------------------------------------------------------------------
def test_incomplete_head_times_out_with_408(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, timeouts={"client_header": "500ms"}))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H)
    assert_gateway_error(client.read_response(), 408, "request head")
    assert client.closed_by_peer()
    client.close()
    assert be.raw == b""


def test_slowloris_drip_does_not_extend_the_head_timeout(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, timeouts={"client_header": "1s"}))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n")
    closed = False
    deadline = time.monotonic() + 15
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:  # one header byte every 100 ms, forever
            client.send(b"X")
            time.sleep(0.1)
            client.sock.settimeout(0)
            try:
                data = client.sock.recv(65536)
            except BlockingIOError:
                continue
            finally:
                client.sock.settimeout(10)
            client.buf += data
            if not data or b"\r\n\r\n" in client.buf:
                closed = True
                break
    assert closed or b"408" in client.buf, "the gateway kept reading a head that never ends"
    client.close()


def test_silent_connection_is_closed_without_a_response(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, timeouts={"client_header": "500ms"}))
    client = RawClient(gw.port)
    assert client.closed_by_peer(10)
    assert client.buf == b""
    client.close()


def test_idle_keep_alive_connection_is_closed(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, timeouts={"keepalive": "500ms"}))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    resp = client.read_response()
    assert resp.status == 200 and resp.header("connection") is None
    assert client.closed_by_peer(10)
    assert client.buf == b""
    client.close()


def test_keepalive_zero_disables_keep_alive(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, timeouts={"keepalive": 0}))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert client.read_response().header("connection") == "close"
    assert client.closed_by_peer()
    client.close()


def test_stalled_request_body_times_out_with_408(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, timeouts={"client_body": "500ms"}))
    assert request(gw.port).status == 200  # a pooled connection: the head goes out at once
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc")
    assert_gateway_error(client.read_response(), 408, "request body")
    assert client.closed_by_peer()
    client.close()
    assert wait_until(lambda: be.closed == 1)  # the half-sent request's connection was dropped
    assert len(be.seen) == 1


def test_client_that_never_reads_is_cut_off_after_the_send_timeout(gateway, loop_thread) -> None:
    written = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            size = 1024**3
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            piece = b"x" * 65536
            while written[0] < size:
                writer.write(piece)
                await writer.drain()
                written[0] += len(piece)
        writer.close()

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    gw = gateway(gateway_config(f"http://127.0.0.1:{port}", timeouts={"client_send": "1s"}))
    client = RawClient(gw.port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    time.sleep(3)  # read nothing, well past the send timeout
    received = 0
    with contextlib.suppress(OSError):
        while chunk := client.sock.recv(1 << 20):
            received += len(chunk)
    client.close()
    assert received < 256 * 1024 * 1024, "the gateway kept the stalled response going"
    assert written[0] < 1024**3
    loop_thread.run(_close(server))


async def _close(server: asyncio.AbstractServer) -> None:
    server.close()


# -- upstream side ---------------------------------------------------------------------------------
def test_refused_upstream_is_502(gateway) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    gw = gateway(gateway_config(f"http://127.0.0.1:{port}"))
    assert_gateway_error(request(gw.port), 502, "connecting to")


def test_reset_upstream_is_502(gateway, loop_thread) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    gw = gateway(gateway_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"))
    assert_gateway_error(request(gw.port), 502, "upstream closed")
    loop_thread.run(_close(server))


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: connecting to it hangs (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


def test_upstream_connect_timeout_is_504(gateway, blackhole: int) -> None:
    config = gateway_config(f"http://127.0.0.1:{blackhole}")
    config["services"][0]["connect_timeout"] = "500ms"
    gw = gateway(config)
    assert_gateway_error(request(gw.port), 504, "timed out")


def test_upstream_read_timeout_is_504(gateway, backend) -> None:
    async def silent(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    be = backend(silent)
    config = gateway_config(be.url)
    config["services"][0]["read_timeout"] = "500ms"
    gw = gateway(config)
    assert_gateway_error(request(gw.port), 504, "read timed out")


def test_upstream_read_timeout_mid_body_cuts_the_response(gateway, backend) -> None:
    async def stall(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(30)
        return False

    be = backend(stall)
    config = gateway_config(be.url)
    config["services"][0]["read_timeout"] = "500ms"
    gw = gateway(config)
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    with pytest.raises(ConnectionError):
        client.read_response()
    client.close()
    assert wait_until(lambda: any(e["status"] == 200 and e["bytes_sent"] > 0 for e in gw.access_log()))


def test_upstream_write_timeout_while_sending_the_body(gateway, loop_thread) -> None:
    """The backend reads the head, then nothing: the body cannot be sent, and the client gets a 504."""
    stop = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 30)
        writer.close()

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    config = gateway_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    config["services"][0]["write_timeout"] = "1s"
    config["gateway"]["limits"] = {"max_body_size": 0}
    gw = gateway(config)
    client = RawClient(gw.port, timeout=20)
    size = 1024**3

    def upload() -> None:
        with contextlib.suppress(OSError):
            client.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % size)
            piece = b"x" * (1 << 20)
            for _ in range(size // len(piece)):
                client.sock.sendall(piece)

    sender = threading.Thread(target=upload, daemon=True)
    sender.start()
    assert_gateway_error(client.read_response(), 504, "write timed out")
    assert client.closed_by_peer()
    client.close()
    sender.join(10)
    loop_thread.run(_stop(stop, server))


async def _stop(event: asyncio.Event, server: asyncio.AbstractServer) -> None:
    event.set()
    server.close()


def test_slow_steady_upload_is_not_a_write_timeout(gateway, backend) -> None:
    """The write timeout is about the backend not taking bytes, not about the client's pace."""
    be = backend()
    config = gateway_config(be.url, timeouts={"client_body": "5s"})
    config["services"][0]["write_timeout"] = "1s"
    config["services"][0]["read_timeout"] = "1s"
    gw = gateway(config)
    assert request(gw.port).status == 200
    client = RawClient(gw.port)
    client.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(12):  # 12 x 250 ms: longer than both upstream timeouts
        client.send(b"5\r\nhello\r\n")
        time.sleep(0.25)
    client.send(b"0\r\n\r\n")
    resp = client.read_response()
    client.close()
    assert resp.status == 200, resp
    assert be.seen[-1].body == b"hello" * 12


def test_slow_reading_client_is_not_an_upstream_read_timeout(gateway, loop_thread) -> None:
    """While the client does not read, the backend is paused by us: its read timeout must not run."""
    size = 16 * 1024 * 1024  # more than the socket buffers between the client and the backend

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            piece = b"y" * 65536
            for _ in range(size // len(piece)):
                writer.write(piece)
                await writer.drain()
        writer.close()

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    config = gateway_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    config["services"][0]["read_timeout"] = "1s"
    gw = gateway(config)
    client = RawClient(gw.port, timeout=20)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert client._fill()
    time.sleep(2.5)  # not reading: the gateway pauses the backend for longer than its read timeout
    while b"\r\n\r\n" not in client.buf:
        assert client._fill()
    head, _, body = client.buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    received = len(body)
    while received < size:
        chunk = client.sock.recv(1 << 20)
        assert chunk, f"cut after {received} bytes"
        received += len(chunk)
    client.close()
    assert received == size
    loop_thread.run(_close(server))
