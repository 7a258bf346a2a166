"""What the admin API keeps in the store, on both backends: tokens (hashed), audit rows written in the
write's own transaction (none for a refused write), filters, paging and retention."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.store.conftest import pg_dsn_fresh  # noqa: F401 (fixture)
from tollway.admin.tokens import create_token, hash_token, identify
from tollway.store.base import AuditContext, AuditQuery, ConfigStore
from tollway.store.model import Delete, Put, WriteRefused
from tollway.store.postgres import PostgresStore
from tollway.store.sqlite import SQLiteStore

SERVICE = {"name": "users", "url": "http://127.0.0.1:9001"}
CONSUMER = {"username": "ann", "credentials": {"key-auth": [{"key": "the-secret"}]}}


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConfigStore]:
    if request.param == "sqlite":
        s: ConfigStore = SQLiteStore(tmp_path / "tollway.db")
    else:
        s = PostgresStore(request.getfixturevalue("pg_dsn_fresh"), listen=False)
        await s.migrate()
    await s.open()
    yield s
    await s.close()


async def test_tokens_are_stored_hashed_and_identified(store: ConfigStore) -> None:
    token = await create_token(store, "ci", "admin")
    reader = await create_token(store, "dash", "read-only")
    stored = {t.name: t for t in await store.admin_tokens()}
    assert stored["ci"].token_hash == hash_token(token) and token not in str(stored)
    assert (await identify(store, f"Bearer {reader}")).name == "dash"  # type: ignore[union-attr]
    assert await identify(store, "Bearer tw_wrong") is None
    assert await identify(store, token) is None  # no scheme
    again = await create_token(store, "ci", "read-only")  # the same name: replaced
    assert await identify(store, f"Bearer {token}") is None
    assert (await identify(store, f"bearer {again}")).role == "read-only"  # type: ignore[union-attr]
    assert await store.delete_admin_token("ci") and not await store.delete_admin_token("ci")
    with pytest.raises(ValueError):
        await create_token(store, "x", "root")


async def test_audit_rows_share_the_writes_transaction(store: ConfigStore) -> None:
    ctx = AuditContext("ci", "127.0.0.1", "req-1")
    await store.write([Put("services", SERVICE), Put("consumers", CONSUMER)], audit=ctx)
    with pytest.raises(WriteRefused):  # refused whole: no audit row either
        await store.write([Put("routes", {"name": "r", "service": "nope", "paths": ["/r"]})], audit=ctx)
    await store.write([Put("services", SERVICE)], audit=ctx)  # no change: no row
    await store.write([Delete("consumers", "ann")], audit=AuditContext("ops"))
    entries = await store.audit_log(AuditQuery())
    assert [(e.actor, e.action, e.kind, e.key, e.version) for e in entries] == [
        ("ops", "delete", "consumers", "ann", 2),
        ("ci", "create", "consumers", "ann", 1),
        ("ci", "create", "services", "users", 1),
    ]
    created = entries[1]
    assert created.after == {"username": "ann", "credentials": {"key-auth": [{"key": "<redacted>"}]}}
    assert created.before is None and created.address == "127.0.0.1" and created.request_id == "req-1"
    assert entries[0].before == created.after and entries[0].after is None
    assert [e.key for e in await store.audit_log(AuditQuery(kind="services"))] == ["users"]
    assert [e.action for e in await store.audit_log(AuditQuery(actor="ops"))] == ["delete"]
    page = await store.audit_log(AuditQuery(limit=1))
    older = await store.audit_log(AuditQuery(before_seq=page[0].seq, limit=5))
    assert [e.seq for e in older] == [entries[1].seq, entries[2].seq]
    assert await store.audit_log(AuditQuery(since=time.time() + 60)) == []
    assert await store.trim_audit(time.time() + 1) == 3
    assert await store.audit_log(AuditQuery()) == []
