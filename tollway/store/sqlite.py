"""The embedded store: one SQLite file in WAL mode, no server.

sqlite3 is synchronous, so every call runs in a thread (`asyncio.to_thread`) behind one lock; the store
is read when it changes, never per request. Other processes (`tollway config apply`) write the same
file; a node notices through `PRAGMA data_version` (checked every 0.1 s, a read of shared memory) and a
version poll as the safety net. Writes take the database
lock up front (BEGIN IMMEDIATE) so two writers never interleave between reading and bumping the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from tollway.store import migrations
from tollway.store.base import (
    AUDIT_COLUMNS,
    NODE_FORGET_AFTER,
    AdminToken,
    AuditContext,
    AuditEntry,
    AuditQuery,
    ConfigStore,
    NodeInfo,
    WriteResult,
    audit_filters,
    audit_rows,
    trim_floor,
)
from tollway.store.model import Change, Op, Row, Rows, StoreError, plan_write

T = TypeVar("T")
_BUSY_TIMEOUT_MS = 5000
_WATCH_INTERVAL = 0.1  # seconds between data_version checks: a change written elsewhere shows this fast


class SQLiteStore(ConfigStore):
    backend = "sqlite"

    def __init__(self, path: str | Path, auto_migrate: bool = True) -> None:
        self.path = Path(path)
        self.auto_migrate = auto_migrate  # the embedded default creates its schema itself
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._cache: Rows | None = None  # the rows at the last version read: a write need not reload them
        self._written = asyncio.Event()  # set by a write through this object (an admin API in the node)

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} open={self._db is not None}>"

    # -- plumbing --------------------------------------------------------------------------------------
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._locked, fn)

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._db is None:
                raise StoreError(f"the store {self.path} is not open")
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    async def open(self) -> None:
        await self._connect()
        if self.auto_migrate:
            await self.migrate()
        migrations.check_current(await self._run(_schema_version))

    async def _connect(self) -> None:
        def connect() -> None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, safe on crash
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"cannot open the sqlite store {self.path}: {exc}") from exc
            self._db = db

        if self._db is None:
            await asyncio.to_thread(connect)

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def migrate(self) -> list[int]:
        await self._connect()

        def run(db: sqlite3.Connection) -> list[int]:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(migrations.SCHEMA_TABLE)
                done = []
                for number, description in migrations.pending(_schema_version(db)):
                    for statement in migrations.statements(number, "sqlite"):
                        db.execute(statement)
                    db.execute(
                        "INSERT INTO tollway_schema (version, description, applied_at) VALUES (?, ?, ?)",
                        (number, description, time.time()),
                    )
                    done.append(number)
                db.execute("COMMIT")
                return done
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(run)

    # -- reads -------------------------------------------------------------------------------------------
    async def version(self) -> int:
        return await self._run(_config_version)

    async def load(self) -> Rows:
        return await self._run(self._load)

    def _load(self, db: sqlite3.Connection) -> Rows:
        db.execute("BEGIN")  # one snapshot for the version and the rows
        try:
            version = _config_version(db)
            if self._cache is not None and self._cache.version == version:
                return self._cache
            rows = Rows.from_rows(version, _rows(db.execute(f"SELECT {_COLUMNS} FROM tollway_entities")))
        finally:
            db.execute("COMMIT")
        self._cache = rows
        return rows

    async def changes_since(self, version: int) -> tuple[int, list[Change] | None]:
        def read(db: sqlite3.Connection) -> tuple[int, list[Change] | None]:
            db.execute("BEGIN")
            try:
                current = _config_version(db)
                if current == version:
                    return current, []
                if version < _log_floor(db):
                    return current, None
                touched = db.execute(
                    "SELECT DISTINCT kind, key FROM tollway_changes WHERE version > ?", (version,)
                ).fetchall()
                changes = []
                for kind, key in touched:
                    found = _rows(
                        db.execute(
                            f"SELECT {_COLUMNS} FROM tollway_entities WHERE kind = ? AND key = ?", (kind, key)
                        )
                    )
                    row = found[0] if found else None
                    changes.append(Change(kind, key, "delete" if row is None else "update", row))
                return current, changes
            finally:
                db.execute("COMMIT")

        return await self._run(read)

    # -- writes ------------------------------------------------------------------------------------------
    async def write(
        self, ops: Sequence[Op], author: str | None = None, audit: AuditContext | None = None
    ) -> WriteResult:
        def run(db: sqlite3.Connection) -> WriteResult:
            db.execute("BEGIN IMMEDIATE")
            try:
                current = self._current_rows(db)
                new_version = current.version + 1
                result, changes = plan_write(current, ops, new_version)
                if not changes:
                    db.execute("COMMIT")
                    return WriteResult(current.version, [])
                _store_changes(db, changes, new_version, author)
                if audit is not None:
                    _store_audit(db, audit_rows(current, changes, new_version, audit))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._cache = result
            return WriteResult(new_version, changes)

        result = await self._run(run)
        if result.changes:
            self._written.set()
        return result

    def _current_rows(self, db: sqlite3.Connection) -> Rows:
        version = _config_version(db)
        if self._cache is not None and self._cache.version == version:
            return self._cache
        return Rows.from_rows(version, _rows(db.execute(f"SELECT {_COLUMNS} FROM tollway_entities")))

    async def wait_for_change(self, timeout: float) -> None:
        """SQLite has no notifications: watch `PRAGMA data_version`, which changes when another
        connection commits (a check reads shared memory, not the file: microseconds), every
        _WATCH_INTERVAL; a write through this object wakes the caller at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        start = await self._run(_data_version)
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._written.wait(), min(left, _WATCH_INTERVAL))
            if self._written.is_set():
                self._written.clear()
                return
            if await self._run(_data_version) != start:
                return

    # -- cluster view ------------------------------------------------------------------------------------
    async def heartbeat(self, node: NodeInfo) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO tollway_nodes (node_id, address, software_version, config_version, source,"
                " error, started_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET"
                " address = excluded.address, software_version = excluded.software_version,"
                " config_version = excluded.config_version, source = excluded.source, error = excluded.error,"
                " started_at = excluded.started_at, last_seen = excluded.last_seen",
                (*_node_values(node), time.time()),
            )
            db.execute("DELETE FROM tollway_nodes WHERE last_seen < ?", (time.time() - NODE_FORGET_AFTER,))

        await self._run(run)

    async def nodes(self) -> list[NodeInfo]:
        def run(db: sqlite3.Connection) -> list[NodeInfo]:
            cursor = db.execute(f"SELECT {_NODE_COLUMNS} FROM tollway_nodes ORDER BY node_id")
            return [NodeInfo(*row) for row in cursor.fetchall()]

        return await self._run(run)

    # -- admin API: tokens and audit log ------------------------------------------------------------------
    async def put_admin_token(self, token: AdminToken) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO tollway_admin_tokens (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET role = excluded.role, token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (token.name, token.role, token.token_hash, token.created_at),
            )
        )

    async def delete_admin_token(self, name: str) -> bool:
        cursor = await self._run(
            lambda db: db.execute("DELETE FROM tollway_admin_tokens WHERE name = ?", (name,))
        )
        return bool(cursor.rowcount)

    async def admin_tokens(self) -> list[AdminToken]:
        def run(db: sqlite3.Connection) -> list[AdminToken]:
            cursor = db.execute(
                "SELECT name, role, token_hash, created_at FROM tollway_admin_tokens ORDER BY name"
            )
            return [AdminToken(*row) for row in cursor.fetchall()]

        return await self._run(run)

    async def audit_log(self, query: AuditQuery) -> list[AuditEntry]:
        where, args = audit_filters(query, numbered=False)
        sql = f"SELECT {AUDIT_COLUMNS} FROM tollway_audit{where} ORDER BY seq DESC LIMIT {int(query.limit)}"

        def run(db: sqlite3.Connection) -> list[AuditEntry]:
            return [_audit_entry(row) for row in db.execute(sql, args).fetchall()]

        return await self._run(run)

    async def trim_audit(self, older_than: float) -> int:
        cursor = await self._run(
            lambda db: db.execute("DELETE FROM tollway_audit WHERE at < ?", (older_than,))
        )
        return int(cursor.rowcount)


def _audit_entry(row: tuple[Any, ...]) -> AuditEntry:
    seq, version, at, actor, address, request_id, action, kind, key, entity_id, before, after = row
    return AuditEntry(
        seq,
        version,
        at,
        actor,
        address,
        request_id,
        action,
        kind,
        key,
        entity_id,
        orjson.loads(before) if before is not None else None,
        orjson.loads(after) if after is not None else None,
    )


def _store_audit(db: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    db.executemany(
        "INSERT INTO tollway_audit (version, at, actor, address, request_id, action, kind, key, entity_id,"
        " before, after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*row[:9], *(orjson.dumps(v).decode() if v is not None else None for v in row[9:])) for row in rows],
    )


_COLUMNS = "kind, key, data, id, version, position"
_NODE_COLUMNS = "node_id, address, software_version, config_version, source, error, started_at, last_seen"


def _rows(cursor: Iterable[tuple[str, str, str, str, int, int]]) -> list[Row]:
    return [
        Row(kind, key, orjson.loads(data), id_, version, pos) for kind, key, data, id_, version, pos in cursor
    ]


def _node_values(node: NodeInfo) -> tuple[object, ...]:
    return (
        node.node_id,
        node.address,
        node.software_version,
        node.config_version,
        node.source,
        node.error,
        node.started_at,
    )


def _data_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA data_version").fetchone()[0])


def _schema_version(db: sqlite3.Connection) -> int:
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tollway_schema'"
    ).fetchone()
    if not exists:
        return 0
    return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM tollway_schema").fetchone()[0])


def _config_version(db: sqlite3.Connection) -> int:
    found = db.execute("SELECT value FROM tollway_meta WHERE key = 'config_version'").fetchone()
    if found is None:
        raise StoreError("the store has no schema: run `tollway db migrate`")
    return int(found[0])


def _store_changes(db: sqlite3.Connection, changes: list[Change], version: int, author: str | None) -> None:
    now = time.time()
    for change in changes:
        if change.row is None:
            db.execute("DELETE FROM tollway_entities WHERE kind = ? AND key = ?", (change.kind, change.key))
        else:
            row = change.row
            db.execute(
                "INSERT INTO tollway_entities (kind, key, id, version, position, data, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET"
                " id = excluded.id, version = excluded.version, position = excluded.position,"
                " data = excluded.data, updated_at = excluded.updated_at",
                (row.kind, row.key, row.id, row.version, row.position, orjson.dumps(row.data).decode(), now),
            )
        db.execute(
            "INSERT INTO tollway_changes (version, kind, key, action, author, at) VALUES (?, ?, ?, ?, ?, ?)",
            (version, change.kind, change.key, change.action, author, now),
        )
    db.execute("UPDATE tollway_meta SET value = ? WHERE key = 'config_version'", (version,))
    floor = trim_floor(version)
    if floor is not None:
        db.execute("DELETE FROM tollway_changes WHERE version <= ?", (floor,))
        db.execute(
            "INSERT INTO tollway_meta (key, value) VALUES ('log_floor', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (floor,),
        )


def _log_floor(db: sqlite3.Connection) -> int:
    found = db.execute("SELECT value FROM tollway_meta WHERE key = 'log_floor'").fetchone()
    return int(found[0]) if found else 0
