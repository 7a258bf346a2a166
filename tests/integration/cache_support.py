"""What the proxy-cache integration tests share: a scriptable origin that counts requests, and a
gateway with the cache in front of it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import Backend, Gateway, Seen, gateway_config, response


class Origin:
    """A backend whose answers a test scripts per path: `routes[path] = (status, headers, body)`;
    a `version` counter lets a test see which answer it got. Counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self.delay = 0.0
        self.lock = threading.Lock()

    async def respond(self, seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if self.delay:
            await asyncio.sleep(self.delay)
        path = seen.target
        status, headers, body = self.routes.get(
            path.split("?")[0], (200, [("Cache-Control", "max-age=60")], b"")
        )
        if callable(body):
            status, headers, body = body(seen)
        writer.write(response(status, body, headers))
        return True


def count(backend: Backend, path: str, method: str = "GET") -> int:
    return sum(1 for s in backend.seen if s.target == path and s.method == method)


def cache_config(backend: Backend, tmp_path: Path, **plugin: Any) -> dict[str, Any]:
    config = gateway_config(backend.url)
    settings = {"path": str(tmp_path / "cache"), **plugin}
    config["plugins"] = [{"name": "proxy-cache", "config": settings}]
    return config


def make_origin() -> Origin:
    """The `origin` fixture; a test module declares it as
    ``origin = pytest.fixture(name="origin")(make_origin)`` (and `cached` the same way)."""
    return Origin()


def make_cached(
    backend: Callable[..., Backend], gateway: Callable[..., Gateway], origin: Origin, tmp_path: Path
) -> Callable[..., tuple[Gateway, Backend]]:
    def start(workers: int = 1, **plugin: Any) -> tuple[Gateway, Backend]:
        b = backend(origin.respond)
        gw = gateway(cache_config(b, tmp_path, **plugin), workers=workers)
        return gw, b

    return start
