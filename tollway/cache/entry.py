"""A stored response and its encoding: the same bytes in every store (in-process, node file, Redis).

    entry    "TWC1" | status u16 | flags u8 | response_time, initial_age, lifetime, swr, sie (f64)
             | header block length u32 | header block ("Name: value\\r\\n"...) | body
    variants "TWV1" | nonce (8 bytes) | the lowercase names the response varies on, comma-separated

A URI whose responses vary (Vary, or a cache keyed on request headers or the consumer) has a variants
record under its primary key and its entries under secondary keys built from the record's nonce
(tollway.cache.keys): deleting the one record invalidates every variant at once, and a new record
(new nonce) never makes an old variant reachable again.
"""

from __future__ import annotations

import os
import re
import struct

from tollway.cache import rfc

_ENTRY = struct.Struct("<4sHBdddddI")
_MAGIC_ENTRY = b"TWC1"
_MAGIC_VARIANTS = b"TWV1"
_LINE = re.compile(rb"([^:\r\n]+): ([^\r\n]*)\r\n")

NO_CACHE = 1  # the response says no-cache: validate before every reuse
NO_STALE = 2  # no-cache, must-revalidate, proxy-revalidate or s-maxage: never served stale
VALIDATORS = 4  # it has an ETag or Last-Modified: worth keeping after it goes stale
REQUEST_ID = 8  # the backend echoed X-Request-Id: answers from the copy carry their own request's


class Entry:
    __slots__ = (
        "body",
        "flags",
        "headers",
        "initial_age",
        "lifetime",
        "response_time",
        "sie",
        "status",
        "swr",
    )

    def __init__(
        self,
        status: int,
        headers: rfc.Headers,
        body: bytes,
        response_time: float,
        initial_age: float,
        lifetime: float,
        swr: float = 0.0,
        sie: float = 0.0,
        flags: int = 0,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.response_time = response_time
        self.initial_age = initial_age
        self.lifetime = lifetime
        self.swr = swr
        self.sie = sie
        self.flags = flags

    def __repr__(self) -> str:
        return f"<Entry {self.status} {len(self.body)} bytes lifetime={self.lifetime}>"

    def age(self, now: float) -> float:
        return rfc.current_age(self.initial_age, self.response_time, now)

    def directives(self) -> rfc.Directives:
        return rfc.directives_from(self.headers)

    def keep_for(self, now: float, validated_keep: float) -> float:
        """How long a store should keep this entry from `now`: while fresh, then `validated_keep` more
        (or its stale windows if longer) when it may still serve stale or be revalidated cheaply."""
        remaining = self.lifetime - self.age(now)
        if not self.flags & NO_STALE:
            remaining += max(self.swr, self.sie, validated_keep)  # a client's max-stale may take it
        elif self.flags & VALIDATORS:
            remaining += validated_keep
        return max(remaining, 1.0)

    def encode(self) -> bytes:
        block = b"".join(b"%s: %s\r\n" % (n, v) for n, v in self.headers)
        head = _ENTRY.pack(
            _MAGIC_ENTRY,
            self.status,
            self.flags,
            self.response_time,
            self.initial_age,
            self.lifetime,
            self.swr,
            self.sie,
            len(block),
        )
        return b"".join((head, block, self.body))


def flags_for(response_cc: rfc.Directives, headers: rfc.Headers) -> int:
    flags = 0
    if "no-cache" in response_cc:
        flags |= NO_CACHE
    if not rfc.may_serve_stale(response_cc):
        flags |= NO_STALE
    if rfc.field(headers, b"etag") is not None or rfc.field(headers, b"last-modified") is not None:
        flags |= VALIDATORS
    return flags


def build_entry(
    status: int,
    headers: rfc.Headers,
    body: bytes,
    sent: float,
    received: float,
    policy: tuple[bool, float, float, float],
    age_from: rfc.Headers | None = None,
    flags: int = 0,
) -> Entry:
    """The entry for a response received at `received` to a request sent at `sent`, under `policy`
    (heuristic freshness, default TTL, default stale-while-revalidate and stale-if-error windows). Its
    age comes from `age_from` (the response as received, with its Age field) when given. A backend's
    echo of X-Request-Id names one request: the entry keeps the REQUEST_ID flag instead, so every
    answer from it names its own request."""
    heuristic, default_ttl, swr, sie = policy
    if rfc.field(headers, b"x-request-id") is not None:
        headers = [h for h in headers if h[0].lower() != b"x-request-id"]
        flags |= REQUEST_ID
    cc = rfc.directives_from(headers)
    return Entry(
        status,
        headers,
        body,
        received,
        rfc.initial_age(age_from if age_from is not None else headers, sent, received),
        rfc.freshness_lifetime(status, cc, headers, received, heuristic, default_ttl),
        rfc.window(cc, "stale-while-revalidate", swr),
        rfc.window(cc, "stale-if-error", sie),
        flags_for(cc, headers) | flags,
    )


class Variants:
    __slots__ = ("names", "nonce")

    def __init__(self, names: tuple[bytes, ...], nonce: bytes | None = None) -> None:
        self.names = names
        self.nonce = nonce or os.urandom(8)

    def encode(self) -> bytes:
        return _MAGIC_VARIANTS + self.nonce + b",".join(self.names)


def decode(data: bytes | memoryview) -> Entry | Variants | None:
    """An Entry, a Variants record, or None for bytes that are neither (a corrupt or foreign value)."""
    data = bytes(data)
    magic = data[:4]
    if magic == _MAGIC_VARIANTS and len(data) >= 12:
        names = data[12:]
        return Variants(tuple(names.split(b",")) if names else (), data[4:12])
    if magic != _MAGIC_ENTRY or len(data) < _ENTRY.size:
        return None
    _, status, flags, response_time, initial, lifetime, swr, sie, block_len = _ENTRY.unpack_from(data)
    start = _ENTRY.size
    end = start + block_len
    if end > len(data):
        return None
    headers = _LINE.findall(data, start, end)
    return Entry(status, headers, data[end:], response_time, initial, lifetime, swr, sie, flags)
