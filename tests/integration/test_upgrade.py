"""Upgrades: WebSocket (the `websockets` client, an aiohttp backend) and any other Upgrade token become
a byte tunnel after the backend's 101; a refused upgrade is an ordinary response that ends the client
connection.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from aiohttp import WSMsgType, web
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support import LoopThread, RawClient, Seen, gateway_config, request, wait_until

pytestmark = pytest.mark.integration


class AiohttpEcho:
    """An aiohttp WebSocket echo server; records the upgrade request's headers."""

    def __init__(self, runner: LoopThread) -> None:
        self.loop_thread = runner
        self.requests: list[dict[str, str]] = []
        self.closed = 0
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        self.runner = web.AppRunner(app)
        runner.run(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        runner.run(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ws(self, req: web.Request) -> web.WebSocketResponse:
        self.requests.append(dict(req.headers))
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(req)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo: " + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.closed += 1
        return ws

    def stop(self) -> None:
        self.loop_thread.run(self.runner.cleanup())


@pytest.fixture
def ws_backend(loop_thread: LoopThread) -> Iterator[AiohttpEcho]:
    server = AiohttpEcho(loop_thread)
    yield server
    server.stop()


def test_websocket_echo_through_the_gateway(gateway, ws_backend) -> None:
    gw = gateway(gateway_config(ws_backend.url))
    with connect(f"ws://127.0.0.1:{gw.port}/ws", open_timeout=10, close_timeout=5, max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo: hello"
        big = bytes(range(256)) * 8192  # 2 MB: many reads and writes each way
        ws.send(big)
        assert ws.recv(timeout=20) == big
        for i in range(50):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=10) for _ in range(50)] == [f"echo: m{i}" for i in range(50)]
        ws.ping().wait(10)
    assert wait_until(lambda: ws_backend.closed == 1)
    headers = {k.lower(): v for k, v in ws_backend.requests[0].items()}
    assert headers["upgrade"].lower() == "websocket"
    assert headers["connection"].lower() == "upgrade"
    assert "sec-websocket-key" in headers
    assert headers["x-forwarded-for"] == "127.0.0.1"
    # The 101 is logged as the request's outcome.
    assert wait_until(lambda: any(e["status"] == 101 for e in gw.access_log()))


def test_websocket_and_plain_requests_share_a_gateway(gateway, ws_backend, backend) -> None:
    be = backend()
    config = gateway_config(ws_backend.url)
    config["services"].append({"name": "plain", "url": be.url})
    config["routes"].insert(0, {"name": "api", "service": "plain", "paths": ["/api"]})
    gw = gateway(config)
    with connect(f"ws://127.0.0.1:{gw.port}/ws", open_timeout=10) as ws:
        assert request(gw.port, path="/api/x").status == 200
        ws.send("still here")
        assert ws.recv(timeout=10) == "echo: still here"


def test_any_upgrade_becomes_a_byte_tunnel(gateway, loop_thread) -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: shout\r\nConnection: Upgrade\r\n\r\n")
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    gw = gateway(gateway_config(f"http://127.0.0.1:{port}"))
    client = RawClient(gw.port)
    # Bytes right after the head belong to the tunnel: they wait for the 101, then go through.
    client.send(b"GET /t HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\nearly ")
    resp = client.read_response()
    assert resp.status == 101
    assert resp.header("upgrade") == "shout"
    client.send(b"bytes, not HTTP: GET / HTTP/1.1\r\n\r\n")
    expected = b"EARLY BYTES, NOT HTTP: GET / HTTP/1.1\r\n\r\n"
    while len(client.buf) < len(expected):
        assert client._fill()
    assert client.buf == expected
    client.close()
    assert seen[0].startswith(b"GET /t HTTP/1.1\r\n")
    assert b"Upgrade: shout" in seen[0] and b"Connection: upgrade" in seen[0]
    loop_thread.run(_close(server))


async def _close(server: asyncio.AbstractServer) -> None:
    server.close()


def test_refused_upgrade_is_a_normal_response_and_closes(gateway, backend) -> None:
    async def refuse(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope")
        return True

    be = backend(refuse)
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET /t HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: shout\r\n\r\n")
    resp = client.read_response()
    assert resp.status == 426 and resp.body == b"nope"
    assert resp.header("connection") == "close"
    assert client.closed_by_peer()
    client.close()


def test_upgrade_header_without_connection_upgrade_is_a_plain_request(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\nHost: gw.test\r\nUpgrade: h2c\r\n\r\n")
    assert client.read_response().status == 200
    client.send(b"GET /again HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert client.read_response().status == 200
    client.close()
    assert be.seen[0].header("upgrade") is None


def test_tunnel_ends_when_the_backend_closes(gateway, loop_thread) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nbye")
        await writer.drain()
        writer.close()

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    gw = gateway(gateway_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    assert client.read_response().status == 101
    assert client.closed_by_peer()
    assert client.buf == b"bye"
    client.close()
    loop_thread.run(_close(server))


def test_websocket_lives_through_the_drain_grace_period(gateway, ws_backend) -> None:
    gw = gateway(gateway_config(ws_backend.url, drain_timeout="3s"))
    with connect(f"ws://127.0.0.1:{gw.port}/ws", open_timeout=10, close_timeout=5) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "echo: before"
        gw.signal(signal.SIGTERM)
        assert wait_until(lambda: request(gw.status_port, path="/ready").status == 503, 5)
        ws.send("during the drain")
        assert ws.recv(timeout=10) == "echo: during the drain"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=20)  # cut when the grace period ends
    assert gw.process is not None and gw.process.wait(30) == 0


def test_tunnel_has_no_idle_timeout_after_backpressure(gateway, loop_thread) -> None:
    """A slow tunnel client makes the gateway pause and resume; the tunnel must not inherit the
    keep-alive timeout of an idle HTTP connection."""
    size = 16 * 1024 * 1024

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n")
        writer.write(b"z" * size)
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = loop_thread.run(asyncio.start_server(serve, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    gw = gateway(gateway_config(f"http://127.0.0.1:{port}", timeouts={"keepalive": "1s"}))
    client = RawClient(gw.port, timeout=20)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.send(b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    assert client._fill()
    time.sleep(0.5)  # not reading: the gateway's buffer to us fills and it pauses the backend
    while b"\r\n\r\n" not in client.buf:
        assert client._fill()
    received = len(client.buf.partition(b"\r\n\r\n")[2])
    while received < size:
        chunk = client.sock.recv(1 << 20)
        assert chunk
        received += len(chunk)
    time.sleep(2.5)  # quiet for longer than the keep-alive timeout
    client.send(b"still there?")
    client.buf = b""
    while len(client.buf) < 12:
        assert client._fill(), "the tunnel was closed"
    assert client.buf == b"STILL THERE?"
    client.close()
    loop_thread.run(_close(server))
