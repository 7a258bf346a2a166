"""The cluster store: PostgreSQL through asyncpg.

Two connections per node: one for queries, one dedicated to LISTEN (a listener on a shared connection
misses notifications while a query runs; asyncpg#283). A write bumps the version and sends
`NOTIFY tollway_config, '<version>'` in its transaction, so nodes hear of it at commit. Notifications
sent while a node is disconnected are lost, which is why the node also polls the version: on reconnect
and every `poll_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
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

CHANNEL = "tollway_config"
_COLUMNS = "kind, key, data::text, id, version, position"
_NODE_COLUMNS = "node_id, address, software_version, config_version, source, error, started_at, last_seen"
# The current version, the change log's floor, and every entity changed after $1 (NULL data: deleted).
_CHANGES_SINCE = """
WITH touched AS (SELECT DISTINCT kind, key FROM tollway_changes WHERE version > $1)
SELECT
    (SELECT value FROM tollway_meta WHERE key = 'config_version') AS current,
    COALESCE((SELECT value FROM tollway_meta WHERE key = 'log_floor'), 0) AS floor,
    t.kind, t.key, e.data::text AS data, e.id, e.version, e.position
FROM (SELECT 1) AS one
LEFT JOIN touched t ON true
LEFT JOIN tollway_entities e ON e.kind = t.kind AND e.key = t.key
"""
_MIGRATION_LOCK = 0x7011_3A7  # pg_advisory_xact_lock key: one `db migrate` at a time


class PostgresStore(ConfigStore):
    backend = "postgres"

    def __init__(self, dsn: str, connect_timeout: float = 5.0, listen: bool = True) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.listen = listen  # nodes listen; the CLI does not need to
        self._conn: asyncpg.Connection | None = None
        self._listener: asyncpg.Connection | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()  # one query at a time on the connection
        self._cache: Rows | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore open={self._conn is not None} listening={self._listener is not None}>"

    async def _connect(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.dsn, timeout=self.connect_timeout, statement_cache_size=0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot reach the postgres store: {_describe(exc)}") from exc

    async def open(self, check_schema: bool = True) -> None:
        await self.close()
        self._conn = await self._connect()
        if check_schema:
            migrations.check_current(await self._schema_version())
        if self.listen:
            self._listener = await self._connect()
            await self._listener.add_listener(CHANNEL, self._on_notify)
        self._changed.set()  # whatever happened while disconnected: the caller re-reads the version

    async def close(self) -> None:
        for conn in (self._listener, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        self._conn = self._listener = None

    def _on_notify(self, *_: Any) -> None:
        self._changed.set()

    async def _query(self, fn: Any) -> Any:
        """Run `fn(conn)`; a lost connection becomes a StoreError (the node reconnects)."""
        async with self._lock:
            if self._conn is None or self._conn.is_closed():
                raise StoreError("not connected to the postgres store")
            try:
                return await fn(self._conn)
            except (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
                raise StoreError(f"postgres store: {_describe(exc)}") from exc
            except asyncpg.PostgresError as exc:  # a table dropped, a permission revoked: unusable too
                raise StoreError(f"postgres store: {_describe(exc)}") from exc

    async def _schema_version(self) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            if await conn.fetchval("SELECT to_regclass('tollway_schema')") is None:
                return 0
            return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM tollway_schema"))

        return int(await self._query(run))

    async def migrate(self) -> list[int]:
        if self._conn is None:
            await self.open(check_schema=False)

        async def run(conn: asyncpg.Connection) -> list[int]:
            done = []
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(migrations.SCHEMA_TABLE)
                current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM tollway_schema"))
                for number, description in migrations.pending(current):
                    for statement in migrations.statements(number, "postgres"):
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO tollway_schema (version, description, applied_at) VALUES ($1, $2, $3)",
                        number,
                        description,
                        time.time(),
                    )
                    done.append(number)
            return done

        return list(await self._query(run))

    # -- reads -------------------------------------------------------------------------------------------
    async def version(self) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT value FROM tollway_meta WHERE key = 'config_version'"))

        return int(await self._query(run))

    async def load(self) -> Rows:
        async def run(conn: asyncpg.Connection) -> Rows:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await self._read_all(conn)

        rows: Rows = await self._query(run)
        self._cache = rows
        return rows

    async def _read_all(self, conn: asyncpg.Connection) -> Rows:
        version = int(await conn.fetchval("SELECT value FROM tollway_meta WHERE key = 'config_version'"))
        if self._cache is not None and self._cache.version == version:
            return self._cache
        return Rows.from_rows(version, _rows(await conn.fetch(f"SELECT {_COLUMNS} FROM tollway_entities")))

    async def changes_since(self, version: int) -> tuple[int, list[Change] | None]:
        async def run(conn: asyncpg.Connection) -> list[Any]:
            return list(await conn.fetch(_CHANGES_SINCE, version))

        # One statement, one snapshot, one round trip: this runs on every notification of every node.
        records = await self._query(run)
        current, floor = int(records[0]["current"]), int(records[0]["floor"])
        if current == version:
            return current, []
        if version < floor:
            return current, None
        changes = []
        for r in records:
            if r["kind"] is None:
                continue
            row = (
                None
                if r["id"] is None
                else Row(r["kind"], r["key"], orjson.loads(r["data"]), r["id"], r["version"], r["position"])
            )
            changes.append(Change(r["kind"], r["key"], "delete" if row is None else "update", row))
        return current, changes

    # -- writes ------------------------------------------------------------------------------------------
    async def write(
        self, ops: Sequence[Op], author: str | None = None, audit: AuditContext | None = None
    ) -> WriteResult:
        async def run(conn: asyncpg.Connection) -> tuple[WriteResult, Rows | None]:
            async with conn.transaction():
                # The row lock on the version serialises writers: read, validate, bump, as one.
                await conn.execute("SELECT value FROM tollway_meta WHERE key = 'config_version' FOR UPDATE")
                current = await self._read_all(conn)
                new_version = current.version + 1
                result, changes = plan_write(current, ops, new_version)
                if not changes:
                    return WriteResult(current.version, []), None
                await _store_changes(conn, changes, new_version, author)
                if audit is not None:
                    await _store_audit(conn, audit_rows(current, changes, new_version, audit))
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(new_version))
            return WriteResult(new_version, changes), result

        written, rows = await self._query(run)
        if rows is not None:
            self._cache = rows
        return written  # type: ignore[no-any-return]

    async def wait_for_change(self, timeout: float) -> None:
        if not self.listen:
            await asyncio.sleep(timeout)
            return
        if self._listener is None or self._listener.is_closed():
            raise StoreError("the postgres notification connection was lost")  # the node reconnects
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    def listener_alive(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    # -- cluster view ------------------------------------------------------------------------------------
    async def heartbeat(self, node: NodeInfo) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO tollway_nodes (node_id, address, software_version, config_version, source,"
                " error, started_at, last_seen)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, extract(epoch from now()))"
                " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,"
                " software_version = excluded.software_version, config_version = excluded.config_version,"
                " source = excluded.source, error = excluded.error, started_at = excluded.started_at,"
                " last_seen = excluded.last_seen",
                node.node_id,
                node.address,
                node.software_version,
                node.config_version,
                node.source,
                node.error,
                node.started_at,
            )
            await conn.execute(
                "DELETE FROM tollway_nodes WHERE last_seen < extract(epoch from now()) - $1",
                NODE_FORGET_AFTER,
            )

        await self._query(run)

    async def nodes(self) -> list[NodeInfo]:
        async def run(conn: asyncpg.Connection) -> list[NodeInfo]:
            records = await conn.fetch(f"SELECT {_NODE_COLUMNS} FROM tollway_nodes ORDER BY node_id")
            return [NodeInfo(*record) for record in records]

        result: list[NodeInfo] = await self._query(run)
        return result

    # -- admin API: tokens and audit log ------------------------------------------------------------------
    async def put_admin_token(self, token: AdminToken) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO tollway_admin_tokens (name, role, token_hash, created_at)"
                " VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (name) DO UPDATE SET role = excluded.role, token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                token.name,
                token.role,
                token.token_hash,
                token.created_at,
            )

        await self._query(run)

    async def delete_admin_token(self, name: str) -> bool:
        async def run(conn: asyncpg.Connection) -> str:
            return str(await conn.execute("DELETE FROM tollway_admin_tokens WHERE name = $1", name))

        return bool((await self._query(run)) != "DELETE 0")

    async def admin_tokens(self) -> list[AdminToken]:
        async def run(conn: asyncpg.Connection) -> list[AdminToken]:
            records = await conn.fetch(
                "SELECT name, role, token_hash, created_at FROM tollway_admin_tokens ORDER BY name"
            )
            return [AdminToken(*record) for record in records]

        result: list[AdminToken] = await self._query(run)
        return result

    async def audit_log(self, query: AuditQuery) -> list[AuditEntry]:
        where, args = audit_filters(query, numbered=True)
        columns = AUDIT_COLUMNS.replace("before", "before::text").replace("after", "after::text")
        sql = f"SELECT {columns} FROM tollway_audit{where} ORDER BY seq DESC LIMIT {int(query.limit)}"

        async def run(conn: asyncpg.Connection) -> list[AuditEntry]:
            records = await conn.fetch(sql, *args)
            return [
                AuditEntry(
                    *tuple(record)[:10],
                    *(orjson.loads(v) if v is not None else None for v in tuple(record)[10:]),
                )
                for record in records
            ]

        result: list[AuditEntry] = await self._query(run)
        return result

    async def trim_audit(self, older_than: float) -> int:
        async def run(conn: asyncpg.Connection) -> str:
            return str(await conn.execute("DELETE FROM tollway_audit WHERE at < $1", older_than))

        return int((await self._query(run)).rsplit(" ", 1)[-1])


async def _store_audit(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    await conn.executemany(
        "INSERT INTO tollway_audit (version, at, actor, address, request_id, action, kind, key, entity_id,"
        " before, after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11::jsonb)",
        [(*row[:9], *(orjson.dumps(v).decode() if v is not None else None for v in row[9:])) for row in rows],
    )


def _rows(records: Iterable[Any]) -> list[Row]:
    return [
        Row(r["kind"], r["key"], orjson.loads(r["data"]), r["id"], r["version"], r["position"])
        for r in records
    ]


async def _store_changes(
    conn: asyncpg.Connection, changes: list[Change], version: int, author: str | None
) -> None:
    deletes = [(c.kind, c.key) for c in changes if c.row is None]
    upserts = [
        (r.kind, r.key, r.id, r.version, r.position, orjson.dumps(r.data).decode())
        for c in changes
        if (r := c.row) is not None
    ]
    if deletes:
        await conn.executemany("DELETE FROM tollway_entities WHERE kind = $1 AND key = $2", deletes)
    if upserts:
        await conn.executemany(
            "INSERT INTO tollway_entities (kind, key, id, version, position, data, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, extract(epoch from now()))"
            " ON CONFLICT (kind, key) DO UPDATE SET id = excluded.id, version = excluded.version,"
            " position = excluded.position, data = excluded.data, updated_at = excluded.updated_at",
            upserts,
        )
    await conn.executemany(
        "INSERT INTO tollway_changes (version, kind, key, action, author, at)"
        " VALUES ($1, $2, $3, $4, $5, extract(epoch from now()))",
        [(version, c.kind, c.key, c.action, author) for c in changes],
    )
    await conn.execute("UPDATE tollway_meta SET value = $1 WHERE key = 'config_version'", version)
    floor = trim_floor(version)
    if floor is not None:
        await conn.execute("DELETE FROM tollway_changes WHERE version <= $1", floor)
        await conn.execute(
            "INSERT INTO tollway_meta (key, value) VALUES ('log_floor', $1)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            floor,
        )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
