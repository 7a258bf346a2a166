"""The admin API on a PostgreSQL store: writes through one node's API reach a second node (the
cluster), the audit log and tokens live in PostgreSQL, and /cluster lists both nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.admin.support import AdminClient, start_admin_node
from tests.store.conftest import pg_dsn
from tests.store.nodes import node_config, start_node, store_cli
from tests.support import Backend, request, wait_until

pytestmark = pytest.mark.integration
SERVED = 5.0


async def _audit_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch("SELECT actor, action, kind, key, before::text, after::text FROM tollway_audit")
        )
    finally:
        await conn.close()


def test_admin_api_on_postgres_serves_every_node(
    tmp_path: Path, pg_database: str, backend: Callable[..., Backend]
) -> None:
    dsn = pg_dsn(pg_database)
    store_cli("db", "migrate", "--store", dsn)
    token = store_cli("admin", "token", "create", "ci", "--store", dsn).stdout.strip()
    store = {"backend": "postgres", "dsn": dsn}
    b = backend()
    gw1, anonymous = start_admin_node(tmp_path / "n1.yaml", store, auth="token")
    gw2 = start_node(tmp_path / "n2.yaml", node_config({**store, "poll_interval": 0.2}), workers=1)
    try:
        admin = AdminClient(anonymous.port, token)
        assert anonymous.get("/services").status == 401
        assert admin.post("/services", {"name": "api", "url": b.url}).status == 201
        route = admin.post("/routes", {"name": "users", "service": "api", "paths": ["/users"]})
        assert route.status == 201
        for gw in (gw1, gw2):
            assert wait_until(lambda gw=gw: request(gw.port, path="/users").status == 200, SERVED)
        patched = admin.patch(
            "/routes/users", {"paths": ["/people"]}, headers={"If-Match": route.header("etag")}
        )
        assert patched.status == 200
        stale = admin.patch("/routes/users", {"paths": ["/x"]}, headers={"If-Match": route.header("etag")})
        assert stale.status == 412
        for gw in (gw1, gw2):
            assert wait_until(lambda gw=gw: request(gw.port, path="/people").status == 200, SERVED)
            assert request(gw.port, path="/users").status == 404
        assert admin.delete("/services/api").status == 409
        assert (
            admin.post(
                "/consumers", {"username": "ann", "credentials": {"key-auth": [{"key": "pg-secret"}]}}
            ).status
            == 201
        )
        cluster = admin.get("/cluster").body
        assert len(cluster["nodes"]) == 2
        assert wait_until(lambda: all(not n["behind"] for n in admin.get("/cluster").body["nodes"]), SERVED)
        rows = asyncio.run(_audit_rows(dsn))
        assert [(r["actor"], r["action"], r["key"]) for r in rows] == [
            ("ci", "create", "api"),
            ("ci", "create", "users"),
            ("ci", "update", "users"),
            ("ci", "create", "ann"),
        ]
        assert "pg-secret" not in str([tuple(r) for r in rows])
        assert admin.get("/audit?actor=ci&kind=route").body["data"][0]["after"]["paths"] == ["/people"]
    finally:
        gw2.stop()
        gw1.stop()
