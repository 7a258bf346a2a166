"""`tollway config …` and `tollway db …` in-process (typer's runner), on real SQLite files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tollway.cli import _embedded_store_config, app
from tollway.store.migrations import LATEST
from tollway.store.model import Put

runner = CliRunner()
ENTITIES = {
    "services": [{"name": "users", "url": "http://127.0.0.1:9001"}],
    "routes": [{"name": "users", "service": "users", "paths": ["/users"]}],
}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_without_a_config_file_the_commands_use_the_embedded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    applied = runner.invoke(app, ["config", "apply", str(_write(tmp_path / "e.yaml", ENTITIES))])
    assert applied.exit_code == 0, applied.output
    assert "store version 1: 2 change(s) applied" in applied.output
    assert (tmp_path / "tollway.db").exists()
    exported = runner.invoke(app, ["config", "export"])
    assert yaml.safe_load(exported.output) == ENTITIES
    assert _embedded_store_config().gateway.store.backend == "sqlite"  # what `tollway run` alone serves


def test_apply_refuses_a_dangling_reference_whole_and_diff_shows_entities(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'tollway.db'}"
    runner.invoke(app, ["config", "apply", str(_write(tmp_path / "e.yaml", ENTITIES)), "--store", store])
    orphan = {"routes": [{"name": "orders", "service": "orders", "paths": ["/orders"]}]}
    refused = runner.invoke(
        app, ["config", "apply", str(_write(tmp_path / "o.yaml", orphan)), "--store", store]
    )
    assert refused.exit_code == 1
    assert "nothing was changed" in refused.output and "unknown service 'orders'" in refused.output
    partial = {"routes": [{"name": "more", "service": "users", "paths": ["/more"]}]}  # the store has users
    added = runner.invoke(
        app, ["config", "apply", str(_write(tmp_path / "p.yaml", partial)), "--store", store]
    )
    assert added.exit_code == 0 and "+ route 'more'" in added.output
    changed = {**ENTITIES, "routes": [{"name": "users", "service": "users", "paths": ["/v2/users"]}]}
    diffed = runner.invoke(
        app, ["config", "diff", str(_write(tmp_path / "c.yaml", changed)), "--store", store]
    )
    assert diffed.exit_code == 2 and "~ route 'users' (paths)" in diffed.output
    pruned = runner.invoke(
        app,
        [
            "config",
            "diff",
            str(_write(tmp_path / "s.yaml", {"services": ENTITIES["services"]})),
            "--store",
            store,
            "--prune",
        ],
    )
    assert "- route 'users'" in pruned.output


def test_a_file_with_errors_is_reported_with_line_numbers_before_the_store_is_touched(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  - name: x\n    service: s\n    paths: [nope]\n")
    result = runner.invoke(app, ["config", "apply", str(bad), "--store", f"sqlite://{tmp_path / 't.db'}"])
    assert result.exit_code == 1
    assert f'{bad}:4: routes[0] "x": paths[0]: must start with' in result.output
    assert not (tmp_path / "t.db").exists()


def test_db_migrate_on_sqlite_reports_the_schema(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'tollway.db'}"
    first = runner.invoke(app, ["db", "migrate", "--store", store])
    assert first.exit_code == 0 and f"schema is at {LATEST}" in first.output
    again = runner.invoke(app, ["db", "migrate", "--store", store])
    assert f"schema is up to date (version {LATEST})" in again.output


def test_nodes_lists_the_cluster_view(tmp_path: Path) -> None:
    import asyncio

    from tollway.store.base import NodeInfo
    from tollway.store.sqlite import SQLiteStore

    async def register() -> None:
        store = SQLiteStore(tmp_path / "tollway.db")
        await store.open()
        await store.write([Put("services", ENTITIES["services"][0])])
        await store.heartbeat(NodeInfo("gw-1", "10.0.0.1:8000", "1.2.3", 0, "last-known-good", "down", 1.0))
        await store.close()

    asyncio.run(register())
    listed = runner.invoke(app, ["config", "nodes", "--store", f"sqlite://{tmp_path / 'tollway.db'}"])
    assert listed.exit_code == 0, listed.output
    assert "store version 1; 1 node(s)" in listed.output
    assert "gw-1  v0 (last-known-good)  tollway 1.2.3" in listed.output and "BEHIND by 1" in listed.output
