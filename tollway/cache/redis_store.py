"""The cluster store: cached responses in Redis, shared by every node (tollway.cache.store's interface,
asynchronous). Runs on the gateway's own RESP client (tollway.state.redis_client), whose calls fail
fast with `RedisError` while Redis is down: the plugin then treats the request as a miss and goes to
the backend, never answering 5xx for the cache's sake.

Keys: ``<prefix>d:<cache key>`` holds an entry with a TTL (SET PX); ``<prefix>t:<tag>`` is the set of
keys carrying a Surrogate-Key/Cache-Tag, expiring with the longest of them. Eviction by bytes is
Redis's own: run it with `maxmemory` and `maxmemory-policy allkeys-lru` (docs/plugins/proxy-cache.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from tollway.cache.store import CacheStats
from tollway.state.redis_backends import RedisBackend
from tollway.state.redis_client import RedisError

_SCAN_COUNT = 500
_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


class RedisStore:
    is_async = True

    def __init__(self, backend: RedisBackend, prefix: str = "tollway:cache:") -> None:
        self.backend = backend
        self.prefix = prefix.encode()
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return f"<RedisStore {self.backend.name} prefix={self.prefix.decode()!r}>"

    async def get(self, key: bytes) -> bytes | None:
        value = await self.backend.call(b"GET", self.prefix + b"d:" + key)
        return value if isinstance(value, bytes) else None

    async def put(self, key: bytes, value: bytes, ttl: float, tags: Iterable[str] = ()) -> None:
        millis = max(1, int(ttl * 1000))
        data_key = self.prefix + b"d:" + key
        await self.backend.call(b"SET", data_key, value, b"PX", millis)
        for tag in tags:
            tag_key = self.prefix + b"t:" + tag.encode("utf-8")
            await self.backend.call(b"SADD", tag_key, data_key)
            await self.backend.call(b"PEXPIRE", tag_key, millis, b"GT")
            await self.backend.call(b"PEXPIRE", tag_key, millis, b"NX")
        self.stats.puts += 1

    async def delete(self, key: bytes) -> int:
        data_key = self.prefix + b"d:" + key
        doomed = [data_key, *await self._scan(data_key + b"#v")]
        return int(await self.backend.call(b"DEL", *doomed))

    async def purge_prefix(self, prefix: bytes) -> int:
        doomed = await self._scan(self.prefix + b"d:" + prefix)
        count = 0
        for start in range(0, len(doomed), _SCAN_COUNT):
            count += int(await self.backend.call(b"DEL", *doomed[start : start + _SCAN_COUNT]))
        return count

    async def purge_tag(self, tag: str) -> int:
        tag_key = self.prefix + b"t:" + tag.encode("utf-8")
        members = await self.backend.call(b"SMEMBERS", tag_key)
        count = int(await self.backend.call(b"DEL", *members)) if members else 0
        await self.backend.call(b"DEL", tag_key)
        return count

    async def _scan(self, prefix: bytes) -> list[bytes]:
        pattern = prefix.decode("latin-1").translate(_GLOB).encode("latin-1") + b"*"
        found: list[bytes] = []
        cursor = b"0"
        while True:
            cursor, keys = await self.backend.call(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", _SCAN_COUNT)
            found.extend(keys)
            if cursor == b"0":
                return found


__all__ = ["RedisError", "RedisStore"]
