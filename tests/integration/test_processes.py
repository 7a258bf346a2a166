"""Processes: workers sharing the port (SO_REUSEPORT), a supervisor that restarts a crashed worker
without refusing queued connections, SIGTERM draining (/ready 503, in-flight requests finish, listeners
close, exit 0), startup refusing a bad file, and workers that exit with their supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support import ROOT, RawClient, Seen, gateway_config, request, wait_until

pytestmark = pytest.mark.integration


def status(gw) -> dict:
    return request(gw.status_port, path="/status").json()


def alive_workers(gw) -> dict[int, int]:
    """slot -> pid of the workers the supervisor reports alive."""
    return {w["slot"]: w["pid"] for w in status(gw)["workers"] if w["alive"]}


class Gate:
    """Load threads hold it shared for each request; the test takes it exclusively to act between
    requests (so no request is in flight on a worker that is killed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    def enter(self) -> None:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            assert self._cond.wait_for(lambda: self._active == 0, 10)

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()


def test_two_workers_share_the_port(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url), workers=2)
    workers = alive_workers(gw)
    assert sorted(workers) == [0, 1]
    assert sorted(workers.values()) == sorted(gw.worker_pids())
    for i in range(20):
        assert request(gw.port, path=f"/{i}").status == 200
    assert request(gw.status_port, path="/ready").status == 200


def test_killed_worker_is_restarted_and_no_new_connection_fails(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url), workers=2)
    before = alive_workers(gw)
    gate = Gate()
    stop = threading.Event()
    results: list[tuple[float, str]] = []  # (start time, "ok" or the failure)

    def load() -> None:
        while not stop.is_set():
            gate.enter()
            started = time.monotonic()
            try:
                resp = request(gw.port, path="/load")  # a new connection every time
                results.append((started, "ok" if resp.status == 200 else f"status {resp.status}"))
            except OSError as exc:
                results.append((started, repr(exc)))
            finally:
                gate.leave()

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(results) > 20)
    gate.close()  # between requests
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    gate.open()
    # While the worker is down, connections hashed to its socket wait in the backlog.
    assert wait_until(lambda: (w := alive_workers(gw)).get(0) not in (None, victim) and len(w) == 2, 30)
    restarted_at = time.monotonic()
    assert wait_until(lambda: sum(1 for t, _ in results if t > restarted_at) > 20, 30)
    stop.set()
    for t in threads:
        t.join(15)
    failures = [r for _, r in results if r != "ok"]
    assert failures == []
    during = [r for t, r in results if killed_at < t < restarted_at]
    assert during, "no request was made while the worker was down"
    assert alive_workers(gw)[1] == before[1]  # the other worker was left alone
    gw.wait_for_output(rf"worker 0 \(pid {victim}\) exited")


def slow_backend(backend, seconds: float):
    async def slow(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.target == "/slow":
            await asyncio.sleep(seconds)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        return True

    return backend(slow)


def test_sigterm_drains(gateway, backend) -> None:
    be = slow_backend(backend, 2.0)
    gw = gateway(gateway_config(be.url, drain_timeout="20s"), workers=2)
    idle = RawClient(gw.port)  # an idle keep-alive connection: closed by the drain
    idle.send(b"GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert idle.read_response().status == 200
    busy = RawClient(gw.port, timeout=20)
    busy.send(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert wait_until(lambda: any(s.target == "/slow" for s in be.seen))
    gw.signal(signal.SIGTERM)
    # /ready turns 503 at once; /live stays 200.
    assert wait_until(lambda: request(gw.status_port, path="/ready").status == 503, 5)
    assert request(gw.status_port, path="/live").status == 200
    assert request(gw.status_port, path="/ready").json()["status"] == "draining"

    # Listeners close: new connections are refused.
    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    assert wait_until(refused, 10)
    assert idle.closed_by_peer()
    # The in-flight request completes, then its connection closes.
    resp = busy.read_response()
    assert resp.status == 200 and resp.body == b"done"
    assert resp.header("connection") == "close"
    assert busy.closed_by_peer()
    idle.close()
    busy.close()
    assert gw.process is not None
    assert gw.process.wait(30) == 0
    gw.wait_for_output(r"draining", stream="output")


def test_drain_delay_keeps_serving_while_ready_is_503(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, drain_delay="2s"))
    gw.signal(signal.SIGTERM)
    assert wait_until(lambda: request(gw.status_port, path="/ready").status == 503, 5)
    assert request(gw.port).status == 200  # still accepting during the delay
    assert gw.process is not None and gw.process.wait(30) == 0


def test_drain_timeout_cuts_what_is_left_and_exits_0(gateway, backend) -> None:
    be = slow_backend(backend, 30.0)
    gw = gateway(gateway_config(be.url, drain_timeout="1s"))
    busy = RawClient(gw.port, timeout=20)
    busy.send(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert wait_until(lambda: len(be.seen) == 1)
    gw.signal(signal.SIGTERM)
    assert gw.process is not None and gw.process.wait(30) == 0
    with pytest.raises(ConnectionError):
        busy.read_response()
    busy.close()


def test_workers_exit_with_their_supervisor(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url), workers=2)
    pids = gw.worker_pids()
    assert len(pids) == 2
    assert gw.process is not None
    gw.process.kill()
    gw.process.wait(10)

    def gone() -> bool:
        return not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in pids)

    assert wait_until(gone, 30), "workers outlived their supervisor"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_startup_refuses_a_bad_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "gateway:\n  listen: ['127.0.0.1:0']\n  status_listen: null\n"
        "services:\n  - {name: api, url: 'http://127.0.0.1:1'}\n"
        "routes:\n  - name: users\n    service: api\n    paths: ['users']\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tollway", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert f'{path}:9: routes[0] "users": paths[0]: must start with "/"' in proc.stderr


def test_status_listener(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url), workers=2)
    assert request(gw.status_port, path="/live").json() == {"status": "live"}
    ready = request(gw.status_port, path="/ready")
    assert ready.status == 200 and ready.header("cache-control") == "no-store"
    body = request(gw.status_port, path="/status").json()
    assert body["draining"] is False and body["config"]["version"] == 1
    assert [w["alive"] for w in body["workers"]] == [True, True]
    head = request(gw.status_port, "HEAD", "/ready")
    assert head.status == 200 and head.body == b""
    assert request(gw.status_port, path="/nope").status == 404
    assert request(gw.status_port, "POST", "/ready", body=b"").status == 405
    client = RawClient(gw.status_port)
    client.send(b"GET /live HTTP/1.1\r\nHost: s\r\n\r\nGET /ready HTTP/1.1\r\nHost: s\r\n\r\n")
    assert client.read_response().status == 200
    assert client.read_response().header("connection") == "close"  # no pipelining here: answered, closed
    client.close()
    client = RawClient(gw.status_port)
    client.send(b"BAD REQUEST\r\n\r\n")
    assert client.read_response().status == 400
    assert client.closed_by_peer()
    client.close()
