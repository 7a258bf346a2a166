"""Test support: a real gateway process, scriptable backends on 127.0.0.1, raw-socket clients.

Everything binds port 0 on loopback and is bounded in time: a test that hangs fails at its timeout
instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on https?://(\S+?):(\d+)[ ,].*?(?:status http://(\S+?):(\d+))?$")
_LISTENER = re.compile(r"(https?)://(\S+?):(\d+)[ ,]")


# -- the gateway under test -----------------------------------------------------------------------------
class Gateway:
    """`tollway run` in a subprocess, with its config in a file the test can rewrite."""

    def __init__(self, config_path: Path, workers: int, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.workers = workers
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.status_port = 0
        self.listeners: list[tuple[str, int]] = []  # (scheme, port) of each listen address, in order
        self.output: list[str] = []  # stdout lines (banner, access log)
        self.errors: list[str] = []  # stderr lines (diagnostics)
        self._readers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def start(self, timeout: float = 30.0) -> Gateway:
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "tollway", "run", "-c", str(self.config_path)]
        cmd += ["--workers", str(self.workers)]
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        ready = threading.Event()
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.output, ready), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.errors, None), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.output + self.errors))
        return self

    def _read(self, stream: Any, sink: list[str], ready: threading.Event | None) -> None:
        for line in stream:
            line = line.rstrip("\n")
            sink.append(line)
            if ready is not None and not ready.is_set():
                m = _LISTENING.search(line)
                if m:
                    self.port = int(m.group(2))
                    self.status_port = int(m.group(4) or 0)
                    head = line.split(" · status ")[0]
                    self.listeners = [(s, int(p)) for s, _, p in _LISTENER.findall(head + " ")]
                    ready.set()
        if ready is not None:
            ready.set()

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)  # atomic, as an editor or config management would

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]

    def wait_for_output(self, pattern: str, timeout: float = 10.0, stream: str = "errors") -> str:
        lines = self.errors if stream == "errors" else self.output
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(lines):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no {stream} line matched {pattern!r}:\n" + "\n".join(lines[-40:]))

    def access_log(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(line) for line in self.output if line.startswith("{")]

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for reader in self._readers:
            reader.join(2)
        return self.process.returncode


def gateway_config(
    backend_url: str | None = None, routes: list[dict[str, Any]] | None = None, **gateway: Any
) -> dict[str, Any]:
    """A minimal config: every path to one backend, listening on free ports, access log on stdout."""
    settings: dict[str, Any] = {"listen": ["127.0.0.1:0"], "status_listen": "127.0.0.1:0"}
    settings.update(gateway)
    config: dict[str, Any] = {"gateway": settings}
    if backend_url is not None:
        config["services"] = [{"name": "backend", "url": backend_url}]
        config["routes"] = routes or [{"name": "all", "service": "backend", "paths": ["/"]}]
    return config


# -- backends ---------------------------------------------------------------------------------------
@dataclass
class Seen:
    """A request as a backend received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # which backend connection carried it (to check reuse)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


Responder = Callable[["Seen", asyncio.StreamWriter], Awaitable[bool]]


class LoopThread:
    """An asyncio loop in a background thread, for servers the tests talk to from their own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(_cancel_tasks(), timeout=5)  # servers' connection tasks: not left pending at exit
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Backend:
    """A raw HTTP/1.1 backend on 127.0.0.1: parses requests itself (so tests see exactly what the
    gateway sent) and answers through a scriptable `respond` coroutine. Keep-alive by default."""

    respond: Responder | None = None
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections that ended (closed by either side)
    raw: bytearray = field(default_factory=bytearray)  # every byte received, on every connection
    port: int = 0
    tls: Any = None  # an ssl.SSLContext: serve HTTPS (tests/tls_support.py makes certificates)
    _server: asyncio.Server | None = None
    _runner: LoopThread | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"

    def start(self, runner: LoopThread) -> Backend:
        self._runner = runner
        self._server = runner.run(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None and self._runner is not None:
            self._runner.run(self._close())

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        reader = RecordingReader(stream, self.raw)
        try:
            while True:
                request = await read_request(reader, number)
                if request is None:
                    break
                self.seen.append(request)
                keep = await (self.respond or echo)(request, writer)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self.closed += 1


class RecordingReader:
    """A StreamReader that also appends every byte it returns to `sink` (what the backend received)."""

    def __init__(self, reader: asyncio.StreamReader, sink: bytearray) -> None:
        self.reader = reader
        self.sink = sink

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        return await self._recorded(self.reader.readuntil(separator))

    async def readexactly(self, n: int) -> bytes:
        return await self._recorded(self.reader.readexactly(n))

    async def _recorded(self, read: Awaitable[bytes]) -> bytes:
        """What `read` returns, recorded; on a short read, the partial bytes are recorded too."""
        try:
            data = await read
        except asyncio.IncompleteReadError as exc:
            self.sink += exc.partial
            raise
        self.sink += data
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self.reader.read(n)
        self.sink += data
        return data


async def read_request(reader: Any, connection: int = 0) -> Seen | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    seen = Seen(method, target, version, headers, b"", connection)
    length = seen.header("content-length")
    if (seen.header("transfer-encoding") or "").lower() == "chunked":
        seen.body = await read_chunked(reader)
    elif length is not None:
        seen.body = await reader.readexactly(int(length))
    return seen


async def read_chunked(reader: Any) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def response(status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Status'}"]
    hdrs = list(headers or [])
    if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs) and status not in (
        204,
        304,
    ):
        hdrs.append(("Content-Length", str(len(body))))
    lines += [f"{k}: {v}" for k, v in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def echo(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Answer with a JSON description of the request (what the backend saw)."""
    import json

    body = json.dumps(
        {
            "method": seen.method,
            "target": seen.target,
            "headers": seen.headers,
            "body_length": len(seen.body),
            "connection": seen.connection,
        }
    ).encode()
    writer.write(response(200, body, [("Content-Type", "application/json")]))
    return True


# -- clients -------------------------------------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class RawClient:
    """A blocking socket client that sends exact bytes and reads exact responses."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_response(self, head_request: bool = False) -> RawResponse:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a response head; got {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        _, status, *reason = lines[0].split(" ", 2)
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        resp = RawResponse(int(status), reason[0] if reason else "", headers, b"")
        if head_request or resp.status in (204, 304) or resp.status < 200:
            return resp
        if (resp.header("transfer-encoding") or "").lower() == "chunked":
            resp.body = self._read_chunked()
        elif resp.header("content-length") is not None:
            resp.body = self._read_exact(int(resp.header("content-length") or 0))
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed mid-chunk")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self._read_line().split(b";")[0], 16)
            if size == 0:
                while self._read_line():
                    pass
                return body
            body += self._read_exact(size)
            self._read_exact(2)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the gateway closes the connection (after any buffered bytes) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> RawResponse:
    """One request on a fresh connection."""
    client = RawClient(port)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        client.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        return client.read_response(head_request=method == "HEAD")
    finally:
        client.close()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def running(*backends: Backend) -> Iterator[LoopThread]:
    runner = LoopThread()
    try:
        for backend in backends:
            backend.start(runner)
        yield runner
    finally:
        for backend in backends:
            backend.stop()
        runner.close()
