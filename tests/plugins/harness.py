"""An in-process gateway for plugin handler tests: the real worker, client connection, exchange and
pipeline, driven through in-memory transports — no sockets, no processes.

    gw = Harness({"routes": [...], "plugins": [...], "consumers": [...]})
    result = gw.request("GET", "/x", {"apikey": "k"})        # the backend answers 200 "{}" by default
    result.status, result.header("x-request-id"), result.json(), result.upstream  # what the backend saw

The backend is scripted per request (`backend=(status, headers, body)`). Async hooks (a JWKS fetch, a
password check in a thread) run on the harness's event loop; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tests.memory_transport import MemoryTransport
from tollway.config.loader import validate
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.proxy.server import ClientConnection
from tollway.runtime.worker import Worker
from tollway.upstream.connection import UpstreamConnection
from tollway.upstream.pool import PoolSettings

BACKEND_URL = "http://127.0.0.1:9"


@dataclass
class Message:
    """A parsed HTTP message: a response to the client, or the request the backend received."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.start.split(" ")[1])

    @property
    def target(self) -> str:
        return self.start.split(" ")[1]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Result:
    response: Message
    upstream: Message | None  # None: the request never reached the backend
    raw: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> str | None:
        return self.response.header(name)

    def json(self) -> Any:
        return self.response.json()


def parse_message(data: bytes) -> tuple[Message, bytes]:
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    msg = Message(lines[0], headers, b"")
    length = msg.header("content-length")
    if (msg.header("transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                rest = rest.partition(b"\r\n")[2]
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        msg.body = body
    elif length is not None:
        msg.body, rest = rest[: int(length)], rest[int(length) :]
    return msg, rest


class Harness:
    def __init__(self, config: dict[str, Any], peer: str = "127.0.0.1") -> None:
        config = dict(config)
        config.setdefault("gateway", {})
        config["gateway"] = {"access_log": {"enabled": False}, **config["gateway"]}
        config.setdefault("services", [{"name": "backend", "url": BACKEND_URL}])
        config.setdefault("routes", [{"name": "all", "service": "backend", "paths": ["/"]}])
        self.config = validate(config, plugins=PLUGIN_CHECK)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.worker = Worker(self.loop, 0, None, [])  # type: ignore[arg-type]
        self.worker.pool_settings = PoolSettings(max_requests=0)
        self.worker.apply_config(1, self.config)
        self.peer = peer
        self.logged: list[tuple[str, BaseException]] = []
        original = self.worker.log_exception

        def log_exception(message: str, error: BaseException, ex: Any) -> None:
            self.logged.append((message, error))
            original(message, error, ex)

        self.worker.log_exception = log_exception  # type: ignore[method-assign]

    def close(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def _upstream(self) -> tuple[UpstreamConnection, MemoryTransport]:
        target = next(iter(self.worker.snapshot.services.values())).cluster.targets[0]
        pool = target.pool
        pool.close()
        conn = UpstreamConnection(pool)
        transport = MemoryTransport(("127.0.0.1", 9))
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool.active += 1
        pool.release(conn)
        return conn, transport

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        backend: tuple[int, list[tuple[str, str]], bytes] | None = None,
        peer: str | None = None,
        raw: bytes | None = None,
        timeout: float = 10.0,
    ) -> Result:
        upstream, up_transport = self._upstream()
        client = ClientConnection(self.worker)
        transport = MemoryTransport((peer or self.peer, 50000))
        client.connection_made(transport)  # type: ignore[arg-type]
        if raw is None:
            items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
            lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
            lines += [f"{k}: {v}" for k, v in items]
            if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in items):
                lines.append(f"Content-Length: {len(body)}")
            raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")
        self.loop.call_soon(client.data_received, raw)  # as the event loop would: inside it
        seen = self._run_until(lambda: b"\r\n\r\n" in up_transport.data or client.active is None, timeout)
        upstream_msg = None
        if b"\r\n\r\n" in up_transport.data and client.active is not None:
            # the whole request (head and body) reached the backend: answer it
            self._run_until(lambda: _complete_request(up_transport.data), timeout)
            upstream_msg, _ = parse_message(bytes(up_transport.data))
            status, rheaders, rbody = backend or (200, [("Content-Type", "application/json")], b"{}")
            head = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in rheaders]
            if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in rheaders):
                head.append(f"Content-Length: {len(rbody)}")
            data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + rbody
            self.loop.call_soon(upstream.data_received, data)
            self._run_until(lambda: client.active is None, timeout)
        assert seen, "the request neither reached the backend nor got an answer in time"
        response, _ = parse_message(bytes(transport.data))
        return Result(response, upstream_msg, bytes(transport.data))

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        """Run the gateway's loop (background tasks too) until `predicate()` holds, at most `timeout`."""
        return self._run_until(predicate, timeout)

    def _run_until(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self.loop.run_until_complete(asyncio.sleep(0))
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.loop.run_until_complete(asyncio.sleep(0.001))
        return True


def _complete_request(data: bytearray) -> bool:
    head, sep, rest = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
        if name.strip().lower() == b"transfer-encoding":
            return rest.endswith(b"0\r\n\r\n")
    return True
