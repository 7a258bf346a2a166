"""Traffic-correctness stress: reload storms, a killed worker, pipelining after a rejection, bytes after
`Connection: close` — against a real gateway and a backend that records what it runs.

    python bench/stress.py [--seconds 10] [--connections 32] [--workers 2]

Everything listens on 127.0.0.1 and every phase is bounded in time and count. Load comes from `wrk`
when it is installed (`apt-get install wrk`), else from Python threads. It prints, per phase:

- reloads: 20 SIGHUPs under load, half after in-place edits (truncate, then write in two pieces, some
  signalled mid-write) and half after atomic replaces (write + rename): the non-2xx answers seen by
  the load (bar: 0) and how many reloads were applied or refused;
- worker restart: `kill -9` of a worker under load; the longest a new connection waited for its answer
  from the kill on (bar: <= 100 ms), and the requests that failed (those the killed process held);
- pipelined: requests pipelined after a rejected one (`GET /%zz`, a bad Host), and whole requests
  after a `Connection: close` one: how many the backend ran although the client was refused (bar: 0);
- trailing bytes: a stray byte after `Connection: close` or an HTTP/1.0 request: answers that were not
  the backend's 200 (bar: 0).

A loaded machine inflates the latency figures: note what else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

BACKEND = r"""
import asyncio, json, sys
from collections import Counter
seen = Counter()
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, rest = head.partition(b"\r\n")
            method, target, _ = line.decode("latin-1").split(" ", 2)
            length = 0
            for field in rest.split(b"\r\n"):
                name, _, value = field.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"transfer-encoding":
                    while True:  # chunked: read to the last chunk
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        await reader.readexactly(size + 2) if size else await reader.readuntil(b"\r\n")
                        if not size:
                            break
            if length:
                await reader.readexactly(length)
            if target == "/__stats":
                body = json.dumps(seen).encode()
            else:
                seen[target.split("?")[0].rstrip("0123456789")] += 1
                body = b"ok"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if b"connection: close" in rest.lower():
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
try:
    import uvloop
    uvloop.install()
except ImportError:
    pass
asyncio.run(main())
"""


# -- processes --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_backend() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def config(backend_port: int, port: int, status_port: int, variant: int) -> dict[str, Any]:
    routes = [{"name": "stable", "service": "backend", "paths": ["/"]}]
    routes += [
        {"name": f"extra{i}", "service": "backend", "paths": [f"/extra{i}"]} for i in range(variant % 3)
    ]
    return {
        "gateway": {
            "listen": [f"{HOST}:{port}"],
            "status_listen": f"{HOST}:{status_port}",
            "watch_interval": "250ms",
            "access_log": {"enabled": False},
        },
        "services": [{"name": "backend", "url": f"http://{HOST}:{backend_port}"}],
        "routes": routes,
    }


class Gateway:
    def __init__(self, workdir: Path, backend_port: int, workers: int) -> None:
        self.path = workdir / "gateway.yaml"
        self.backend_port = backend_port
        self.port, self.status_port = free_port(), free_port()
        self.log = open(workdir / "gateway.log", "w")  # noqa: SIM115 - closed in stop()
        self.write_atomic(0)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tollway", "run", "-c", str(self.path), "--workers", str(workers)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(self.status_port, "/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("the gateway did not become ready")

    def text(self, variant: int) -> str:
        return yaml.safe_dump(
            config(self.backend_port, self.port, self.status_port, variant), sort_keys=False
        )

    def write_atomic(self, variant: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.text(variant))
        tmp.replace(self.path)

    def write_in_place(self, variant: int, signal_mid_write: bool) -> None:
        text = self.text(variant)
        cut = text.index("routes:")  # the first piece is a valid config without routes
        with open(self.path, "w") as f:
            f.write(text[:cut])
            f.flush()
            if signal_mid_write:
                self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.03)
            f.write(text[cut:])

    def status(self) -> dict[str, Any]:
        return json.loads(get(self.status_port, "/status")[1])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


# -- clients ----------------------------------------------------------------------------------------------
def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of one GET on a new connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: stress\r\nConnection: close\r\n\r\n".encode()
    status, received = exchange(port, request, timeout)
    return status, received.partition(b"\r\n\r\n")[2]


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send `data` on a new connection, read until the peer closes; (first status, everything)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    return (int(m.group(1)) if m else 0), received


class Load:
    """Keep-alive load: wrk if installed, else Python threads; reports answers by status class."""

    def __init__(self, port: int, seconds: float, connections: int) -> None:
        self.port, self.seconds, self.connections = port, seconds, connections
        self.wrk = shutil.which("wrk")
        self.result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run)

    def start(self) -> Load:
        self._thread.start()
        return self

    def join(self) -> dict[str, Any]:
        self._thread.join(self.seconds + 60)
        return self.result

    def _run(self) -> None:
        if self.wrk:
            out = subprocess.run(
                [
                    self.wrk,
                    "-t2",
                    f"-c{self.connections}",
                    f"-d{self.seconds:g}s",
                    f"http://{HOST}:{self.port}/load",
                ],
                capture_output=True,
                text=True,
                timeout=self.seconds + 60,
            ).stdout
            total = re.search(r"(\d+) requests in", out)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            errors = re.search(r"Socket errors: (.*)", out)
            self.result = {
                "tool": "wrk",
                "requests": int(total.group(1)) if total else 0,
                "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                "socket_errors": errors.group(1) if errors else "none",
            }
            return
        counts: Counter[str] = Counter()
        stop = time.monotonic() + self.seconds
        lock = threading.Lock()

        def client() -> None:
            sock: socket.socket | None = None
            while time.monotonic() < stop:
                try:
                    if sock is None:
                        sock = socket.create_connection((HOST, self.port), timeout=5)
                    sock.sendall(b"GET /load HTTP/1.1\r\nHost: stress\r\n\r\n")
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = sock.recv(4096)
                        if not chunk:
                            raise ConnectionError("closed")
                        head += chunk
                    status = head[9:12].decode()
                    with lock:
                        counts["2xx" if status.startswith("2") else "non_2xx"] += 1
                except OSError:
                    with lock:
                        counts["errors"] += 1
                    if sock is not None:
                        sock.close()
                    sock = None
            if sock is not None:
                sock.close()

        threads = [threading.Thread(target=client) for _ in range(min(self.connections, 8))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.result = {"tool": "python", "requests": counts["2xx"] + counts["non_2xx"], **counts}


# -- phases -----------------------------------------------------------------------------------------------
def phase_reloads(gw: Gateway, seconds: float, connections: int) -> dict[str, Any]:
    before = gw.status()["config"]["version"]
    load = Load(gw.port, seconds, connections).start()
    time.sleep(0.5)
    interval = max(0.1, (seconds - 1.5) / 20)
    for i in range(20):
        if i % 2:
            gw.write_in_place(i + 1, signal_mid_write=i % 4 == 1)
        else:
            gw.write_atomic(i + 1)
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(interval)
    result = load.join()
    time.sleep(1.0)
    after = gw.status()["config"]
    return {
        "load": result,
        "sighups": 20,
        "config_versions_applied": after["version"] - before,
        "last_reload": after["last_reload"]["result"],
    }


def phase_worker_kill(gw: Gateway, seconds: float, connections: int) -> dict[str, Any]:
    workers = {w["slot"]: w["pid"] for w in gw.status()["workers"] if w["alive"]}
    if len(workers) < 2:
        return {"skipped": "needs at least 2 workers"}
    load = Load(gw.port, seconds, connections).start()
    samples: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def probe() -> None:  # a new connection per request: what a client arriving during the restart sees
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _ = get(gw.port, "/probe")
                outcome = "ok" if status == 200 else f"status {status}"
            except OSError as exc:
                outcome = type(exc).__name__
            samples.append((started, time.monotonic() - started, outcome))

    probes = [threading.Thread(target=probe) for _ in range(4)]
    for t in probes:
        t.start()
    time.sleep(min(2.0, seconds / 3))
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    restarted = None
    while time.monotonic() - killed < 30:
        alive = {w["slot"]: w["pid"] for w in gw.status()["workers"] if w["alive"] and w["config_version"]}
        if alive.get(0) not in (None, victim):
            restarted = time.monotonic()
            break
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    for t in probes:
        t.join(15)
    result = load.join()
    after = [(latency, outcome) for start, latency, outcome in samples if start >= killed]
    ok = [latency for latency, outcome in after if outcome == "ok"]
    return {
        "load": result,
        "restart_seconds": round(restarted - killed, 3) if restarted else None,
        "new_connections_after_kill": len(after),
        "failed_after_kill": Counter(o for _, o in after if o != "ok"),
        "max_wait_ms_after_kill": round(max(ok) * 1000, 1) if ok else None,
        "p99_wait_ms_after_kill": round(sorted(ok)[int(len(ok) * 0.99)] * 1000, 1) if ok else None,
    }


def phase_pipelined(gw: Gateway, backend_port: int, tries: int) -> dict[str, Any]:
    rejected_first = [
        b"GET /%zz HTTP/1.1\r\nHost: stress\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: bad host\r\n\r\n",
        b"GET ftp://stress/x HTTP/1.1\r\nHost: stress\r\n\r\n",
    ]
    refused_status: Counter[int] = Counter()
    for i in range(tries):
        bad = rejected_first[i % len(rejected_first)]
        after = b"POST /after%d HTTP/1.1\r\nHost: stress\r\nContent-Length: 2\r\n\r\nhi" % i
        status, _ = exchange(gw.port, bad + after)
        refused_status[status] += 1
    for i in range(tries):  # whole requests pipelined after one that closes the connection
        last = b"GET /closing%d HTTP/1.1\r\nHost: stress\r\nConnection: close\r\n\r\n" % i
        exchange(
            gw.port, last + b"POST /afterclose%d HTTP/1.1\r\nHost: stress\r\nContent-Length: 0\r\n\r\n" % i
        )
    time.sleep(0.5)
    seen = json.loads(get(backend_port, "/__stats")[1])
    return {
        "tries": tries * 2,
        "client_answers_to_rejected": dict(refused_status),
        "backend_ran_refused_requests": seen.get("/after", 0) + seen.get("/afterclose", 0),
    }


def phase_trailing(gw: Gateway, tries: int) -> dict[str, Any]:
    answers: Counter[str] = Counter()
    for i in range(tries):
        if i % 2:
            data = b"GET /run%d HTTP/1.0\r\nHost: stress\r\n\r\nX" % i
        else:
            data = (
                b"POST /run%d HTTP/1.1\r\nHost: stress\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhiX"
                % i
            )
        status, received = exchange(gw.port, data)
        answers["backend 200" if status == 200 and received.endswith(b"ok") else f"other {status}"] += 1
    return {
        "tries": tries,
        "answers": dict(answers),
        "not_the_backends_answer": tries - answers["backend 200"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per phase (max 60)")
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections of the load (max 256)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tries", type=int, default=200, help="pipelined / trailing-byte cases (max 5000)")
    args = parser.parse_args()
    seconds, connections, tries = min(args.seconds, 60.0), min(args.connections, 256), min(args.tries, 5000)
    backend, backend_port = start_backend()
    workdir = Path(tempfile.mkdtemp(prefix="tollway-stress-"))
    gw = Gateway(workdir, backend_port, args.workers)
    report: dict[str, Any] = {}
    try:
        report["reloads"] = phase_reloads(gw, seconds, connections)
        report["worker_restart"] = phase_worker_kill(gw, seconds, connections)
        report["pipelined"] = phase_pipelined(gw, backend_port, tries)
        report["trailing_bytes"] = phase_trailing(gw, tries)
    finally:
        gw.stop()
        backend.terminate()
        backend.wait(10)
    refused = [line for line in (workdir / "gateway.log").read_text().splitlines() if "not applied" in line]
    report["reloads"]["refused_reload_reasons"] = Counter(
        "empty" if "empty" in line else "no routes" if "no routes" in line else "other" for line in refused
    )
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str))
    print()
    print("summary")
    print(f"  non-2xx during reloads:                  {report['reloads']['load'].get('non_2xx', 0)}")
    print(f"  refused requests run by the backend:     {report['pipelined']['backend_ran_refused_requests']}")
    print(f"  trailing byte: not the backend's answer: {report['trailing_bytes']['not_the_backends_answer']}")
    restart = report["worker_restart"]
    print(f"  max connection wait after worker kill:   {restart.get('max_wait_ms_after_kill')} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
