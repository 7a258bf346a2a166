"""A worker killed under load: connections the kernel hashes to its socket while its replacement starts
are served by the live workers (the supervisor passes them on), so none waits for the new process.
Before, they queued until the replacement had started and applied its config (0.9-4 s).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.support import gateway_config, request, wait_until

pytestmark = pytest.mark.integration


def alive_workers(gw) -> dict[int, int]:
    doc = request(gw.status_port, path="/status").json()
    return {w["slot"]: w["pid"] for w in doc["workers"] if w["alive"] and w["config_version"]}


def test_connections_during_a_worker_restart_do_not_wait_for_it(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url), workers=2)
    before = alive_workers(gw)
    assert len(before) == 2
    stop = threading.Event()
    results: list[tuple[float, float, str]] = []  # (start, seconds to the full answer, outcome)

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = request(gw.port, path="/load").status  # a new connection every time
                outcome = "ok" if status == 200 else f"status {status}"
            except OSError as exc:
                outcome = repr(exc)
            results.append((started, time.monotonic() - started, outcome))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(results) > 50)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: alive_workers(gw).get(0) not in (None, victim), 30)
        restarted_at = time.monotonic()
        assert wait_until(lambda: sum(1 for s, _, _ in results if s > restarted_at) > 20, 30)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    during = [(s, latency, outcome) for s, latency, outcome in results if killed_at <= s < restarted_at]
    assert len(during) > 20, "too few requests while the worker was down"
    # A connection the dying process accepted in its last moment is reset with it; later ones never fail.
    assert [o for s, _, o in during if o != "ok" and s > killed_at + 0.05] == []
    worst = max(latency for _, latency, outcome in during if outcome == "ok")
    # Queued for the replacement, connections waited 0.9-4 s; served by the other worker they take
    # one request's time. Bounded loosely (the test machine is shared, the suite runs in parallel):
    # the ≤ 100 ms figure is bench/stress.py's to measure, this only tells the two behaviours apart.
    assert worst < 0.8, f"a connection waited {worst:.3f}s while the worker restarted"
    line = gw.wait_for_output(r"worker 0 is back; the other workers served the (\d+) connections")
    assert int(line.rsplit("served the ", 1)[1].split()[0]) > 0
