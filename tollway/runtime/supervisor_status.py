"""The status listener: a small HTTP server on its own port, run by the supervisor.

``/live`` answers 200 while the supervisor runs; ``/ready`` answers 200 while every worker serves the
current config and 503 from the moment draining starts, so an external load balancer stops sending
traffic before listeners close. Handlers are plain callables returning (status, JSON-able body) or
(status, bytes, content type); they never touch request traffic.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import httptools
import orjson

from tollway import __version__
from tollway.observability.supervisor_side import resident_bytes
from tollway.proxy.responses import reason

if TYPE_CHECKING:
    from tollway.runtime.supervisor import Supervisor

# A handler returns (status, body) where body is JSON-able, or (status, bytes, content-type).
Handler = Callable[[], "Awaitable[tuple[Any, ...]] | tuple[Any, ...]"]


_answering: set[asyncio.Task[None]] = set()


class StatusProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, GET and HEAD only, one request at a time."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, orjson.dumps({"message": "bad request"}), b"application/json", False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        if self.busy:  # pipelining is not worth supporting here
            keep_alive = False
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._answer(method, url, keep_alive))
        _answering.add(task)  # referenced until done: the loop keeps only weak references
        task.add_done_callback(_answering.discard)

    async def _answer(self, method: bytes, url: bytes, keep_alive: bool) -> None:
        path = url.partition(b"?")[0].decode("latin-1")
        handler = self.routes.get(path)
        if method not in (b"GET", b"HEAD"):
            status, body, ctype = 405, orjson.dumps({"message": "method not allowed"}), b"application/json"
        elif handler is None:
            status, body, ctype = 404, orjson.dumps({"message": "not found"}), b"application/json"
        else:
            status, body, ctype = await _call(handler)
        self._write(status, b"" if method == b"HEAD" else body, ctype, keep_alive, len(body))
        self.busy = False

    def _write(
        self, status: int, body: bytes, ctype: bytes, keep_alive: bool, length: int | None = None
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n" % (
            status,
            reason(status),
            ctype,
            len(body) if length is None else length,
        )
        self.transport.write(head + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n") + body)
        if not keep_alive:
            self.transport.close()


async def _call(handler: Handler) -> tuple[int, bytes, bytes]:
    try:
        result = handler()
        if isinstance(result, Awaitable):
            result = await result
    except Exception as exc:  # a status page must answer even when something behind it fails
        return 500, orjson.dumps({"message": f"status handler failed: {exc}"}), b"application/json"
    if len(result) == 3:
        return result[0], result[1], result[2]
    return result[0], orjson.dumps(result[1], option=orjson.OPT_INDENT_2), b"application/json"


async def start_status_server(host: str, port: int, routes: dict[str, Handler]) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: StatusProtocol(routes), host, port, reuse_address=True)


def status_document(sup: Supervisor) -> dict[str, Any]:
    """The /status document, from the supervisor's state and the workers' last collected numbers
    (so every request to /status sees the same view, whichever worker serves traffic)."""
    workers = []
    connections = 0
    for h in sorted(sup.workers.values(), key=lambda h: h.slot):
        view = sup.metrics.worker_view(h.process.pid) or {}
        alive = h.channel is not None
        conns = int(view.get("connections", 0)) if alive else 0
        connections += conns
        workers.append(
            {
                "slot": h.slot,
                "pid": h.process.pid,
                "alive": alive,
                "config_version": h.ready_version,
                "uptime_seconds": round(time.monotonic() - h.started, 3),
                "restarts": h.restarts,
                "connections": conns,
                "requests": _requests_in(view),
                "resident_memory_bytes": resident_bytes(h.process.pid) if alive else 0,
            }
        )
    doc: dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - sup.started, 3),
        "draining": sup.draining,
        "ready": sup.ready(),
        "config": {
            "version": sup.version,
            "path": str(sup.config_path) if sup.config_path else None,
            "last_reload": sup.last_reload,
        },
        "connections": {"active": connections},
        "workers": workers,
        "upstreams": sup.upstreams.summary(),
    }
    for name, section in sup.status_sections.items():
        try:
            doc[name] = section()
        except Exception as exc:  # one broken section must not take /status down
            doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return doc


def _requests_in(view: dict[str, Any]) -> int:
    """Requests a worker answered, from its collected numbers."""
    return sum(sum(route[0].values()) for route in view.get("routes", {}).values())
