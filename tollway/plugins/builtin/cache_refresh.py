"""stale-while-revalidate's background request: the proxy-cache answered a client from a stale copy
and refreshes it off the request path, with one plain HTTP/1.1 request on a fresh connection to a
target of the route's service (picked and released like any request's, so load balancing and
passive health see it). Bounded in size and time; any failure leaves the stale copy as it was.

Why not through the exchange: an exchange is a client's request and writes to its connection; this
request has no client. It is rare (once per stale key per window), so its own small connection is
cheaper than teaching the exchange to run headless."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tollway.protocol.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedDecoder,
    find_head_end,
    parse_response_head,
)
from tollway.upstream.target import FAILED, OK

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

log = logging.getLogger("tollway.plugins.proxy_cache")
Done = Callable[[int, list[tuple[bytes, bytes]], "bytes | None"], None]
_MAX_HEAD = 65536


async def refresh(ex: RequestContext, headers: list[tuple[bytes, bytes]], max_body: int, done: Done) -> None:
    """GET the exchange's upstream path with `headers`; `done(status, headers, body)` on an answer
    (body None when there is none or it is over `max_body`)."""
    service = ex.service
    if service is None:
        return
    cluster = service.cluster
    target = cluster.pick(ex)
    if target is None:
        return
    started = time.perf_counter()
    outcome = FAILED
    try:
        host = target.host_header
        lines = [b"GET ", ex.upstream_path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        for name, value in headers:
            if name.lower() not in (b"connection", b"host", b"content-length", b"transfer-encoding"):
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"Connection: close\r\n\r\n")
        request = b"".join(lines)
        deadline = service.connect_timeout + service.read_timeout
        status, fields, body = await asyncio.wait_for(
            _fetch(target.host, target.port, request, max_body), deadline
        )
        outcome = FAILED if cluster.failure_status(status) else OK
        done(status, fields, body)
    except Exception as exc:  # the stale copy stays; the next stale hit tries again
        log.info("background cache refresh of %s failed: %s", ex.upstream_path.decode("latin-1"), exc)
    finally:
        cluster.release(target, ex, outcome, time.perf_counter() - started)


async def _fetch(
    host: str, port: int, request: bytes, max_body: int
) -> tuple[int, list[tuple[bytes, bytes]], bytes | None]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        buf = b""
        while (end := find_head_end(buf)) < 0:
            data = await reader.read(65536)
            if not data or len(buf) > _MAX_HEAD:
                raise ConnectionError("no complete response head")
            buf += data
        head = parse_response_head(buf[:end], b"GET")
        rest = buf[end:]
        if head.body_kind == BODY_NONE:
            return head.status, head.headers, b""
        body = await _body(reader, head.body_kind, head.content_length, rest, max_body)
        return head.status, head.headers, body
    finally:
        writer.close()


async def _body(
    reader: asyncio.StreamReader, kind: int, length: int, rest: bytes, max_body: int
) -> bytes | None:
    if kind == BODY_LENGTH:
        if length > max_body:
            return None
        data = rest + await reader.readexactly(max(0, length - len(rest))) if len(rest) < length else rest
        return data[:length]
    if kind != BODY_CHUNKED:
        return None  # close-delimited: truncation would be invisible, so not stored
    decoder = ChunkedDecoder(collect=True)
    decoder.feed(rest)
    size = len(rest)
    while not decoder.done:
        data = await reader.read(65536)
        if not data:
            return None
        size += len(data)
        if size > max_body + 65536:
            return None
        decoder.feed(data)
    return b"".join(decoder.payload)
