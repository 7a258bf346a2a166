"""Who may use the admin API: tokens (stored hashed), read-only tokens that can only read, failed
attempts in a metric, and a listener that refuses to start where it would be open to the network."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.admin.support import AdminClient, start_admin_node
from tests.store.nodes import metric, node_config, store_cli
from tests.support import ROOT

pytestmark = pytest.mark.integration


def _token(db: Path, name: str, role: str) -> str:
    done = store_cli("admin", "token", "create", name, "--role", role, "--store", f"sqlite://{db}")
    assert done.returncode == 0, done.stderr
    assert "cannot be shown again" in done.stderr
    return done.stdout.strip()


def test_tokens_roles_metric_and_audit_actor(tmp_path: Path) -> None:
    db = tmp_path / "tollway.db"
    admin_token, reader_token = _token(db, "ci", "admin"), _token(db, "dashboard", "read-only")
    assert admin_token.startswith("tw_") and admin_token != reader_token
    stored = sqlite3.connect(db).execute("SELECT name, role, token_hash FROM tollway_admin_tokens").fetchall()
    assert {(n, r) for n, r, _ in stored} == {("ci", "admin"), ("dashboard", "read-only")}
    assert all(admin_token not in h and reader_token not in h for _, _, h in stored)  # hashed only
    listed = store_cli("admin", "token", "list", "--store", f"sqlite://{db}").stdout
    assert "ci  admin" in listed and admin_token not in listed

    gw, anonymous = start_admin_node(
        tmp_path / "node.yaml", {"backend": "sqlite", "path": "tollway.db"}, auth="token"
    )
    try:
        ci, reader = AdminClient(anonymous.port, admin_token), AdminClient(anonymous.port, reader_token)
        wrong = AdminClient(anonymous.port, "tw_not-a-token")
        assert anonymous.get("/routes").status == 401
        assert anonymous.get("/openapi.json").status == 401
        assert wrong.get("/routes").status == 401
        assert anonymous.call("GET", "/routes", headers={"Authorization": "Basic eDp5"}).status == 401
        created = ci.post("/services", {"name": "api", "url": "http://127.0.0.1:9"})
        assert created.status == 201
        assert reader.get("/services/api").status == 200
        refused = reader.post("/services", {"name": "b", "url": "http://127.0.0.1:9"})
        assert refused.status == 403 and "read-only" in refused.body["message"]
        assert reader.delete("/services/api").status == 403
        assert reader.patch("/services/api", {"path": "/x"}).status == 403
        assert reader.post("/config", {}).status == 403
        assert ci.get("/services/api").body["version"] == created.body["version"]  # nothing changed
        audit = reader.get("/audit").body["data"]
        assert [(e["actor"], e["action"], e["name"]) for e in audit] == [("ci", "create", "api")]
        failures = metric(gw, "tollway_admin_auth_failures_total")
        assert 'reason="missing"} 2.0' in failures and 'reason="invalid"} 2.0' in failures
        assert 'reason="forbidden"} 4.0' in failures
        # a revoked token stops working at once
        store_cli("admin", "token", "delete", "dashboard", "--store", f"sqlite://{db}")
        assert reader.get("/services").status == 401
    finally:
        gw.stop()


def _run(config_path: Path, config: dict[str, object]) -> subprocess.CompletedProcess[str]:
    config_path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "tollway", "run", "-c", str(config_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_listener_refuses_a_network_address_without_auth_and_needs_a_store(tmp_path: Path) -> None:
    store = {"backend": "sqlite", "path": "tollway.db"}
    open_to_all = node_config(store, admin={"enabled": True, "listen": "0.0.0.0:0"})
    done = _run(tmp_path / "a.yaml", open_to_all)
    assert done.returncode == 1
    assert "is not a loopback address: set auth: token" in done.stderr
    checked = subprocess.run(
        [sys.executable, "-m", "tollway", "check", str(tmp_path / "a.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert checked.returncode == 1 and "gateway.admin" in checked.stderr
    no_store = node_config({"backend": "file"}, admin={"enabled": True, "listen": "127.0.0.1:0"})
    done = _run(tmp_path / "b.yaml", no_store)
    assert done.returncode == 1 and "gateway.admin needs a config store" in done.stderr


def test_https_listener(tmp_path: Path) -> None:
    import http.client
    import json
    import ssl

    from tests.tls_support import CA

    ca = CA()
    cert, key = ca.issue(["localhost"]).write(tmp_path, "admin")
    gw, _ = start_admin_node(
        tmp_path / "node.yaml",
        {"backend": "sqlite", "path": "tollway.db"},
        tls={"cert": cert, "key": key},
    )
    try:
        line = gw.wait_for_output(r"admin API on https://", stream="output")
        port = int(line.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=ca.write(tmp_path))
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        conn.request("GET", "/")
        answer = conn.getresponse()
        assert answer.status == 200 and "resources" in json.loads(answer.read())
        conn.close()
    finally:
        gw.stop()
