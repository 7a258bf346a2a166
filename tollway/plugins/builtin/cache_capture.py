"""Copying a response body for the cache while it streams to the client (`RequestContext.body_tap`), and
the tags a response carries for purging."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tollway.cache import rfc
from tollway.cache.stats import STATS
from tollway.protocol.http1 import BODY_CHUNKED, ChunkedDecoder

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class BodyCapture:
    """Gathers the payload (chunk framing removed) and calls `done(body)` when the response completes;
    past `limit` bytes it lets go (the body streams on, nothing is stored). A cut response never
    completes, so it is never stored."""

    __slots__ = ("chunks", "decoder", "done", "ex", "limit", "size")

    def __init__(self, ex: RequestContext, kind: int, limit: int, done: Callable[[bytes], None]) -> None:
        self.ex = ex
        self.limit = limit
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0
        self.decoder = ChunkedDecoder(collect=True) if kind == BODY_CHUNKED else None

    def feed(self, data: bytes | None) -> None:
        if data is None:
            if self.decoder is None or self.decoder.done:
                self.done(b"".join(self.chunks))
            return
        decoder = self.decoder
        if decoder is not None:
            decoder.feed(data)
            data = b"".join(decoder.payload)
            decoder.payload.clear()
        self.size += len(data)
        if self.size > self.limit:
            self.ex.body_tap = None
            STATS.too_large += 1
            return
        self.chunks.append(data)


def tags(headers: rfc.Headers) -> list[str]:
    """Surrogate-Key (space-separated) and Cache-Tag (comma-separated) values."""
    found: list[str] = []
    surrogate = rfc.field(headers, b"surrogate-key")
    if surrogate is not None:
        found += surrogate.decode("latin-1").split()
    cache_tag = rfc.field(headers, b"cache-tag")
    if cache_tag is not None:
        found += [t.strip() for t in cache_tag.decode("latin-1").split(",") if t.strip()]
    return found
