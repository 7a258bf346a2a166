"""Retries, the retry budget, request body replay and circuit breaking, through a real gateway process
and scriptable backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import Seen, request, response, wait_until
from tests.upstream_support import upstream_status

pytestmark = pytest.mark.integration


def upstream_config(targets: list[str], routes: list[dict[str, Any]] | None = None, **upstream: Any) -> dict:
    upstream.setdefault("healthchecks", {"passive": {"enabled": False}})
    return {
        "gateway": {
            "listen": ["127.0.0.1:0"],
            "status_listen": "127.0.0.1:0",
            "access_log": {"enabled": False},
        },
        "upstreams": [{"name": "u", "targets": [{"target": t} for t in targets], **upstream}],
        "services": [{"name": "s", "upstream": "u", "connect_timeout": "1s", "read_timeout": "5s"}],
        "routes": routes or [{"name": "r", "service": "s", "paths": ["/"]}],
    }


def closed_port() -> str:
    """An address nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def broken(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Takes the request, starts an answer, and hangs up: the request was sent."""
    writer.write(b"HTTP/1.1 2")
    return False


def unavailable(status: int) -> Any:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(status, b'{"busy": true}'))
        return True

    return respond


def test_get_is_retried_on_another_target_after_a_connect_failure(gateway, backend):
    good = backend()
    gw = gateway(upstream_config([closed_port(), f"127.0.0.1:{good.port}"]))
    for _ in range(6):
        assert request(gw.port, "GET", "/x").status == 200
    assert len(good.seen) == 6
    assert upstream_status(gw.status_port, "u")["retries"]["retried"] == 3  # every other request


def test_post_is_retried_after_a_connect_failure_since_nothing_was_sent(gateway, backend):
    good = backend()
    gw = gateway(upstream_config([closed_port(), f"127.0.0.1:{good.port}"]))
    for _ in range(4):
        assert request(gw.port, "POST", "/x", body=b"hello").status == 200
    assert [s.body for s in good.seen] == [b"hello"] * 4


def test_post_is_not_retried_once_sent_unless_the_route_allows(gateway, backend):
    bad, good = backend(broken), backend()
    targets = [f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"]
    routes = [
        {"name": "plain", "service": "s", "paths": ["/plain"]},
        {"name": "allowed", "service": "s", "paths": ["/allowed"], "retry_non_idempotent": True},
    ]
    gw = gateway(upstream_config(targets, routes))
    statuses = [request(gw.port, "POST", "/plain", body=b"x").status for _ in range(4)]
    assert sorted(statuses) == [200, 200, 502, 502]  # round-robin: half went to the broken target
    assert len(bad.seen) == 2 and len(good.seen) == 2  # ...and were not sent again
    statuses = [request(gw.port, "POST", "/allowed", body=b"y" * 1000).status for _ in range(4)]
    assert statuses == [200] * 4
    assert [len(s.body) for s in good.seen[2:]] == [1000] * 4  # the body was replayed in full
    statuses = [request(gw.port, "GET", "/plain").status for _ in range(4)]
    assert statuses == [200] * 4  # GET is idempotent


def test_body_larger_than_the_replay_limit_is_not_retried(gateway, backend):
    bad, good = backend(broken), backend()
    targets = [f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"]
    gw = gateway(upstream_config(targets, retries={"replay_limit": 100}))
    statuses = sorted(request(gw.port, "PUT", "/x", body=b"z" * 1000).status for _ in range(2))
    assert statuses == [200, 502]
    statuses = sorted(request(gw.port, "PUT", "/x", body=b"z" * 100).status for _ in range(2))
    assert statuses == [200, 200]


def test_configured_statuses_are_retried_for_idempotent_methods_only(gateway, backend):
    busy, good = backend(unavailable(503)), backend()
    targets = [f"127.0.0.1:{busy.port}", f"127.0.0.1:{good.port}"]
    gw = gateway(upstream_config(targets, retries={"statuses": [503]}))
    assert [request(gw.port, "GET", "/x").status for _ in range(4)] == [200] * 4
    assert len(busy.seen) == 2  # two of the four first went there, and were retried on the good one
    assert sorted(request(gw.port, "DELETE", "/x").status for _ in range(2)) == [200, 200]  # idempotent
    assert sorted(request(gw.port, "POST", "/x", body=b"").status for _ in range(2)) == [200, 503]


def test_statuses_are_not_retried_unless_configured(gateway, backend):
    busy, good = backend(unavailable(503)), backend()
    gw = gateway(upstream_config([f"127.0.0.1:{busy.port}", f"127.0.0.1:{good.port}"]))
    assert sorted(request(gw.port, "GET", "/x").status for _ in range(2)) == [200, 503]


def test_the_retry_budget_stops_retries(gateway, backend):
    bad, good = backend(broken), backend()
    budget = {"ratio": 0, "min_per_second": 0.1, "window": 10}  # one retry per 10 s
    targets = [f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"]
    gw = gateway(upstream_config(targets, retries={"budget": budget}))
    statuses = [request(gw.port, "GET", "/x").status for _ in range(4)]
    assert statuses == [200, 200, 502, 200]  # the second failure finds the budget spent
    retries = upstream_status(gw.status_port, "u")["retries"]
    assert retries["retried"] == 1 and retries["refused_by_budget"] == 1


def test_retrying_a_refused_connection_costs_no_budget(gateway, backend):
    """Nothing reached a backend, so nothing is multiplied: the budget is for requests that did."""
    good = backend()
    budget = {"ratio": 0, "min_per_second": 0, "window": 10}  # no retry allowed at all
    gw = gateway(upstream_config([closed_port(), f"127.0.0.1:{good.port}"], retries={"budget": budget}))
    assert [request(gw.port, "GET", "/x").status for _ in range(4)] == [200] * 4
    assert upstream_status(gw.status_port, "u")["retries"]["retried"] == 2


def test_attempts_bound_the_retries(gateway, backend):
    good = backend()
    dead = [closed_port() for _ in range(3)]
    targets = [*dead, f"127.0.0.1:{good.port}"]
    gw = gateway(upstream_config(targets, algorithm="random", retries={"attempts": 1}))
    statuses = [request(gw.port, "GET", "/x").status for _ in range(30)]
    assert set(statuses) == {200, 502}  # one retry is not always enough to find the one live target
    gw2 = gateway(upstream_config(targets, algorithm="random"))
    assert [request(gw2.port, "GET", "/x").status for _ in range(20)] == [200] * 20  # three are


def test_every_target_down_is_a_fast_answer(gateway):
    gw = gateway(upstream_config([closed_port(), closed_port()]))
    start = time.monotonic()
    resp = request(gw.port, "GET", "/x")
    assert resp.status == 502
    assert "connecting to 127.0.0.1:" in resp.json()["message"]
    assert time.monotonic() - start < 5  # refused, retried once with a short backoff, answered


# -- circuit breaking ---------------------------------------------------------------------------------------
def slow(seconds: float) -> Any:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(seconds)
        writer.write(response(200, b"{}"))
        return True

    return respond


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_max_connections_answers_503_at_once_with_the_reason(gateway, backend):
    be = backend(slow(1.0))
    gw = gateway(upstream_config([f"127.0.0.1:{be.port}"], circuit_breaker={"max_connections": 1}))
    thread, first = in_thread(lambda: request(gw.port, "GET", "/slow"))
    assert wait_until(lambda: len(be.seen) == 1, 5)
    start = time.monotonic()
    resp = request(gw.port, "GET", "/fast")
    assert time.monotonic() - start < 0.9  # not queued behind the slow one
    assert resp.status == 503
    assert resp.header("x-tollway-circuit-breaker") == "max-connections"
    assert "connection limit" in resp.json()["message"] and resp.json()["request_id"]
    thread.join(10)
    assert first[0].status == 200
    assert request(gw.port, "GET", "/after").status == 200  # the connection is free again
    status = upstream_status(gw.status_port, "u")["circuit_breaker"]
    assert status["rejected"]["max_connections"] == 1 and status["max_connections"] == 1


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A listening socket that never accepts, its queue filled: connecting to it hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(8):
        client = socket.socket()
        client.settimeout(0.3)
        try:
            client.connect(address)
        except OSError:
            client.close()
            break
        fillers.append(client)
    yield f"127.0.0.1:{address[1]}"
    for client in fillers:
        client.close()
    server.close()


def test_max_pending_requests_answers_503_at_once_with_the_reason(gateway, blackhole):
    limits = {"max_pending_requests": 1}
    gw = gateway(upstream_config([blackhole], circuit_breaker=limits, retries={"attempts": 0}))
    thread, first = in_thread(lambda: request(gw.port, "GET", "/hangs"))
    assert wait_until(lambda: upstream_status(gw.status_port, "u")["connections"]["pending_requests"] == 1, 5)
    resp = request(gw.port, "GET", "/x")
    assert resp.status == 503
    assert resp.header("x-tollway-circuit-breaker") == "max-pending-requests"
    thread.join(10)
    assert first[0].status == 504  # the first one waited for its connect timeout


# -- pools ---------------------------------------------------------------------------------------------------
async def closes_reused_connections(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """Answers the first request of each connection; on a reused one it hangs up without a byte, as a
    backend closing an idle connection just as the gateway reuses it."""
    if seen.connection in closes_reused_connections.used:  # type: ignore[attr-defined]
        return False
    closes_reused_connections.used.add(seen.connection)  # type: ignore[attr-defined]
    writer.write(response(200, b'{"fresh": true}'))
    return True


def test_a_pooled_connection_closed_by_the_backend_is_never_a_client_error(gateway, backend):
    """Requests safe to repeat are replayed on a fresh connection; a POST is not sent twice."""
    closes_reused_connections.used = set()  # type: ignore[attr-defined]
    be = backend(closes_reused_connections)
    gw = gateway(upstream_config([f"127.0.0.1:{be.port}"]))
    for i in range(5):
        method, body = ("PUT", b"data") if i % 2 else ("GET", None)
        resp = request(gw.port, method, "/x", body=body)
        assert resp.status == 200, resp.body
    assert be.connections == 5  # every reuse failed and was replayed once on a fresh connection
    puts = [s.body for s in be.seen if s.method == "PUT"]
    assert puts == [b"data"] * 4  # each PUT reached it twice: on the closing connection, then answered
    assert upstream_status(gw.status_port, "u")["retries"]["retried"] == 0  # same target: not a retry
    resp = request(gw.port, "POST", "/x", body=b"once")
    assert resp.status == 502
    assert [s.body for s in be.seen if s.method == "POST"] == [b"once"]


def test_a_service_may_replay_non_idempotent_requests_on_a_closed_pooled_connection(gateway, backend):
    closes_reused_connections.used = set()  # type: ignore[attr-defined]
    be = backend(closes_reused_connections)
    config = upstream_config([f"127.0.0.1:{be.port}"])
    config["services"][0]["replay_non_idempotent"] = True
    gw = gateway(config)
    assert request(gw.port, "GET", "/x").status == 200
    resp = request(gw.port, "POST", "/x", body=b"data")
    assert resp.status == 200, resp.body
    assert [s.body for s in be.seen if s.method == "POST"] == [b"data", b"data"]


def test_pool_options_apply_per_upstream(gateway, backend):
    be = backend()
    gw = gateway(upstream_config([f"127.0.0.1:{be.port}"], pool={"max_requests": 2}))
    for _ in range(6):
        assert request(gw.port, "GET", "/x").status == 200
    assert be.connections == 3  # a connection is retired after two requests
    assert [s.connection for s in be.seen] == [1, 1, 2, 2, 3, 3]


# -- active checks -------------------------------------------------------------------------------------------
def test_active_checks_run_once_per_node_with_the_configured_request(gateway, backend):
    be = backend()
    active = {"http_path": "/healthz", "host": "health.internal", "interval": 0.2, "healthy_threshold": 1}
    gw = gateway(upstream_config([f"127.0.0.1:{be.port}"], healthchecks={"active": active}), workers=2)

    def probes() -> list[Seen]:
        return [s for s in be.seen if s.target == "/healthz"]

    assert wait_until(lambda: len(probes()) >= 2, 10)
    before, started = len(probes()), time.monotonic()
    time.sleep(1.0)
    count, elapsed = len(probes()) - before, time.monotonic() - started
    assert 1 <= count <= elapsed / 0.2 + 1  # one prober, not one per worker (that would be twice as many)
    assert {s.header("host") for s in probes()} == {"health.internal"}
    assert {s.header("user-agent") for s in probes()} == {"tollway-healthcheck"}
    target = upstream_status(gw.status_port, "u")["targets"][0]
    assert target["health"]["healthy"] and target["health"]["last_check"]["status"] == 200
