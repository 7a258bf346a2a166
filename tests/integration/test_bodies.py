"""Bodies streamed both ways with backpressure: 1 GB each way with flat gateway memory, chunked both
ways, a client that stops reading (the gateway stops reading from the backend), a backend that stops
reading (the gateway stops reading from the client), and backends that die mid-response.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tests.support import Gateway, LoopThread, RawClient, gateway_config, request, rss_mb, wait_until

pytestmark = pytest.mark.integration

GB = 1024**3
BIG = int(os.environ.get("TOLLWAY_TEST_BIG_BODY", GB))  # 1 GB each way unless overridden
PIECE = 1024 * 1024
PATTERN = bytes(range(256)) * (PIECE // 256)
RSS_BOUND_MB = 64.0  # growth allowed for the worker while a body streams through it
H = b"Host: gw.test\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamBackend:
    """A backend whose connection handler is a coroutine (for bodies too big to hold in memory)."""

    def __init__(self, runner: LoopThread, handler: Handler) -> None:
        self.runner = runner
        self.handler = handler
        self.server = runner.run(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()

        self.runner.run(stop())


@pytest.fixture
def stream_backend(loop_thread: LoopThread) -> Iterator[Callable[[Handler], StreamBackend]]:
    started: list[StreamBackend] = []

    def start(handler: Handler) -> StreamBackend:
        started.append(StreamBackend(loop_thread, handler))
        return started[-1]

    yield start
    for b in started:
        b.close()


class RssSampler:
    """Samples a worker's RSS in a thread while a transfer runs; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_mb(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


def worker_pid(gw: Gateway) -> int:
    pids = gw.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]


async def read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


async def drain_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[int, int]:
    """Read a request body without keeping it: (length, crc32)."""
    crc, total = 0, 0
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return total, crc
            left = size
            while left:
                data = await reader.read(min(left, 262144))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                crc = zlib.crc32(data, crc)
                left -= len(data)
            total += size
            await reader.readexactly(2)
    left = int(headers.get("content-length", "0"))
    while left:
        data = await reader.read(min(left, 262144))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        crc = zlib.crc32(data, crc)
        total += len(data)
        left -= len(data)
    return total, crc


def sink_handler(results: list[tuple[int, int]]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                headers = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            results.append(await drain_body(reader, headers))
            body = b"%d %d" % results[-1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    return handle


def source_handler(size: int, chunked: bool = False, progress: list[int] | None = None) -> Handler:
    """Answers every request with `size` bytes of PATTERN; counts what it managed to write."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            if chunked:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            left = size
            while left:
                piece = PATTERN[: min(left, PIECE)]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                await writer.drain()
                left -= len(piece)
                if progress is not None:
                    progress[0] += len(piece)
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()

    return handle


def pattern_crc(size: int) -> int:
    crc, left = 0, size
    while left:
        piece = PATTERN[: min(left, PIECE)]
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    return crc


def send_body(sock: socket.socket, size: int, chunked: bool) -> None:
    left = size
    while left:
        piece = PATTERN[: min(left, PIECE)]
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        left -= len(piece)
    if chunked:
        sock.sendall(b"0\r\n\r\n")


def read_body(client: RawClient, chunked: bool) -> tuple[int, int]:
    """Read a response body from `client` without keeping it: (length, crc32)."""
    head_end = b"\r\n\r\n"
    while head_end not in client.buf:
        assert client._fill(), "closed before the head"
    head, _, client.buf = client.buf.partition(head_end)
    assert head.startswith(b"HTTP/1.1 200"), head
    crc, total = 0, 0
    if not chunked:
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        data, client.buf = client.buf[:length], client.buf[length:]
        crc, total = zlib.crc32(data, crc), len(data)
        buf = bytearray(262144)
        view = memoryview(buf)
        while total < length:
            n = client.sock.recv_into(view, min(len(buf), length - total))
            assert n, "closed mid-body"
            crc = zlib.crc32(view[:n], crc)
            total += n
        return total, crc
    while True:
        size = int(client._read_line().split(b";")[0], 16)
        if size == 0:
            client._read_line()
            return total, crc
        while len(client.buf) < size + 2:
            assert client._fill(), "closed mid-chunk"
        crc = zlib.crc32(client.buf[:size], crc)
        total += size
        client.buf = client.buf[size + 2 :]


# -- large bodies, flat memory ---------------------------------------------------------------------------
def test_1gb_upload_with_flat_memory(gateway, stream_backend) -> None:
    results: list[tuple[int, int]] = []
    be = stream_backend(sink_handler(results))
    gw = gateway(gateway_config(be.url, limits={"max_body_size": 0}))
    assert request(gw.port, "POST", body=b"warm").status == 200
    client = RawClient(gw.port, timeout=60)
    with RssSampler(worker_pid(gw)) as rss:
        client.send(b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % BIG)
        send_body(client.sock, BIG, chunked=False)
        resp = client.read_response()
    client.close()
    assert resp.status == 200
    assert results[-1] == (BIG, pattern_crc(BIG))
    assert rss.growth < RSS_BOUND_MB, f"worker RSS grew {rss.growth:.1f} MB"


def test_1gb_download_with_flat_memory(gateway, stream_backend) -> None:
    be = stream_backend(source_handler(BIG))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port, timeout=60)
    with RssSampler(worker_pid(gw)) as rss:
        client.send(b"GET /download HTTP/1.1\r\n" + H + b"\r\n")
        assert read_body(client, chunked=False) == (BIG, pattern_crc(BIG))
    client.close()
    assert rss.growth < RSS_BOUND_MB, f"worker RSS grew {rss.growth:.1f} MB"


@pytest.mark.parametrize("size", [1, 65535, 65537, 64 * PIECE + 17])
def test_chunked_both_ways(gateway, stream_backend, size: int) -> None:
    results: list[tuple[int, int]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                headers = await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            assert headers.get("transfer-encoding") == "chunked"
            results.append(await drain_body(reader, headers))
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            left = size
            while left:
                piece = PATTERN[: min(left, PIECE)]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                left -= len(piece)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    be = stream_backend(handle)
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port, timeout=30)
    with RssSampler(worker_pid(gw)) as rss:
        for _ in range(2):  # twice on one connection: both ends of both messages were found
            client.send(b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
            send_body(client.sock, size, chunked=True)
            assert read_body(client, chunked=True) == (size, pattern_crc(size))
    client.close()
    assert results == [(size, pattern_crc(size))] * 2
    assert rss.growth < RSS_BOUND_MB


# -- backpressure -------------------------------------------------------------------------------------
def stalled(progress: list[int], quiet: float = 1.0, timeout: float = 20.0) -> bool:
    """True once progress[0] stops moving for `quiet` seconds (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    last, since = progress[0], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if progress[0] != last:
            last, since = progress[0], time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


def test_client_that_stops_reading_stalls_the_backend(gateway, stream_backend) -> None:
    progress = [0]
    size = 2 * GB  # far more than every buffer on the way
    be = stream_backend(source_handler(size, progress=progress))
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port, timeout=30)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    with RssSampler(worker_pid(gw)) as rss:
        client.send(b"GET /big HTTP/1.1\r\n" + H + b"\r\n")
        assert client._fill()  # the response has started
        assert stalled(progress), "the backend kept writing while the client read nothing"
        # What is in flight is bounded by socket buffers, not by the body size.
        assert progress[0] < 64 * PIECE, progress[0]
    assert rss.growth < RSS_BOUND_MB
    # Reading again resumes the stream.
    before = progress[0]
    deadline = time.monotonic() + 20
    while progress[0] < before + 32 * PIECE and time.monotonic() < deadline:
        client.buf = b""
        client._fill()
    assert progress[0] >= before + 32 * PIECE
    client.close()


def test_slow_client_then_the_pooled_connection_serves_others(gateway, stream_backend) -> None:
    """Responses that end while a slow client holds the backend connection paused: the connection
    goes back to the pool reading again, so the next request on it is answered (not a 504). Whether a
    response ends while paused depends on socket buffers; tests/unit/test_pool.py forces that case."""
    size = 8 * PIECE
    be = stream_backend(source_handler(size))
    config = gateway_config(be.url)
    config["services"][0]["read_timeout"] = "5s"
    gw = gateway(config)
    for _ in range(3):
        client = RawClient(gw.port, timeout=30)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.send(b"GET /slow HTTP/1.1\r\n" + H + b"\r\n")
        received = 0
        while received < size:  # slowly: the gateway pauses and resumes the backend many times
            time.sleep(0.002)
            chunk = client.sock.recv(16384)
            assert chunk
            received += len(chunk)
        client.close()
        for _ in range(3):
            resp = request(gw.port, "GET", "/fast")
            assert resp.status == 200, resp
            assert len(resp.body) == size


def test_backend_that_stops_reading_stalls_the_client(gateway, stream_backend) -> None:
    release = threading.Event()
    results: list[tuple[int, int]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await read_head(reader)
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        results.append(await drain_body(reader, headers))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    be = stream_backend(handle)
    gw = gateway(gateway_config(be.url, limits={"max_body_size": 0}))
    size = 2 * GB
    sent = [0]

    def upload(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % size)
            left = size
            while left:
                piece = PATTERN[: min(left, PIECE)]
                sock.sendall(piece)
                sent[0] += len(piece)
                left -= len(piece)

    client = RawClient(gw.port, timeout=60)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sender = threading.Thread(target=upload, args=(client.sock,), daemon=True)
    with RssSampler(worker_pid(gw)) as rss:
        sender.start()
        assert stalled(sent), "the client could go on sending while the backend read nothing"
        assert sent[0] < 64 * PIECE, sent[0]
    assert rss.growth < RSS_BOUND_MB
    client.close()  # the upload is abandoned; the backend sees the request cut short
    release.set()
    sender.join(10)


# -- a backend dying mid-response ----------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True])
def test_backend_dies_mid_response(gateway, stream_backend, chunked: bool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = await read_head(reader)
        if headers.get("x-die") != "yes":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n" + b"x" * 50)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    be = stream_backend(handle)
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET / HTTP/1.1\r\n" + H + b"X-Die: yes\r\n\r\n")
    with pytest.raises(ConnectionError):
        client.read_response()  # the head came through; the body is cut off, and so is the connection
    client.close()
    assert gw.process is not None and gw.process.poll() is None
    assert request(gw.port).body == b"ok"  # the worker goes on, with a new backend connection


def test_backend_dies_before_responding_is_502(gateway, stream_backend) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.transport.abort()

    be = stream_backend(handle)
    gw = gateway(gateway_config(be.url))
    resp = request(gw.port)
    assert resp.status == 502
    assert resp.json()["request_id"] == resp.header("x-request-id")
    assert wait_until(lambda: bool(gw.errors))
