"""Consistent hashing on a ring (ketama-style), keyed by client IP, a header, a cookie, the consumer or
the path: requests with the same key go to the same target while it is available.

Why a ring and not Maglev: a ring moves only the keys of the target that joins or leaves (1/n of them,
the minimum), needs no rebuild when health changes — a lookup walks past unavailable targets to the next
point, so a returning target gets its own keys back — and its points follow weights directly. Maglev's
O(1) lookup would need a table rebuild on every health change.

Each target gets points in proportion to its weight, `POINTS` for the smallest weight of the tier (so an
even spread: within about 1.5% of the weight share). A target's points depend only on its own name,
address and weight — not on how many other targets there are — so a target joining or leaving moves no
key between the others (unless it changes the smallest weight). Point positions are CRC-32 hashes
(finished with MurmurHash3's fmix32) of the target's name and address, so every worker and every node
builds the same ring.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final
from zlib import crc32

from tollway.upstream.balancers.base import Balancer, excluded
from tollway.upstream.target import Target

POINTS: Final = 1000  # points of a target with the tier's smallest weight
_MAX_POINTS: Final = 1 << 20  # a ring larger than this is scaled down (weights like 1 and 65535)

ON_IP: Final = 0
ON_HEADER: Final = 1
ON_COOKIE: Final = 2
ON_CONSUMER: Final = 3
ON_PATH: Final = 4
_KINDS: Final = {
    "ip": ON_IP,
    "header": ON_HEADER,
    "cookie": ON_COOKIE,
    "consumer": ON_CONSUMER,
    "path": ON_PATH,
}


def hash32(data: bytes) -> int:
    """CRC-32 (C speed) finished with MurmurHash3's fmix32 so that nearby inputs land far apart."""
    h = crc32(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


class ConsistentHash(Balancer):
    __slots__ = ("_kind", "_owners", "_points", "hash_key", "hash_on")

    def __init__(self, hash_on: str = "ip", hash_key: str = "") -> None:
        super().__init__()
        self.hash_on = hash_on
        self.hash_key = hash_key
        self._kind = _KINDS[hash_on]
        self._points: list[int] = []
        self._owners: list[Target] = []

    def __repr__(self) -> str:
        return f"<ConsistentHash on={self.hash_on} targets={len(self.targets)} points={len(self._points)}>"

    def build(self, targets: list[Target]) -> None:
        ring: list[tuple[int, int]] = []
        weights = [t.weight for t in targets if t.weight > 0]
        if weights:
            scale = POINTS / min(weights)
            total = scale * sum(weights)
            if total > _MAX_POINTS:
                scale *= _MAX_POINTS / total
            for index, target in enumerate(targets):
                count = max(1, round(target.weight * scale))
                prefix = f"{target.key} {target.label} ".encode()
                for i in range(count):
                    ring.append((hash32(prefix + str(i).encode()), index))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [targets[index] for _, index in ring]

    def pick(self, ctx: Any, exclude: list[Target] | None) -> Target | None:
        if not self.targets:
            return None
        return self.lookup(self.key_of(ctx), exclude)

    def lookup(self, key: bytes, exclude: list[Target] | None = None) -> Target | None:
        points = self._points
        n = len(points)
        if n == 0:
            return None
        start = bisect_left(points, hash32(key))
        owners = self._owners
        for step in range(n):
            target = owners[(start + step) % n]
            if target.state.available and (exclude is None or not excluded(target, exclude)):
                return target
        return None

    def key_of(self, ctx: Any) -> bytes:
        """The request's hash key; without a header, cookie or consumer, the client IP stands in."""
        kind = self._kind
        value: str | None = None
        if kind == ON_PATH:
            value = ctx.path
        elif kind == ON_HEADER:
            value = ctx.get_header(self.hash_key)
        elif kind == ON_COOKIE:
            value = cookie_value(ctx.get_header("cookie"), self.hash_key)
        elif kind == ON_CONSUMER:
            consumer = ctx.consumer
            if consumer is not None:
                value = str(getattr(consumer, "username", None) or getattr(consumer, "id", None) or consumer)
        if not value:
            value = ctx.client_ip
        return str(value).encode("utf-8", "replace")


def cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip('"')
    return None
