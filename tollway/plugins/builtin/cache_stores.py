"""Which store a proxy-cache instance uses (tollway.cache.store, tollway.cache.redis_store), opened in
the worker on first use and shared by every instance that names the same one."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

from tollway.cache.stats import STATS
from tollway.cache.store import MemoryStore, node_store

if TYPE_CHECKING:
    from tollway.plugins.builtin.cache_config import ProxyCacheConfig

log = logging.getLogger("tollway.plugins.proxy_cache")

_WORKER_STORES: dict[int, MemoryStore] = {}


def open_store(config: ProxyCacheConfig) -> Any:
    if config.store == "worker":
        store = _WORKER_STORES.get(config.max_size)
        if store is None:
            store = _WORKER_STORES[config.max_size] = MemoryStore(config.max_size)
        return store
    if config.store == "redis":
        from tollway.cache.redis_store import RedisStore
        from tollway.state.redis_backends import backend_for

        url = config.redis_url or "redis://127.0.0.1:6379/0"
        backend = backend_for(url, timeout=config.redis_timeout)
        return RedisStore(backend, config.redis_prefix)
    return node_store(config.path or default_node_path(), config.max_size)


def node_base() -> str:
    base = os.environ.get("TOLLWAY_CACHE_DIR")
    if base:
        return base
    shm = "/dev/shm"
    root = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    return os.path.join(root, f"tollway-cache-{os.getuid()}")


def default_node_path() -> str:
    """One store per running node: named after the supervisor (every worker's parent), so the node's
    workers share it, a restarted worker finds it, and two gateways on one host never mix copies.
    Stores of nodes that are gone are removed here."""
    base = node_base()
    supervisor = os.getppid()
    os.makedirs(base, mode=0o700, exist_ok=True)  # copies of responses: this user's only
    for name in os.listdir(base):
        pid = int(name[5:]) if name.startswith("node-") and name[5:].isdigit() else supervisor
        if pid != supervisor and not _alive(pid):
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.join(base, name))
    return os.path.join(base, f"node-{supervisor}")


def live_node_paths() -> list[str]:
    base = node_base()
    if not os.path.isdir(base):
        return []
    return [
        os.path.join(base, name)
        for name in sorted(os.listdir(base))
        if name.startswith("node-") and name[5:].isdigit() and _alive(int(name[5:]))
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_last_warning = [0.0]


def warn(message: str, exc: Exception) -> None:
    """A store failure, logged at most every 10 s (an outage must not flood the log; the counter
    `store_errors` has them all)."""
    now = time.monotonic()
    if now - _last_warning[0] >= 10.0:
        _last_warning[0] = now
        log.warning(message, exc)


async def put_async(store: Any, writes: list[tuple[bytes, bytes, float]], tags: list[str]) -> None:
    try:
        for key, value, seconds in writes:
            await store.put(key, value, seconds, tags)
    except Exception as exc:
        STATS.store_errors += 1
        warn("cache store failed to store a response: %s", exc)


async def delete_async(store: Any, doomed: list[bytes]) -> None:
    try:
        for key in doomed:
            await store.delete(key)
    except Exception as exc:
        STATS.store_errors += 1
        warn("cache store failed to invalidate: %s", exc)


def release_lease(store: Any, key: bytes) -> None:
    """End a fill lease (tollway.cache.store.LmdbStore.lock); a failure only delays the others."""
    try:
        store.unlock(key)
    except Exception as exc:
        warn("cache store failed to release a fill lease: %s", exc)
