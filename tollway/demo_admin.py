"""The demo's config store and admin API: its entities go into a SQLite store at start, and after the
scripted traffic a route is added live through the admin API (docs/admin-api.md)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from tollway.store.model import KINDS, ops_from_document

STORE_FILE = "demo-store.db"
DOCS = "docs/admin-api.md"
# The route the demo adds live: /hello served by the user service's /health, on the same service.
LIVE_ROUTE = {
    "name": "hello",
    "service": "users",
    "paths": ["/hello"],
    "methods": ["GET"],
    "rewrite": "/health",
}


def split_for_store(config: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(node file, entities): the entities move to a SQLite store in `workdir`; the node file keeps the
    gateway settings (and certificates) and turns the admin API on, loopback only, on a free port."""
    entities = {kind: config.pop(kind) for kind in KINDS if kind in config}
    config["gateway"]["store"] = {"backend": "sqlite", "path": str(workdir / STORE_FILE)}
    config["gateway"]["admin"] = {"enabled": True, "listen": "127.0.0.1:0"}  # auth: none on loopback
    return config, entities


def seed_store(entities: dict[str, Any], workdir: Path) -> Path:
    """Write the entities into the store, as `tollway config apply entities.yaml` does; the file is kept
    in `workdir` to show what was applied."""
    from tollway.config.store_settings import StoreSettings
    from tollway.store.factory import make_store

    path = workdir / "entities.yaml"
    path.write_text(yaml.safe_dump(entities, sort_keys=False))
    store = make_store(StoreSettings(backend="sqlite", path=str(workdir / STORE_FILE)), workdir, listen=False)

    async def write() -> None:
        await store.open()
        try:
            await store.write(ops_from_document(entities), author="tollway demo")
        finally:
            await store.close()

    asyncio.run(write())
    return path


def admin_call(
    admin_port: int, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else None


def add_route_live(console: Console, admin_port: int, gateway_port: int) -> None:
    """POST /routes, then GET /hello through the gateway until every worker serves it."""
    base = f"http://127.0.0.1:{gateway_port}"
    before = _get_status(gateway_port, "/hello")[0]
    status, answer = admin_call(admin_port, "POST", "/routes", LIVE_ROUTE)
    if status != 201:
        raise OSError(f"POST /routes answered {status}: {answer}")
    start = time.monotonic()
    served, instance = _get_status(gateway_port, "/hello")
    while served != 200 and time.monotonic() - start < 10:
        time.sleep(0.05)
        served, instance = _get_status(gateway_port, "/hello")
    elapsed = (time.monotonic() - start) * 1000
    console.print(
        f"\n[bold]Admin API[/bold] on http://127.0.0.1:{admin_port} (loopback only, no token): the routes "
        f"live in a SQLite store, so a route can be added while the gateway runs."
    )
    console.print(
        f"  GET {base}/hello before: {before} · POST /routes {{hello: /hello → users /health}}: {status} "
        f"(version {answer.get('version')}) · GET /hello after: {served} from {instance} "
        f"(served {elapsed:.0f} ms after the write)",
        markup=False,
    )


def _get_status(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    return resp.status, resp.getheader("X-Instance", "gateway")


def print_admin_curls(console: Console, admin_port: int, gateway_port: int) -> None:
    admin = f"http://127.0.0.1:{admin_port}"
    json_header = "-H 'Content-Type: application/json'"
    lines = [
        f"curl -s {admin}/routes                      # list the routes (JSON)",
        f"curl -s -X POST {admin}/routes {json_header} "
        '-d \'{"name": "hi", "service": "users", "paths": ["/hi"], "rewrite": "/health"}\'',
        f"curl -i http://127.0.0.1:{gateway_port}/hi             # served at once by every worker",
        f"curl -s -X DELETE {admin}/routes/hi          # and gone again (404)",
    ]
    console.print("Change it yourself through the admin API (bodies need Content-Type: application/json):")
    for line in lines:
        console.print(f"  {line}", markup=False)
    console.print(f"  the whole walk-through: {DOCS} · the API's own page: {admin}/docs", markup=False)
