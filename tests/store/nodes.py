"""Gateway nodes on a config store, for the cluster tests and the propagation benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT, Gateway, request
from tests.upstream_support import get_json


def node_config(store: dict[str, Any], **gateway: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"listen": ["127.0.0.1:0"], "status_listen": "127.0.0.1:0", "store": store}
    settings.update(gateway)
    return {"gateway": settings}


def start_node(path: Path, config: dict[str, Any], workers: int = 2) -> Gateway:
    gw = Gateway(path, workers)
    gw.write_config(config)
    return gw.start()


def store_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`tollway config …` / `tollway db …` in a subprocess, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "tollway", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    if check and done.returncode not in (0, 2):
        raise AssertionError(
            f"tollway {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def write_entities(path: Path, backend_url: str, routes: dict[str, str]) -> Path:
    """A declarative file: one service, and one route per name → path."""
    doc = {
        "services": [{"name": "backend", "url": backend_url}],
        "routes": [{"name": name, "service": "backend", "paths": [p]} for name, p in routes.items()],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def status(gw: Gateway) -> dict[str, Any]:
    result: dict[str, Any] = get_json(gw.status_port, "/status")
    return result


def serves(gw: Gateway, path: str) -> bool:
    """Every worker has applied the node's latest config, and the path answers from the backend."""
    doc = status(gw)
    if any(w["config_version"] != doc["config"]["version"] for w in doc["workers"]):
        return False
    return request(gw.port, path=path).status == 200


def metric(gw: Gateway, name: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gw.status_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))
