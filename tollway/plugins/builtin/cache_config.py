"""proxy-cache's options (docs/plugins/proxy-cache.md has the reference)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tollway.config.types import Duration, Size
from tollway.plugins.base import HeaderName, PluginConfig


class ProxyCacheConfig(PluginConfig):
    store: Literal["node", "worker", "redis"] = Field(
        "node",
        description="node: shared by the node's workers (LMDB file); worker: per process; redis: cluster",
    )
    path: str | None = Field(
        None, description="node store directory (default: one per running node in /dev/shm)"
    )
    max_size: Size = Field(
        256 << 20, ge=1 << 16, description="node/worker store budget in bytes (LRU beyond)"
    )
    max_object_size: Size = Field(1 << 20, ge=1, description="larger responses pass through, not stored")
    redis_url: str | None = Field(None, description="store: redis — redis://host:port/db, sentinel, cluster")
    redis_prefix: str = Field(
        "tollway:cache:", pattern=r"^[A-Za-z0-9:_.-]{0,64}$", description="prefix of every Redis key"
    )
    redis_timeout: Duration = Field(0.25, gt=0, description="a slower Redis reply counts as a miss")
    methods: list[Literal["GET", "HEAD"]] = Field(
        ["GET", "HEAD"], description="methods answered from the cache"
    )
    default_ttl: Duration = Field(
        0.0, ge=0, description="freshness of responses that state none (0: not stored)"
    )
    heuristic_freshness: bool = Field(False, description="RFC 9111 4.2.2: 10% of the Last-Modified age")
    stale_while_revalidate: Duration = Field(0.0, ge=0, description="when the response states none")
    stale_if_error: Duration = Field(0.0, ge=0, description="when the response states none")
    keep_stale: Duration = Field(3600.0, ge=0, description="keep stale copies with validators this long")
    ignore_client_no_cache: bool = Field(False, description="serve fresh copies despite a client's no-cache")
    ignore_query_params: list[str] = Field(default_factory=list, description="left out of the key")
    sort_query: bool = Field(False, description="a=1&b=2 and b=2&a=1 share a key")
    key_headers: list[HeaderName] = Field(default_factory=list, description="request headers in the key")
    key_consumer: bool = Field(False, description="a copy per consumer")
    cache_set_cookie: bool = Field(False, description="store responses that set cookies")
    coalesce: bool = Field(True, description="concurrent misses for a key wait for one backend request")
    coalesce_timeout: Duration = Field(5.0, gt=0, description="how long a waiting miss waits")
    status_header: HeaderName | None = Field("X-Cache-Status", description="HIT/MISS/STALE/...; null: none")
    cache_status_name: str = Field("Tollway", pattern=r"^[A-Za-z0-9._-]{1,32}$", description="RFC 9211 name")

    @model_validator(mode="after")
    def _consistent(self) -> ProxyCacheConfig:
        if self.redis_url is not None:
            scheme, sep, rest = self.redis_url.partition("://")
            if not sep or scheme not in _REDIS_SCHEMES:
                raise ValueError(f"redis_url must start with {', '.join(s + '://' for s in _REDIS_SCHEMES)}")
            if not rest.rpartition("@")[2].partition("/")[0]:
                raise ValueError("redis_url names no host")
        elif self.store == "redis":
            raise ValueError("store: redis needs redis_url")
        return self


_REDIS_SCHEMES = ("redis", "redis+sentinel", "redis+cluster")
