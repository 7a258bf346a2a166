"""Real gateway processes on a config store: writes reach every worker of every node; a store outage
never stops traffic; a node restarted during the outage boots from its last-known-good file; a
hand-corrupted row is refused and reported while the old config keeps serving."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import yaml

from tests.store.conftest import pg_dsn
from tests.store.nodes import metric, node_config, serves, start_node, status, store_cli, write_entities
from tests.store.relay import Relay
from tests.support import Backend, Gateway, request, wait_until

pytestmark = pytest.mark.integration
PROPAGATION_BOUND = 5.0  # seconds; NOTIFY makes it ~0.1 s, the poll_interval safety net is 1 s


def _migrate(dsn: str) -> None:
    store_cli("db", "migrate", "--store", dsn)


def test_a_route_applied_once_is_served_by_every_worker_of_three_nodes(
    tmp_path: Path, pg_database: str, backend: Callable[..., Backend]
) -> None:
    dsn = pg_dsn(pg_database)
    _migrate(dsn)
    b = backend()
    store = {"backend": "postgres", "dsn": dsn, "poll_interval": 1.0}
    write_entities(tmp_path / "v1.yaml", b.url, {"users": "/users"})
    store_cli("config", "apply", str(tmp_path / "v1.yaml"), "--store", dsn)
    nodes = [start_node(tmp_path / f"node{i}.yaml", node_config(store)) for i in range(3)]
    try:
        for gw in nodes:
            assert request(gw.port, path="/users").status == 200
            assert request(gw.port, path="/orders").status == 404
        # added
        write_entities(tmp_path / "v2.yaml", b.url, {"users": "/users", "orders": "/orders"})
        applied = store_cli("config", "apply", str(tmp_path / "v2.yaml"), "--store", dsn)
        assert "+ route 'orders'" in applied.stdout
        for gw in nodes:
            assert wait_until(lambda gw=gw: serves(gw, "/orders"), PROPAGATION_BOUND), gw.errors[-5:]
        # changed
        write_entities(tmp_path / "v3.yaml", b.url, {"users": "/users", "orders": "/orders-v2"})
        store_cli("config", "apply", str(tmp_path / "v3.yaml"), "--store", dsn)
        for gw in nodes:
            assert wait_until(lambda gw=gw: serves(gw, "/orders-v2"), PROPAGATION_BOUND)
            assert request(gw.port, path="/orders").status == 404
        # removed (--prune), and applying the same file again changes nothing
        write_entities(tmp_path / "v4.yaml", b.url, {"users": "/users"})
        store_cli("config", "apply", str(tmp_path / "v4.yaml"), "--store", dsn, "--prune")
        again = store_cli("config", "apply", str(tmp_path / "v4.yaml"), "--store", dsn, "--prune")
        assert "no changes (store version 4)" in again.stdout
        for gw in nodes:
            assert wait_until(
                lambda gw=gw: request(gw.port, path="/orders-v2").status == 404, PROPAGATION_BOUND
            )
            assert request(gw.port, path="/users").status == 200

        # the cluster view: every node registered at the store's version
        def all_current() -> bool:
            view = status(nodes[0])["store"]
            return len(view["nodes"]) == 3 and all(n["config_version"] == 4 for n in view["nodes"])

        assert wait_until(all_current, 12.0), status(nodes[0])["store"]
        assert "tollway_config_version_applied 4.0" in metric(nodes[1], "tollway_config_version_applied")
    finally:
        for gw in nodes:
            gw.stop()


def test_store_outage_traffic_continues_restart_boots_from_last_known_good_then_catches_up(
    tmp_path: Path, pg_database: str, relay: Relay, backend: Callable[..., Backend]
) -> None:
    direct = pg_dsn(pg_database)
    _migrate(direct)
    b = backend()
    store = {
        "backend": "postgres",
        "dsn": pg_dsn(pg_database, relay.port),
        "poll_interval": 0.5,
        "connect_timeout": 1.0,
    }
    store_cli(
        "config",
        "apply",
        str(write_entities(tmp_path / "v1.yaml", b.url, {"users": "/users"})),
        "--store",
        direct,
    )
    nodes = [start_node(tmp_path / f"node{i}.yaml", node_config(store)) for i in range(2)]
    try:
        relay.cut()  # the store is gone for both nodes
        for gw in nodes:
            assert wait_until(lambda gw=gw: status(gw)["store"]["connected"] is False, 10.0)
        statuses = [request(gw.port, path="/users").status for _ in range(50) for gw in nodes]
        assert statuses == [200] * 100
        # node 1 restarts during the outage: it serves from its last-known-good file and says so
        nodes[1].stop()
        restarted = Gateway(nodes[1].config_path, 2).start()
        nodes[1] = restarted
        assert request(restarted.port, path="/users").status == 200
        assert any("last-known-good" in line for line in restarted.errors)
        assert status(restarted)["store"]["source"] == "last-known-good"
        assert "tollway_config_store_last_known_good 1.0" in metric(restarted, "tollway_config_store_last")
        # a change is written while the nodes cannot see the store; when it returns, both catch up
        store_cli(
            "config",
            "apply",
            str(write_entities(tmp_path / "v2.yaml", b.url, {"users": "/users", "late": "/late"})),
            "--store",
            direct,
        )
        relay.restore()
        for gw in nodes:
            assert wait_until(lambda gw=gw: serves(gw, "/late"), 20.0), gw.errors[-5:]
            assert status(gw)["store"]["source"] == "store"
    finally:
        for gw in nodes:
            gw.stop()


def test_without_store_and_without_last_known_good_a_node_refuses_to_start(tmp_path: Path) -> None:
    config = node_config(
        {"backend": "postgres", "dsn": "postgresql://postgres@127.0.0.1:9/none", "connect_timeout": 1.0}
    )
    gw = Gateway(tmp_path / "node.yaml", 1)
    gw.write_config(config)
    with pytest.raises(RuntimeError) as failed:
        gw.start(timeout=20)
    assert "no last-known-good file" in str(failed.value)


def test_a_hand_corrupted_row_is_refused_and_reported(
    tmp_path: Path, pg_database: str, backend: Callable[..., Backend]
) -> None:
    dsn = pg_dsn(pg_database)
    _migrate(dsn)
    b = backend()
    store_cli(
        "config",
        "apply",
        str(write_entities(tmp_path / "v1.yaml", b.url, {"users": "/users"})),
        "--store",
        dsn,
    )
    gw = start_node(
        tmp_path / "node.yaml", node_config({"backend": "postgres", "dsn": dsn, "poll_interval": 0.5})
    )
    try:

        async def corrupt() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "UPDATE tollway_entities SET data = jsonb_set(data, '{paths}', '[\"no-slash\"]'),"
                        " version = 2 WHERE kind = 'routes' AND key = 'users'"
                    )
                    await conn.execute(
                        "INSERT INTO tollway_changes VALUES (2, 'routes', 'users', 'update', 'psql', 0)"
                    )
                    await conn.execute("UPDATE tollway_meta SET value = 2 WHERE key = 'config_version'")
                    await conn.execute("SELECT pg_notify('tollway_config', '2')")
            finally:
                await conn.close()

        asyncio.run(corrupt())
        assert wait_until(lambda: status(gw)["store"]["last_error"] is not None, 10.0)
        view = status(gw)["store"]
        assert view["applied_version"] == 1 and view["store_version"] == 2
        assert 'routes[0] "users": paths[0]: must start with "/"' in view["last_error"]
        assert request(gw.port, path="/users").status == 200  # the last good config keeps serving
        assert 'kind="invalid"} 1.0' in metric(gw, "tollway_config_store_errors")
        assert any("is invalid; still serving version 1" in line for line in gw.errors)
    finally:
        gw.stop()


def test_sqlite_store_with_two_workers_applies_changes_live(
    tmp_path: Path, backend: Callable[..., Backend]
) -> None:
    b = backend()
    config = node_config({"backend": "sqlite", "path": "tollway.db", "poll_interval": 0.2})
    node_file = tmp_path / "node.yaml"
    gw = start_node(node_file, config)  # an empty store: created at first start, no database server
    try:
        assert request(gw.port, path="/users").status == 404
        applied = store_cli(
            "config",
            "apply",
            str(write_entities(tmp_path / "v1.yaml", b.url, {"users": "/users"})),
            "-c",
            str(node_file),
        )
        assert "store version 1" in applied.stdout
        assert wait_until(lambda: serves(gw, "/users"), PROPAGATION_BOUND)
        assert (tmp_path / "tollway.db").exists() and (tmp_path / "node.yaml.last-good.json").exists()
        exported = store_cli("config", "export", "-c", str(node_file)).stdout
        assert "store version 1" in exported and "/users" in exported
        diffed = store_cli("config", "diff", str(tmp_path / "v1.yaml"), "-c", str(node_file))
        assert diffed.returncode == 0 and "no changes" in diffed.stdout
    finally:
        gw.stop()


def test_a_file_with_entities_is_refused_in_store_mode(tmp_path: Path) -> None:
    config = node_config({"backend": "sqlite"})
    config["services"] = [{"name": "s", "url": "http://127.0.0.1:9"}]
    gw = Gateway(tmp_path / "node.yaml", 1)
    gw.write_config(config)
    with pytest.raises(RuntimeError) as failed:
        gw.start(timeout=20)
    assert "live in the store, not in this file" in str(failed.value)


def test_a_change_in_a_large_config_reaches_every_worker_as_a_delta(
    tmp_path: Path, backend: Callable[..., Backend]
) -> None:
    b = backend()
    node_file = tmp_path / "node.yaml"
    config = node_config({"backend": "sqlite", "path": "tollway.db", "poll_interval": 0.2})
    routes = {f"r{i}": f"/r{i}/" for i in range(300)}  # "/r15" would match "/r150"
    node_file.write_text(yaml.safe_dump(config))
    store_cli(
        "config", "apply", str(write_entities(tmp_path / "v1.yaml", b.url, routes)), "-c", str(node_file)
    )
    gw = start_node(node_file, config)
    try:
        assert request(gw.port, path="/r150/").status == 200
        routes["r150"] = "/moved"
        store_cli(
            "config", "apply", str(write_entities(tmp_path / "v2.yaml", b.url, routes)), "-c", str(node_file)
        )
        assert wait_until(lambda: serves(gw, "/moved"), PROPAGATION_BOUND)
        for _ in range(10):  # fresh connections: both workers answer
            assert request(gw.port, path="/r150/").status == 404
            assert request(gw.port, path="/r299/").status == 200
        assert not any("could not apply" in line for line in gw.errors)
    finally:
        gw.stop()


def test_sighup_in_store_mode_rereads_the_file_and_keeps_the_stores_entities(
    tmp_path: Path, backend: Callable[..., Backend]
) -> None:
    b = backend()
    node_file = tmp_path / "node.yaml"
    config = node_config({"backend": "sqlite", "path": "tollway.db"})
    node_file.write_text(yaml.safe_dump(config))
    store_cli(
        "config",
        "apply",
        str(write_entities(tmp_path / "v1.yaml", b.url, {"users": "/users"})),
        "-c",
        str(node_file),
    )
    gw = start_node(node_file, config)
    try:
        config["gateway"]["server_header"] = "tollway-test"
        node_file.write_text(yaml.safe_dump(config))
        gw.signal(signal.SIGHUP)
        # (the Server header is on answers the gateway makes itself, such as a 404)
        assert wait_until(lambda: request(gw.port, path="/none").header("server") == "tollway-test", 10.0)
        assert request(gw.port, path="/users").status == 200  # the store's route survived the file reload
    finally:
        gw.stop()
