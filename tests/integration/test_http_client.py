"""tollway.protocol.client against real servers on 127.0.0.1 (plain and TLS), and the two features built
on it: active health-check probes and the JWKS fetch."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.tls_support import self_signed
from tollway.config.schema import ActiveHealthcheck
from tollway.plugins.builtin.jwks import JwksError, fetch
from tollway.protocol.client import HttpClientError, request
from tollway.upstream.supervisor_health import probe

pytestmark = pytest.mark.integration

Reply = Callable[[bytes], Awaitable[bytes | None]]  # request bytes -> what to send (None: say nothing)


class Server:
    """Answers each connection with what `reply` returns for the request head it read; records them."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(data)
            if length:
                data += await reader.readexactly(length)
            self.requests.append(data)
            answer = await self.reply(data)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(reply)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
        servers.append(listener)
        server.port = listener.sockets[0].getsockname()[1]
        return server

    yield start
    for listener in servers:
        listener.close()


def answer(raw: bytes) -> Reply:
    async def reply(_request: bytes) -> bytes:
        return raw

    return reply


async def test_content_length_response_and_the_request_sent(serve) -> None:
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"))
    response = await request(
        f"http://127.0.0.1:{server.port}/p?q=1", method=b"POST", body=b"data", headers=[(b"X-Id", b"7")]
    )
    assert (response.status, response.body, response.header(b"x-a")) == (200, b"hello", b"1")
    sent = server.requests[0]
    assert sent.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    assert b"\r\nX-Id: 7\r\n" in sent and b"\r\nConnection: close\r\n" in sent
    assert b"\r\nContent-Length: 4\r\n" in sent and sent.endswith(b"\r\n\r\ndata")


async def test_chunked_and_close_delimited_bodies_and_interim_responses(serve) -> None:
    chunked = await serve(
        answer(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
    )
    response = await request(f"http://127.0.0.1:{chunked.port}/")
    assert (response.status, response.body) == (200, b"abcde")
    until_close = await serve(answer(b"HTTP/1.0 503 Busy\r\n\r\nall of it"))
    response = await request(f"http://127.0.0.1:{until_close.port}/", host=b"api.test")
    assert (response.status, response.body) == (503, b"all of it")
    assert b"\r\nHost: api.test\r\n" in until_close.requests[0]


async def test_head_only_when_the_body_is_not_wanted(serve) -> None:
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial"))
    response = await request(f"http://127.0.0.1:{server.port}/", read_body=False, max_body=10)
    assert (response.status, response.body) == (200, b"")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "invalid status line"),
        (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", "invalid header field"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nshort", "before the end of the response body"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"x" * 20, "larger than 10 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n" + b"x" * 20, "larger than 10 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 300, "head larger than 256 bytes"),
        (b"", "closed before a complete response head"),
    ],
    ids=["not-http", "bad-header", "short-body", "big-body", "big-chunked", "bad-chunk", "big-head", "empty"],
)
async def test_bad_responses_are_clear_errors(serve, raw: bytes, message: str) -> None:
    server = await serve(answer(raw))
    with pytest.raises(HttpClientError, match=message):
        await request(f"http://127.0.0.1:{server.port}/", max_body=10, max_head=256)


async def test_timeout_refused_and_bad_urls(serve) -> None:
    async def silent(_request: bytes) -> None:
        await asyncio.sleep(5)

    server = await serve(silent)
    start = time.monotonic()
    with pytest.raises(HttpClientError, match=r"no complete response within 0\.2s"):
        await request(f"http://127.0.0.1:{server.port}/", timeout=0.2)
    assert time.monotonic() - start < 2
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(HttpClientError):
        await request(f"http://127.0.0.1:{port}/")  # nothing listens there any more
    with pytest.raises(HttpClientError, match="not an http"):
        await request("ftp://127.0.0.1/x")


async def test_https_verifies_the_server(serve, tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), tls=cert.server_context())
    url = f"https://127.0.0.1:{server.port}/keys"
    response = await request(url, ssl_context=cert.client_context())
    assert (response.status, response.body) == (200, b"ok")
    with pytest.raises(HttpClientError, match="CERTIFICATE_VERIFY_FAILED"):
        await request(url)  # the system's CAs do not know this certificate


async def test_health_probes_go_through_the_client(serve) -> None:
    ok = await serve(answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    settings = ActiveHealthcheck(http_path="/healthz", timeout=1, expected_statuses=[204])
    result = await probe("127.0.0.1", ok.port, settings, "api.test:80")
    assert (result.ok, result.status) == (True, 204)
    assert ok.requests[0].startswith(b"GET /healthz HTTP/1.1\r\nHost: api.test:80\r\n")
    assert b"User-Agent: tollway-healthcheck\r\n" in ok.requests[0]
    banner = await serve(answer(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
    result = await probe("127.0.0.1", banner.port, settings, "api.test:80")
    assert not result.ok and result.error == "server sent an invalid status line"
    teapot = await serve(answer(b"HTTP/1.1 418 Teapot\r\nContent-Length: 0\r\n\r\n"))
    result = await probe("127.0.0.1", teapot.port, settings, "api.test:80")
    assert (result.ok, result.status, result.error) == (False, 418, "unexpected status 418")
    tcp = await probe("127.0.0.1", banner.port, ActiveHealthcheck(type="tcp", timeout=1), "x")
    assert (tcp.ok, tcp.status) == (True, None)


async def test_jwks_fetch_uses_the_client(serve) -> None:
    document = b'{"keys": []}'
    server = await serve(
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(document), document))
    )
    assert await fetch(f"http://127.0.0.1:{server.port}/jwks", 1024) == document
    assert b"\r\nAccept: application/json\r\n" in server.requests[0]
    missing = await serve(answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(JwksError, match="status 404"):
        await fetch(f"http://127.0.0.1:{missing.port}/jwks", 1024)
    with pytest.raises(JwksError, match="larger than 4 bytes"):
        await fetch(f"http://127.0.0.1:{server.port}/jwks", 4)
