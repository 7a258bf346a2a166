"""Support for the upstream tests: backend processes that can be killed and restarted, a load
generator that counts failed requests, and a status-listener client. Everything is bounded in time."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKEND_SCRIPT = Path(__file__).with_name("backend_process.py")


class BackendProcess:
    """tests/backend_process.py in its own process; `kill` is a real SIGKILL, `start` again reuses the
    port it had."""

    def __init__(self, name: str, port: int = 0, status: int = 200) -> None:
        self.name = name
        self.port = port
        self.status = status
        self.process: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> BackendProcess:
        cmd = [sys.executable, str(BACKEND_SCRIPT), "--port", str(self.port), "--name", self.name]
        cmd += ["--status", str(self.status)]
        deadline = time.monotonic() + timeout
        while True:
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert self.process.stdout is not None
            line = _readline(self.process.stdout, max(0.1, deadline - time.monotonic()))
            if line.startswith("listening on"):
                self.port = int(line.rsplit(":", 1)[1])
                return self
            self.process.kill()  # the port may linger a moment after a kill: try again
            self.process.wait(5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend {self.name} did not start: {line!r}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)

    def stop(self) -> None:
        self.kill()


def _readline(stream: Any, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    instances: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)


class LoadGenerator:
    """`clients` threads, each on one keep-alive connection, sending GETs until stopped. Any status other
    than the expected one, or any connection error, is a failure (with what went wrong)."""

    def __init__(self, port: int, clients: int = 6, path: str = "/work", expect: int = 200) -> None:
        self.port = port
        self.clients = clients
        self.path = path
        self.expect = expect
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.marks: list[tuple[float, str]] = []

    def start(self) -> LoadGenerator:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return self.result

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
                instance = resp.getheader("X-Instance") or "-"
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.result.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            with self._lock:
                self.result.statuses[status] += 1
                if status == self.expect:
                    self.result.ok += 1
                    self.result.instances[instance] += 1
                else:
                    self.result.failures.append(f"{time.monotonic():.3f} {status} {body[:200]!r}")
        conn.close()

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.result.instances)


def get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


def upstream_status(status_port: int, name: str) -> dict[str, Any]:
    for upstream in get_json(status_port, "/upstreams")["upstreams"]:
        if upstream["name"] == name:
            return upstream
    raise AssertionError(f"no upstream {name!r} in /upstreams")


def target_status(status_port: int, upstream: str, address: str) -> dict[str, Any]:
    for target in upstream_status(status_port, upstream)["targets"]:
        if target["address"] == address:
            return target
    raise AssertionError(f"no target {address} in upstream {upstream!r}")


def timed(predicate: Any, timeout: float, interval: float = 0.02) -> float | None:
    """Seconds until `predicate()` is true, or None if it is not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None
