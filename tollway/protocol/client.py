"""A small HTTP/1.1 client for the control plane: active health checks, the JWKS fetcher, and whatever
else the gateway asks of another server (a config store, an admin peer).

One request per connection (``Connection: close``), http or https, bounded in time (`timeout`, the whole
exchange) and size (`max_head`, `max_body`), no redirects followed. The response is read with the same
rules as a backend's on the hot path: `http1.parse_response_head` validates the head and decides the
framing, `http1.ChunkedDecoder` reads chunked bodies; interim 1xx responses are skipped.

Why not aiohttp or httpx: both are measured 5-100x slower per request than what the hot path needs
(python-ecosystem.md §2) and neither is a dependency today; these requests are rare, but a second HTTP
stack would mean a second set of parsing rules. This module is the few dozen lines that tie our parser
to a socket.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from tollway.errors import UpstreamProtocolError
from tollway.protocol.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedDecoder,
    ResponseHead,
    find_head_end,
    parse_response_head,
)

USER_AGENT = b"tollway"
_READ = 65536


class HttpClientError(Exception):
    """The request failed: no connection, TLS refused, an invalid or oversized response, a timeout."""


@dataclass(frozen=True, slots=True)
class ClientResponse:
    status: int
    head: ResponseHead
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return self.head.get(name)


async def request(
    url: str,
    *,
    method: bytes = b"GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    host: bytes | None = None,
    timeout: float = 5.0,
    max_head: int = 16 * 1024,
    max_body: int = 1024 * 1024,
    read_body: bool = True,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ClientResponse:
    """Send one request to `url` (http:// or https://) and read its response.

    `host` overrides the Host header (default: the URL's authority). `read_body=False` returns once the
    head is read (body b""), for callers that want only the status. https verifies the server against
    the system's CAs unless `ssl_context` says otherwise, with the URL's host as the TLS server name
    unless `server_hostname` says otherwise. Raises HttpClientError, nothing else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpClientError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = host if host is not None else parts.netloc.rpartition("@")[2].encode("idna")
    context = (ssl_context or ssl.create_default_context()) if tls else None
    message = _serialize(method, target.encode("latin-1"), authority, headers, body)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(
                parts.hostname, server_hostname, port, context, message, method, max_head, max_body, read_body
            )
    except TimeoutError:
        raise HttpClientError(f"no complete response within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise HttpClientError(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
    except UpstreamProtocolError as exc:
        raise HttpClientError(str(exc).replace("upstream ", "server ", 1)) from None


def _serialize(
    method: bytes, target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
) -> bytes:
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, host)]
    names: set[bytes] = set()
    for name, value in headers:
        names.add(name.lower())
        lines.append(b"%s: %s\r\n" % (name, value))
    if b"user-agent" not in names:
        lines.append(b"User-Agent: %s\r\n" % USER_AGENT)
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"Connection: close\r\n\r\n")
    return b"".join(lines) + body


async def _exchange(
    hostname: str,
    server_hostname: str | None,
    port: int,
    context: ssl.SSLContext | None,
    message: bytes,
    method: bytes,
    max_head: int,
    max_body: int,
    read_body: bool,
) -> ClientResponse:
    reader, writer = await asyncio.open_connection(
        hostname,
        port,
        ssl=context,
        server_hostname=(server_hostname or hostname) if context is not None else None,
    )
    try:
        writer.write(message)
        head, rest = await _read_head(reader, max_head, method)
        body = await _read_body(reader, head, rest, max_body) if read_body else b""
    finally:
        writer.transport.abort()  # one request per connection: nothing to wait for
    return ClientResponse(head.status, head, body)


async def _read_head(
    reader: asyncio.StreamReader, max_head: int, method: bytes
) -> tuple[ResponseHead, bytes]:
    """The final response head (1xx interim heads skipped) and the bytes read after it."""
    buf = b""
    while True:
        end = find_head_end(buf)
        while end < 0:
            if len(buf) > max_head:
                raise HttpClientError(f"response head larger than {max_head} bytes")
            data = await reader.read(_READ)
            if not data:
                raise HttpClientError("connection closed before a complete response head")
            buf += data
            end = find_head_end(buf)
        head = parse_response_head(buf[:end], method)
        buf = buf[end:]
        if not 100 <= head.status < 200:
            return head, buf


async def _read_body(reader: asyncio.StreamReader, head: ResponseHead, rest: bytes, max_body: int) -> bytes:
    if head.body_kind == BODY_NONE:
        return b""
    if head.body_kind == BODY_LENGTH:
        if head.content_length > max_body:
            raise HttpClientError(f"response body larger than {max_body} bytes")
        body = bytearray(rest)
        while len(body) < head.content_length:
            data = await reader.read(_READ)
            if not data:
                raise HttpClientError("connection closed before the end of the response body")
            body += data
        return bytes(body[: head.content_length])
    if head.body_kind == BODY_CHUNKED:
        return await _read_chunked(reader, rest, max_body)
    body = bytearray(rest)  # delimited by the connection's end
    while data := await reader.read(_READ):
        body += data
        if len(body) > max_body:
            raise HttpClientError(f"response body larger than {max_body} bytes")
    return bytes(body)


async def _read_chunked(reader: asyncio.StreamReader, rest: bytes, max_body: int) -> bytes:
    decoder = ChunkedDecoder(collect=True)
    data = rest
    while True:
        decoder.feed(data)
        size = sum(len(piece) for piece in decoder.payload)
        if size > max_body:
            raise HttpClientError(f"response body larger than {max_body} bytes")
        if decoder.done:
            return b"".join(decoder.payload)
        data = await reader.read(_READ)
        if not data:
            raise HttpClientError("connection closed before the last chunk")
