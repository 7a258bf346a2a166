"""Failover with real processes: backends are separate processes, killed with SIGKILL mid-load and
started again on the same port, behind a real two-worker gateway. Every wait is bounded."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import Gateway, request
from tests.upstream_support import BackendProcess, LoadGenerator, target_status, timed, upstream_status

pytestmark = pytest.mark.integration

INTERVAL = 1.0  # active health checks of healthy targets
UNHEALTHY_INTERVAL = 0.5  # ... and of unhealthy or ejected ones


@pytest.fixture
def backends() -> Iterator[Callable[..., BackendProcess]]:
    started: list[BackendProcess] = []

    def start(name: str) -> BackendProcess:
        process = BackendProcess(name).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def failover_config(primaries: list[BackendProcess], backups: list[BackendProcess] = ()) -> dict[str, Any]:
    targets = [{"target": b.address} for b in primaries]
    targets += [{"target": b.address, "backup": True} for b in backups]
    return {
        "gateway": {
            "listen": ["127.0.0.1:0"],
            "status_listen": "127.0.0.1:0",
            "access_log": {"enabled": False},
        },
        "upstreams": [
            {
                "name": "app",
                "algorithm": "least-connections",
                "targets": targets,
                "healthchecks": {
                    "active": {
                        "http_path": "/health",
                        "interval": INTERVAL,
                        "unhealthy_interval": UNHEALTHY_INTERVAL,
                        "timeout": 0.5,
                    },
                },
            }
        ],
        "services": [{"name": "app", "upstream": "app", "connect_timeout": "1s", "read_timeout": "5s"}],
        "routes": [{"name": "app", "service": "app", "paths": ["/"]}],
    }


def state_of(gw: Gateway, backend: BackendProcess) -> dict[str, Any]:
    return target_status(gw.status_port, "app", backend.address)


def test_a_killed_target_costs_no_request_and_comes_back(gateway, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    gw = gateway(failover_config([a, b, c]), workers=2)
    load = LoadGenerator(gw.port, clients=6).start()
    try:
        assert timed(lambda: len(load.counts()) == 3, 10) is not None  # steady load over all three
        time.sleep(1.0)
        a.kill()
        killed = time.monotonic()
        ejected_after = timed(lambda: not state_of(gw, a)["available"], 5)
        assert ejected_after is not None and ejected_after <= 1.0, ejected_after
        # Load goes on over the other two while active checks confirm the target is down.
        assert timed(lambda: state_of(gw, a)["state"] == "unhealthy", 10) is not None
        served_before_restart = load.counts()[a.name]
        time.sleep(max(0.0, 3.0 - (time.monotonic() - killed)))
        a.start()
        back_after = timed(lambda: state_of(gw, a)["available"], 10)
        assert back_after is not None and back_after <= 2 * INTERVAL, back_after
        assert timed(lambda: load.counts()[a.name] > served_before_restart + 20, 5) is not None
        time.sleep(1.0)
    finally:
        result = load.stop()
    assert result.failures == [], result.failures[:10]
    assert result.ok > 500 and set(result.instances) == {"a", "b", "c"}
    status = upstream_status(gw.status_port, "app")
    assert status["available_targets"] == 3
    assert status["retries"]["retried"] > 0  # the requests in flight on `a` when it died were retried
    assert gw.wait_for_output(r"upstream app: target .* ejected for 30.0s")


def test_the_backup_serves_while_every_primary_is_down(gateway, backends):
    a, b, spare = backends("a"), backends("b"), backends("spare")
    gw = gateway(failover_config([a, b], [spare]), workers=2)
    for _ in range(20):
        assert request(gw.port, "GET", "/x").header("x-instance") in ("a", "b")  # the backup is idle
    load = LoadGenerator(gw.port, clients=4).start()
    try:
        assert timed(lambda: set(load.counts()) == {"a", "b"}, 10) is not None
        a.kill()
        b.kill()
        assert timed(lambda: load.counts()["spare"] > 200, 10) is not None
        assert timed(lambda: upstream_status(gw.status_port, "app")["available_targets"] == 1, 10) is not None
    finally:
        result = load.stop()
    assert result.failures == [], result.failures[:10]  # refused connections were retried on the backup
    assert {request(gw.port, "GET", "/x").header("x-instance") for _ in range(10)} == {"spare"}


def test_every_target_down_is_a_fast_503(gateway, backends):
    a, b, spare = backends("a"), backends("b"), backends("spare")
    gw = gateway(failover_config([a, b], [spare]), workers=2)
    assert request(gw.port, "GET", "/x").status == 200
    for process in (a, b, spare):
        process.kill()
    slowest = 0.0

    def all_down() -> bool:
        nonlocal slowest
        start = time.monotonic()
        resp = request(gw.port, "GET", "/x")
        slowest = max(slowest, time.monotonic() - start)
        assert resp.status in (502, 503), resp.status  # refused (until checks agree), then no target
        return resp.status == 503

    assert timed(all_down, 10) is not None
    assert slowest < 2.0  # every answer was quick: no request waited for a dead target
    start = time.monotonic()
    resp = request(gw.port, "GET", "/x")
    assert time.monotonic() - start < 1.0
    assert resp.status == 503
    assert resp.json()["message"] == "no healthy target in upstream 'app'"
    assert upstream_status(gw.status_port, "app")["available_targets"] == 0
