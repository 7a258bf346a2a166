"""The cache stores behind get/put/delete: in-process LRU, the node's LMDB file (shared across
processes), and the same operations on the real Redis at 127.0.0.1:6379 under a unique key prefix."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.state_support import cleanup_prefix
from tollway.cache.redis_store import RedisStore
from tollway.cache.store import LmdbStore, MemoryStore
from tollway.state.redis_backends import Standalone
from tollway.state.redis_client import RedisClient


@pytest.fixture(params=["memory", "lmdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore(10_000)
        return
    lmdb_store = LmdbStore(str(tmp_path / "node"), 10_000)
    yield lmdb_store
    lmdb_store.close()


def test_get_put_delete(store: Any) -> None:
    assert store.get(b"http://h/a") is None
    store.put(b"http://h/a", b"A", 60)
    store.put(b"http://h/a#v123", b"variant", 60)
    store.put(b"http://h/ab", b"other", 60)
    assert store.get(b"http://h/a") == b"A"
    assert store.delete(b"http://h/a") == 2  # the key and its variants
    assert store.get(b"http://h/a#v123") is None
    assert store.get(b"http://h/ab") == b"other"  # a longer path is not a variant
    assert store.delete(b"http://h/missing") == 0


def test_expiry(store: Any) -> None:
    store.put(b"k", b"v", 0.05)
    assert store.get(b"k") == b"v"
    time.sleep(0.1)
    assert store.get(b"k") is None


def test_byte_budget_evicts_least_recently_used(store: Any) -> None:
    for i in range(4):
        store.put(b"k%d" % i, b"x" * 3000, 60)
        time.sleep(0.002)
    assert store.used_bytes() <= 10_000
    assert store.get(b"k0") is None  # the oldest went first
    assert store.get(b"k3") == b"x" * 3000
    assert store.stats.evictions >= 1
    store.put(b"huge", b"x" * 20_000, 60)  # over the whole budget: not stored
    assert store.get(b"huge") is None


def test_lru_follows_reads(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import tollway.cache.store as module

    monkeypatch.setattr(module, "TOUCH_AFTER", 0.0)
    store.put(b"a", b"x" * 3000, 60)
    time.sleep(0.002)
    store.put(b"b", b"x" * 3000, 60)
    time.sleep(0.002)
    store.put(b"c", b"x" * 3000, 60)
    time.sleep(0.002)
    assert store.get(b"a") is not None  # a is now the most recent
    time.sleep(0.002)
    store.put(b"d", b"x" * 3000, 60)
    assert store.get(b"a") is not None and store.get(b"b") is None


def test_purge_prefix_and_tag(store: Any) -> None:
    store.put(b"http://h/users/1", b"1", 60, ["user-1", "users"])
    store.put(b"http://h/users/2", b"2", 60, ["users"])
    store.put(b"http://h/orders/1", b"o", 60, ["orders"])
    assert store.purge_tag("users") == 2
    assert store.get(b"http://h/users/1") is None and store.get(b"http://h/orders/1") == b"o"
    store.put(b"http://h/users/3", b"3", 60)
    assert store.purge_prefix(b"http://h/users/") == 1
    assert store.purge_prefix(b"http://h/") == 1
    assert store.used_bytes() == 0


def _child_put(path: str) -> None:
    child = LmdbStore(path, 1 << 20)
    child.put(b"http://h/from-child", b"stored by another process", 60)
    child.close()


def test_lmdb_is_shared_by_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "node")
    parent = LmdbStore(path, 1 << 20)
    process = multiprocessing.get_context("spawn").Process(target=_child_put, args=(path,))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert parent.get(b"http://h/from-child") == b"stored by another process"
    parent.close()


# -- Redis -----------------------------------------------------------------------------------------------
@pytest.fixture
def redis_store(redis_address: tuple[str, int]) -> Iterator[RedisStore]:
    prefix = f"tollway-test:cache:{uuid.uuid4().hex[:8]}:"
    host, port = redis_address
    loop = asyncio.new_event_loop()
    store = RedisStore(Standalone(RedisClient(host, port, timeout=2.0, connect_timeout=2.0)), prefix)
    store.loop = loop  # type: ignore[attr-defined]
    yield store
    loop.run_until_complete(store.backend.close())
    loop.close()
    cleanup_prefix(host, port, prefix)


def run(store: RedisStore, coro: Any) -> Any:
    return store.loop.run_until_complete(coro)  # type: ignore[attr-defined]


def test_redis_get_put_delete_and_purges(redis_store: RedisStore) -> None:
    s = redis_store
    assert run(s, s.get(b"http://h/a")) is None
    run(s, s.put(b"http://h/a", b"A", 60, ["t1"]))
    run(s, s.put(b"http://h/a#vabc", b"variant", 60))
    run(s, s.put(b"http://h/a*[x]", b"glob characters", 60, ["t1"]))
    assert run(s, s.get(b"http://h/a")) == b"A"
    assert run(s, s.delete(b"http://h/a")) == 2
    assert run(s, s.get(b"http://h/a*[x]")) == b"glob characters"  # not a variant, despite the glob
    assert run(s, s.purge_tag("t1")) == 1
    run(s, s.put(b"http://h/p/1", b"1", 60))
    run(s, s.put(b"http://h/p/2", b"2", 60))
    assert run(s, s.purge_prefix(b"http://h/p/")) == 2
    run(s, s.put(b"http://h/ttl", b"t", 0.05))
    time.sleep(0.15)
    assert run(s, s.get(b"http://h/ttl")) is None


def test_lmdb_returns_the_same_object_while_a_value_is_unchanged(tmp_path: Path) -> None:
    store = LmdbStore(str(tmp_path / "node"), 1 << 20)
    store.put(b"k", b"first", 60)
    one, two = store.get(b"k"), store.get(b"k")
    assert one == b"first" and one is two  # decoded once per process by the plugin
    store.put(b"k", b"first", 60)  # rewritten (same bytes, new stamp): a fresh object
    three = store.get(b"k")
    assert three == b"first" and three is not one
    store.put(b"k", b"second", 60)
    assert store.get(b"k") == b"second"
    store.close()


def _child_change(path: str, action: str) -> None:
    child = LmdbStore(path, 1 << 20)
    if action == "put":
        child.put(b"http://h/k", b"changed by another process", 60)
    elif action == "delete":
        child.delete(b"http://h/k")
    elif action == "purge-prefix":
        child.purge_prefix(b"http://h/")
    else:
        child.purge_tag("t")
    child.close()


@pytest.mark.parametrize("action", ["put", "delete", "purge-prefix", "purge-tag"])
def test_a_value_reused_without_a_read_follows_changes_made_by_other_processes(
    tmp_path: Path, action: str
) -> None:
    """A value this process read is reused without an LMDB read (Generation); a change another
    process commits must still show on the very next get."""
    path = str(tmp_path / "node")
    store = LmdbStore(path, 1 << 20)
    store.put(b"http://h/k", b"original", 60, ["t"])
    first = store.get(b"http://h/k")
    assert first == b"original" and store.get(b"http://h/k") is first  # reused
    process = multiprocessing.get_context("spawn").Process(target=_child_change, args=(path, action))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    expected = b"changed by another process" if action == "put" else None
    assert store.get(b"http://h/k") == expected
    store.close()
