"""Rate limiting through real gateway processes and real Redis.

Accuracy (the issue's test): 3 gateway nodes x 2 worker processes, 20 concurrent clients, a limit of
1,000 per minute: the `redis` policy admits exactly 1,000, `batched` at least 98% of it (and never
more), `local` exactly its limit on each node — its 2 workers share one count. Redis stopped mid-test:
fail-open keeps serving under node-local limits, fail-closed answers 503, nothing answers 500 or hangs,
the outage is logged once per worker and shown in /metrics, and Redis coming back ends it.

Redis: the shared server at 127.0.0.1:6379 (our own on a free port where none answers); the outage
test always runs a redis-server of its own, so stopping it disturbs nobody.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.state_support import ServerSet, cleanup_prefix, free_port
from tests.support import Gateway, gateway_config, response, wait_until

pytestmark = pytest.mark.integration

LIMIT = 1000
CLIENTS = 20


async def ok(seen: Any, writer: Any) -> bool:
    writer.write(response(200, b"ok"))
    return True


def limited_route(name: str, plugin_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "service": "backend",
        "paths": [f"/{name}"],
        "plugins": [{"name": "rate-limiting", "config": plugin_config}],
    }


def send(ports: list[int], path: str, total: int, clients: int = CLIENTS) -> dict[int, Counter[int]]:
    """`total` GETs of `path` from `clients` keep-alive connections spread over the nodes' ports;
    returns status counts per port. Every response is read (a hang fails the test by timeout)."""
    per_port: dict[int, Counter[int]] = {port: Counter() for port in ports}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(index: int) -> None:
        port = ports[index % len(ports)]
        share = total // clients + (1 if index < total % clients else 0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        seen: Counter[int] = Counter()
        try:
            for _ in range(share):
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                seen[resp.status] += 1
                if resp.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        except BaseException as exc:  # reported below: a failed client must fail the test
            errors.append(exc)
        finally:
            conn.close()
            with lock:
                per_port[port].update(seen)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return per_port


def total(per_port: dict[int, Counter[int]], status: int) -> int:
    return sum(counts[status] for counts in per_port.values())


def scrape(gw: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(gw.status_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(gw: Gateway, name: str, **labels: str) -> float:
    return scrape(gw).get(("tollway_" + name, frozenset(labels.items())), 0.0)


def wait_for_fresh_minute(needed: float) -> None:
    """Fixed windows are aligned to the clock (a minute window resets at :00): start with `needed`
    seconds of the window left, so the whole test counts in one window."""
    left = 60.0 - time.time() % 60.0
    if left < needed:
        time.sleep(left + 0.2)


def test_accuracy_three_nodes_two_workers_each(
    gateway: Any, backend: Any, redis_address: tuple[str, int]
) -> None:
    host, port = redis_address
    prefix = f"twtest:{uuid.uuid4().hex[:10]}:"
    local_limit = 300
    backend_url = backend(ok).url
    routes = [
        limited_route(
            "redis",
            {
                "minute": LIMIT,
                "key": "route",
                "policy": "redis",
                "redis": {"url": f"redis://{host}:{port}/0", "prefix": prefix},
            },
        ),
        # db 1: its own backend in the metrics, so its commands are counted apart from the redis policy's
        limited_route(
            "batched",
            {
                "minute": LIMIT,
                "key": "route",
                "policy": "batched",
                "redis": {"url": f"redis://{host}:{port}/1", "prefix": prefix},
            },
        ),
        limited_route("local", {"minute": local_limit, "key": "route"}),
    ]
    cfg = gateway_config(backend_url, routes=routes)
    cfg["gateway"]["access_log"] = {"enabled": False}
    try:
        nodes = [gateway(cfg, workers=2) for _ in range(3)]
        ports = [node.port for node in nodes]
        wait_for_fresh_minute(30.0)

        redis_result = send(ports, "/redis", 3 * LIMIT)
        assert total(redis_result, 200) == LIMIT, redis_result
        assert total(redis_result, 429) == 2 * LIMIT, redis_result

        batched = send(ports, "/batched", 3 * LIMIT)
        admitted = total(batched, 200)
        assert 0.98 * LIMIT <= admitted <= LIMIT, batched
        assert admitted + total(batched, 429) == 3 * LIMIT, batched
        backend_1 = f"{host}:{port}/1"
        commands = sum(metric(node, "rate_limit_redis_commands_total", backend=backend_1) for node in nodes)
        assert 0 < commands <= 0.1 * 3 * LIMIT, commands  # batching: most requests need no round trip

        local = send(ports, "/local", 3 * 2 * local_limit)
        for node_port, counts in local.items():  # each node: its 2 workers admit exactly the limit
            assert counts[200] == local_limit, (node_port, counts)
            assert counts[429] == sum(counts.values()) - local_limit > 0, (node_port, counts)

        decisions = sum(
            metric(
                node, "rate_limit_decisions_total", plugin="rate-limiting", route="redis", decision="allowed"
            )
            for node in nodes
        )
        assert decisions == LIMIT
    finally:
        cleanup_prefix(host, port, prefix)
        cleanup_redis_db1(host, port, prefix)


def cleanup_redis_db1(host: str, port: int, prefix: str) -> None:
    import redis

    client = redis.Redis(host=host, port=port, db=1, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_redis_stopped_mid_test_fail_open_and_fail_closed(gateway: Any, backend: Any, tmp_path: Path) -> None:
    servers = ServerSet(tmp_path)
    redis_port = free_port()
    server = servers.start(port=redis_port, name="own")
    url = f"redis://127.0.0.1:{redis_port}"
    routes = [
        limited_route("open", {"hour": 20, "key": "route", "policy": "redis", "redis": {"url": url}}),
        limited_route(
            "closed",
            {
                "hour": 1000,
                "key": "route",
                "policy": "batched",
                "on_failure": "closed",
                "redis": {"url": url},
            },
        ),
    ]
    cfg = gateway_config(backend(ok).url, routes=routes)
    cfg["gateway"]["access_log"] = {"enabled": False}
    try:
        gw = gateway(cfg, workers=2)
        assert send([gw.port], "/open", 10, clients=2)[gw.port] == Counter({200: 10})
        assert send([gw.port], "/closed", 10, clients=2)[gw.port] == Counter({200: 10})
        assert metric(gw, "rate_limit_redis_up", backend=f"127.0.0.1:{redis_port}") == 1.0

        server.stop()
        started = time.monotonic()
        open_result = send([gw.port], "/open", 60, clients=4)[gw.port]
        closed_result = send([gw.port], "/closed", 2000, clients=4)[gw.port]
        elapsed = time.monotonic() - started
        # fail-open: the node-local limit (the same 20 per hour, already partly used in Redis: the local
        # count starts afresh) decides; never a 500
        assert set(open_result) <= {200, 429}, open_result
        assert open_result[200] == 20, open_result
        # fail-closed: once the batched node's reserve is spent, 503 — the client did nothing wrong
        assert set(closed_result) <= {200, 503}, closed_result
        assert closed_result[503] > 0, closed_result
        assert elapsed < 30, f"{2060} requests took {elapsed:.1f}s during the outage: something waited"
        closed = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        closed.request("GET", "/closed")
        denied = closed.getresponse()
        body = json.loads(denied.read())
        closed.close()
        assert denied.status == 503
        assert denied.getheader("Retry-After") == "1"
        assert body["message"] == "rate limit could not be checked; try again later"
        assert body["request_id"] == denied.getheader("X-Request-Id")

        backend_name = f"127.0.0.1:{redis_port}"
        assert metric(gw, "rate_limit_redis_up", backend=backend_name) == 0.0
        assert metric(gw, "rate_limit_redis_outages_total", backend=backend_name) >= 1
        assert metric(gw, "rate_limit_redis_fallbacks_total", backend=backend_name) > 0
        unreachable = [line for line in gw.errors if "unreachable" in line]
        assert 1 <= len(unreachable) <= 2, unreachable  # once per outage per worker, not per request

        server.start()  # the same port: Redis is back
        # every worker finds out on its next request (one probe per 0.5 s while down)
        seen: Counter[int] = Counter()

        def recovered() -> bool:
            seen[_status(gw.port, "/closed")] += 1
            return seen[200] > 0 and metric(gw, "rate_limit_redis_up", backend=backend_name) == 1.0

        assert wait_until(recovered, timeout=15, interval=0.1), (seen, gw.errors[-20:])
        gw.wait_for_output("reachable again")
    finally:
        servers.stop_all()


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
