"""Gateway nodes with the admin API on, and a small JSON client for it."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.store.nodes import node_config, start_node
from tests.support import Gateway


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw) if self.raw else None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class AdminClient:
    def __init__(self, port: int, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.port = port
        self.token = token
        self.host = host

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        try:
            sent = dict(headers or {})
            if self.token is not None:
                sent.setdefault("Authorization", f"Bearer {self.token}")
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            if data is not None:
                sent.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Answer:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.call("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.call("PUT", path, body, **kw)

    def patch(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.call("PATCH", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Answer:
        return self.call("DELETE", path, **kw)


def admin_port(gw: Gateway) -> int:
    line = gw.wait_for_output(r"admin API on https?://", stream="output")
    found = re.search(r":(\d+)\s*$", line)
    assert found, line
    return int(found.group(1))


def start_admin_node(
    path: Path, store: dict[str, Any], workers: int = 1, **admin: Any
) -> tuple[Gateway, AdminClient]:
    settings = {"enabled": True, "listen": "127.0.0.1:0", **admin}
    gw = start_node(path, node_config({**store, "poll_interval": 0.2}, admin=settings), workers)
    return gw, AdminClient(admin_port(gw))
