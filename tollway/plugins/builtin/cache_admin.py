"""Purging proxy-cache stores from outside the gateway (`tollway cache purge`): by key, by key prefix
or by tag (the backend's Surrogate-Key / Cache-Tag). Works on the node stores of running nodes of this
host and on Redis stores; a `worker` store lives in one process's memory and cannot be reached."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tollway.cache.redis_store import RedisStore
from tollway.cache.store import node_store
from tollway.plugins.builtin.cache_config import ProxyCacheConfig
from tollway.plugins.builtin.cache_stores import live_node_paths

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig


def cache_configs(cfg: GatewayConfig) -> list[ProxyCacheConfig]:
    """Every proxy-cache instance's config (validated), wherever it is attached."""
    found: list[ProxyCacheConfig] = []
    for instance in _instances(cfg):
        if instance.name == "proxy-cache":
            found.append(ProxyCacheConfig.model_validate(instance.config))
    return found


def _instances(cfg: GatewayConfig) -> Iterator[Any]:
    yield from cfg.plugins
    for holder in (*cfg.services, *cfg.routes, *cfg.consumers):
        yield from getattr(holder, "plugins", None) or ()


def purge(
    cfg: GatewayConfig, key: str | None, prefix: str | None, tag: str | None
) -> list[tuple[str, int | str]]:
    """Purge every store the configuration's caches use: [(store, keys removed or why not)]."""
    results: list[tuple[str, int | str]] = []
    seen: set[tuple[str, ...]] = set()
    ident: tuple[str, ...]
    for config in cache_configs(cfg):
        if config.store == "worker":
            ident = ("worker",)
            if ident not in seen:
                results.append(
                    ("worker stores", "per-process memory: not reachable (they expire on their own)")
                )
        elif config.store == "redis":
            url = config.redis_url or "redis://127.0.0.1:6379/0"
            ident = ("redis", url, config.redis_prefix)
            if ident not in seen:
                results.append(
                    (
                        f"redis {url} {config.redis_prefix}",
                        asyncio.run(_purge_redis(config, key, prefix, tag)),
                    )
                )
        else:
            paths = [config.path] if config.path else live_node_paths()
            for path in paths:
                ident = ("node", path)
                if ident not in seen:
                    seen.add(ident)
                    results.append(
                        (f"node {path}", _purge_sync(node_store(path, config.max_size), key, prefix, tag))
                    )
            continue
        seen.add(ident)
    return results


def _purge_sync(store: object, key: str | None, prefix: str | None, tag: str | None) -> int:
    count = 0
    if key is not None:
        count += store.delete(key.encode())  # type: ignore[attr-defined]
    if prefix is not None:
        count += store.purge_prefix(prefix.encode())  # type: ignore[attr-defined]
    if tag is not None:
        count += store.purge_tag(tag)  # type: ignore[attr-defined]
    return count


async def _purge_redis(config: ProxyCacheConfig, key: str | None, prefix: str | None, tag: str | None) -> int:
    from tollway.state.redis_backends import backend_from_url

    backend = backend_from_url(config.redis_url or "redis://127.0.0.1:6379/0", timeout=2.0)
    store = RedisStore(backend, config.redis_prefix)
    try:
        count = 0
        if key is not None:
            count += await store.delete(key.encode())
        if prefix is not None:
            count += await store.purge_prefix(prefix.encode())
        if tag is not None:
            count += await store.purge_tag(tag)
        return count
    finally:
        await backend.close()
