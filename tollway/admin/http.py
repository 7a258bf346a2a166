"""The admin listener's HTTP/1.1 server: httptools parses (the same parser as traffic), one request at a
time per connection, bodies buffered up to `max_body` (413 beyond), JSON answers.

Hand-written over a framework because the runtime carries no web framework (aiohttp & co. would be a
second HTTP stack to keep safe) and this is not a hot path: a small, strict server is enough. A handler
exception never reaches the client as a stack trace: it answers 500 with the request id, and is logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import httptools
import orjson

from tollway.proxy.responses import reason

log = logging.getLogger("tollway.admin")
_MAX_HEAD = 64 * 1024  # request line + headers
_MAX_HEADERS = 100
_IDLE_TIMEOUT = 60.0  # seconds a connection may sit without a complete request


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    client: str | None
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))
    path: list[str] = field(default_factory=list)  # percent-decoded segments
    query: dict[str, list[str]] = field(default_factory=dict)

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: Any = None  # JSON-able, or bytes with `content_type`
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encode(self, request_id: str, keep_alive: bool, head_only: bool) -> bytes:
        if isinstance(self.body, bytes):
            body = self.body
        elif self.body is None and self.status in (204, 304):
            body = b""
        else:
            body = orjson.dumps(self.body, option=orjson.OPT_NON_STR_KEYS)
        lines = [
            b"HTTP/1.1 %d %s" % (self.status, reason(self.status)),
            b"Content-Type: " + self.content_type.encode(),
            b"Content-Length: %d" % len(body),
            b"Cache-Control: no-store",
            b"X-Request-Id: " + request_id.encode(),
        ]
        lines += [f"{k}: {v}".encode("latin-1", "replace") for k, v in self.headers.items()]
        if not keep_alive:
            lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, message: str, **extra: Any) -> Response:
    """A JSON error body: every error the admin API answers has this shape (plus `request_id`)."""
    return Response(status, {"message": message, **extra})


class _TooLarge(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


class AdminProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler, max_body: int) -> None:
        self.handler = handler
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.pending: list[tuple[Request, bool]] = []
        self.task: asyncio.Task[None] | None = None
        self.idle: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_name = b""
        self.head_size = 0
        self.body = bytearray()

    # -- asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else None
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except _TooLarge as exc:
            self._fail(exc.status, exc.message)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised (a limit) in HttpParserCallbackError
            cause = exc.__context__
            if isinstance(cause, _TooLarge):
                self._fail(cause.status, cause.message)
            else:
                self._fail(400, f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.idle is not None:
            self.idle.cancel()
        if self.task is not None:
            self.task.cancel()

    # -- httptools callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if len(self.headers) >= _MAX_HEADERS:
            raise _TooLarge(431, f"more than {_MAX_HEADERS} header fields")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.max_body:
            raise _TooLarge(413, f"request body larger than {self.max_body} bytes")
        self.body += body

    def on_headers_complete(self) -> None:
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise _TooLarge(413, f"request body larger than {self.max_body} bytes")
        if self.headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it otherwise

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        request = Request(method, self.url.decode("latin-1"), self.headers, bytes(self.body), self.client)
        self.pending.append((request, self.parser.should_keep_alive()))
        self._reset()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._serve())

    def _count(self, size: int) -> None:
        self.head_size += size
        if self.head_size > _MAX_HEAD:
            raise _TooLarge(431, f"request line and headers larger than {_MAX_HEAD} bytes")

    # -- answering ------------------------------------------------------------------------------------
    async def _serve(self) -> None:
        while self.pending and self.transport is not None:
            request, keep_alive = self.pending.pop(0)
            if self.idle is not None:
                self.idle.cancel()
            response = await self._answer(request)
            if self.transport is None or self.transport.is_closing():
                return
            self.transport.write(response.encode(request.request_id, keep_alive, request.method == "HEAD"))
            if not keep_alive:
                self.transport.close()
                return
            self._arm_idle()

    async def _answer(self, request: Request) -> Response:
        try:
            parts = urlsplit(request.target)
            request.path = [unquote(p) for p in parts.path.split("/") if p]
            request.query = parse_qs(parts.query, keep_blank_values=True)
            response = await self.handler(request)
        except Exception:  # a bug, not the client's doing: logged with the request id, no trace sent
            log.exception(
                "admin API: %s %s failed (request %s)", request.method, request.target, request.request_id
            )
            response = error(500, "internal error (logged with this request id)")
        if isinstance(response.body, dict) and response.status >= 400:
            response.body.setdefault("request_id", request.request_id)
        return response

    def _fail(self, status: int, message: str) -> None:
        """A request the parser refused: answer it and close (the stream cannot be trusted past it)."""
        if self.transport is None or self.transport.is_closing():
            return
        request_id = secrets.token_hex(8)
        body = error(status, message, request_id=request_id)
        self.transport.write(body.encode(request_id, keep_alive=False, head_only=False))
        self.transport.close()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(_IDLE_TIMEOUT, self._close_idle)

    def _close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_server(
    handler: Handler, host: str, port: int, max_body: int, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: AdminProtocol(handler, max_body), host, port, reuse_address=True, ssl=tls
    )
