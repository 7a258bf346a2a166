"""The store interface on both backends: real SQLite files and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tollway.config.loader import validate
from tollway.errors import ConfigError
from tollway.store.base import ConfigStore, NodeInfo
from tollway.store.migrations import LATEST
from tollway.store.model import (
    Conflict,
    Delete,
    NotFound,
    Put,
    StoreError,
    WriteRefused,
    diff,
    ops_from_document,
)
from tollway.store.postgres import PostgresStore
from tollway.store.sqlite import SQLiteStore

SERVICE = {"name": "users", "url": "http://127.0.0.1:9001"}
ROUTE = {"name": "users", "service": "users", "paths": ["/users"]}


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConfigStore]:
    if request.param == "sqlite":
        s: ConfigStore = SQLiteStore(tmp_path / "tollway.db")
    else:
        s = PostgresStore(request.getfixturevalue("pg_dsn_fresh"))
        await s.migrate()
    await s.open()
    yield s
    await s.close()


async def test_a_write_bumps_the_version_once_and_reads_back(store: ConfigStore) -> None:
    assert await store.version() == 0
    result = await store.write([Put("services", SERVICE), Put("routes", ROUTE)], author="test")
    assert result.version == 1
    assert [(c.kind, c.key, c.action) for c in result.changes] == [
        ("services", "users", "create"),
        ("routes", "users", "create"),
    ]
    rows = await store.load()
    assert rows.version == 1
    assert rows.document()["routes"] == [ROUTE]
    assert rows.by_kind["routes"]["users"].version == 1


async def test_the_same_write_twice_changes_nothing_and_bumps_no_version(store: ConfigStore) -> None:
    await store.write([Put("services", SERVICE), Put("routes", ROUTE)])
    again = await store.write([Put("services", dict(SERVICE)), Put("routes", dict(ROUTE))])
    assert again.version == 1 and again.changes == []
    assert await store.version() == 1


async def test_a_dangling_reference_is_refused_whole(store: ConfigStore) -> None:
    await store.write([Put("services", SERVICE)])
    with pytest.raises(WriteRefused) as refused:
        # the first op is fine; the second leaves a route to a missing service: neither is applied
        await store.write(
            [
                Put("services", {**SERVICE, "url": "http://127.0.0.1:9002"}),
                Put("routes", {**ROUTE, "service": "missing"}),
            ]
        )
    assert refused.value.issues == ["store: routes[0] \"users\": service: unknown service 'missing'"]
    rows = await store.load()
    assert rows.version == 1 and rows.document()["services"] == [SERVICE] and not rows.document()["routes"]


async def test_deleting_a_referenced_service_is_refused(store: ConfigStore) -> None:
    await store.write([Put("services", SERVICE), Put("routes", ROUTE)])
    with pytest.raises(WriteRefused, match="unknown service 'users'"):
        await store.write([Delete("services", "users")])
    assert (await store.version()) == 1
    deleted = await store.write([Delete("routes", "users"), Delete("services", "users")])
    assert deleted.version == 2 and {c.action for c in deleted.changes} == {"delete"}


async def test_validation_messages_are_those_of_tollway_check(store: ConfigStore) -> None:
    bad_route = {**ROUTE, "paths": ["users"]}
    doc = {"services": [SERVICE], "routes": [bad_route]}
    with pytest.raises(ConfigError) as checked:
        validate(doc, source="store")
    with pytest.raises(WriteRefused) as refused:
        await store.write(ops_from_document(doc))
    assert refused.value.issues == checked.value.issues
    assert any('routes[0] "users": paths[0]' in issue for issue in refused.value.issues)


async def test_expected_versions_detect_lost_updates(store: ConfigStore) -> None:
    await store.write([Put("services", SERVICE, expect_version=0)])
    with pytest.raises(Conflict):
        await store.write([Put("services", SERVICE, expect_version=0)])  # exists already
    with pytest.raises(Conflict, match="at version 1, not 7"):
        await store.write([Put("services", {**SERVICE, "url": "http://127.0.0.1:1"}, expect_version=7)])
    ok = await store.write([Put("services", {**SERVICE, "url": "http://127.0.0.1:1"}, expect_version=1)])
    assert ok.version == 2


async def test_changes_since_returns_only_what_changed(store: ConfigStore) -> None:
    await store.write([Put("services", SERVICE), Put("routes", ROUTE)])
    other = {"name": "other", "service": "users", "paths": ["/other"]}
    await store.write([Put("routes", other)])
    await store.write([Delete("routes", "users")])
    version, changes = await store.changes_since(1)
    assert version == 3
    assert sorted((c.kind, c.key, c.row is None) for c in changes) == [
        ("routes", "other", False),
        ("routes", "users", True),
    ]
    base = await store.load()
    assert base.document()["routes"] == [other]


async def test_concurrent_writers_serialise(store: ConfigStore, tmp_path: Path, request: Any) -> None:
    await store.write([Put("services", SERVICE)])
    routes = [{"name": f"r{i}", "service": "users", "paths": [f"/r{i}"]} for i in range(8)]
    if isinstance(store, SQLiteStore):
        others = [SQLiteStore(store.path) for _ in range(4)]
    else:
        others = [PostgresStore(store.dsn, listen=False) for _ in range(4)]  # type: ignore[attr-defined]
    for other in others:
        await other.open()
    try:
        results = await asyncio.gather(
            *(others[i % 4].write([Put("routes", route)]) for i, route in enumerate(routes))
        )
    finally:
        for other in others:
            await other.close()
    assert sorted(r.version for r in results) == list(range(2, 10))  # every write got its own version
    assert len((await store.load()).by_kind["routes"]) == 8


async def test_nodes_register_and_refresh(store: ConfigStore) -> None:
    await store.heartbeat(NodeInfo("n1", "127.0.0.1:8000", "1.0", 3, "store", None, 100.0))
    await store.heartbeat(NodeInfo("n1", "127.0.0.1:8000", "1.0", 4, "store", None, 100.0))
    await store.heartbeat(NodeInfo("n2", "127.0.0.1:8001", "1.0", 2, "last-known-good", "down", 100.0))
    nodes = await store.nodes()
    assert [(n.node_id, n.config_version, n.source) for n in nodes] == [
        ("n1", 4, "store"),
        ("n2", 2, "last-known-good"),
    ]
    assert all(n.last_seen > 0 for n in nodes)


async def test_diff_lists_entity_by_entity(store: ConfigStore) -> None:
    await store.write([Put("services", SERVICE), Put("routes", ROUTE)])
    doc = {"services": [SERVICE], "routes": [{**ROUTE, "paths": ["/u"]}, {**ROUTE, "name": "new"}]}
    rows = await store.load()
    found = [(d.action, d.kind, d.key, d.fields) for d in diff(rows, doc, prune=False)]
    assert found == [("update", "routes", "users", ("paths",)), ("create", "routes", "new", ())]
    gone = diff(rows, {"services": [SERVICE]}, prune=True)
    assert [(d.action, d.key) for d in gone] == [("delete", "users")]


async def test_postgres_notifies_listeners_at_commit(pg_dsn_fresh: str) -> None:
    writer = PostgresStore(pg_dsn_fresh, listen=False)
    await writer.migrate()
    listener = PostgresStore(pg_dsn_fresh)
    await listener.open()
    try:
        await listener.wait_for_change(0.01)  # the flag open() sets to force a first check
        loop = asyncio.get_running_loop()
        started = loop.time()
        await writer.write([Put("services", SERVICE)])
        await listener.wait_for_change(5.0)
        assert loop.time() - started < 2.0  # woken by NOTIFY, not by the 5 s timeout
        assert await listener.version() == 1
    finally:
        await listener.close()
        await writer.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "tollway.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO tollway_schema VALUES (?, 'from the future', 0)", (LATEST + 1,))
    with pytest.raises(StoreError, match=f"schema is version {LATEST + 1}, newer than this tollway"):
        await SQLiteStore(path).open()


async def test_postgres_needs_migrate_and_refuses_a_newer_schema(pg_dsn_fresh: str) -> None:
    store = PostgresStore(pg_dsn_fresh, listen=False)
    with pytest.raises(StoreError, match="run `tollway db migrate`"):
        await store.open()
    assert await store.migrate() == list(range(1, LATEST + 1))
    assert await store.migrate() == []
    await store.close()
    conn = await asyncpg.connect(pg_dsn_fresh)
    await conn.execute("INSERT INTO tollway_schema VALUES ($1, 'from the future', 0)", LATEST + 1)
    await conn.close()
    with pytest.raises(StoreError, match="newer than this tollway"):
        await store.migrate()
    await store.close()


async def test_postgres_unreachable_is_a_store_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:9/nothing", connect_timeout=1.0)
    with pytest.raises(StoreError, match="cannot reach the postgres store"):
        await store.open()


async def test_the_change_log_is_trimmed_and_says_when_it_no_longer_reaches_back(
    store: ConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tollway.store.base

    monkeypatch.setattr(tollway.store.base, "CHANGE_LOG_KEEP", 3)
    monkeypatch.setattr(tollway.store.base, "TRIM_EVERY", 1)
    await store.write([Put("services", SERVICE)])
    for i in range(5):
        await store.write([Put("routes", {**ROUTE, "paths": [f"/v{i}"]})])
    assert await store.version() == 6
    assert await store.changes_since(1) == (6, None)  # trimmed: the node must load everything
    version, changes = await store.changes_since(4)
    assert version == 6 and changes is not None and [c.key for c in changes] == ["users"]
    assert await store.changes_since(6) == (6, [])


async def test_sqlite_wakes_a_watcher_when_another_process_commits(tmp_path: Path) -> None:
    watcher, writer = SQLiteStore(tmp_path / "tollway.db"), SQLiteStore(tmp_path / "tollway.db")
    await watcher.open()
    await writer.open()
    try:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(watcher.wait_for_change(10.0))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # nothing changed: it keeps waiting
        started = loop.time()
        await writer.write([Put("services", SERVICE)])
        await asyncio.wait_for(waiting, 5.0)
        assert loop.time() - started < 1.0  # seen through data_version, not the 10 s timeout
        started = loop.time()
        waiting = asyncio.ensure_future(watcher.wait_for_change(10.0))
        await watcher.write([Put("routes", ROUTE)])  # a write through the watcher's own object
        await asyncio.wait_for(waiting, 5.0)
        assert loop.time() - started < 1.0
    finally:
        await watcher.close()
        await writer.close()


async def test_deleting_what_is_not_there_is_not_found(store: ConfigStore) -> None:
    with pytest.raises(NotFound):
        await store.write([Delete("routes", "nothing")])
    assert await store.version() == 0


async def test_nodes_not_heard_from_for_a_day_leave_the_view(store: ConfigStore) -> None:
    await store.heartbeat(NodeInfo("gone", "a", "1.0", 1, "store", None, 1.0))
    if isinstance(store, SQLiteStore):
        await store._run(lambda db: db.execute("UPDATE tollway_nodes SET last_seen = 1"))
    else:
        await store._query(lambda conn: conn.execute("UPDATE tollway_nodes SET last_seen = 1"))  # type: ignore[attr-defined]
    await store.heartbeat(NodeInfo("here", "b", "1.0", 1, "store", None, 1.0))
    assert [n.node_id for n in await store.nodes()] == ["here"]


async def test_deleted_and_created_again_in_one_write_is_a_new_entity_at_the_end(store: ConfigStore) -> None:
    other = {"name": "other", "url": "http://127.0.0.1:9002"}
    first = await store.write([Put("services", SERVICE), Put("services", other)])
    old_id = first.changes[0].row.id  # type: ignore[union-attr]
    again = await store.write(
        [Delete("services", "users"), Put("services", {**SERVICE, "url": "http://127.0.0.1:1"})]
    )
    assert [(c.key, c.action) for c in again.changes] == [("users", "update")]
    store._cache = None  # type: ignore[attr-defined]  # read what the database holds, not the cache
    rows = await store.load()
    assert list(rows.by_kind["services"]) == ["other", "users"]
    assert rows.by_kind["services"]["users"].id != old_id
