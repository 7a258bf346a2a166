"""/metrics and /status through a real gateway with two workers: exact counts after known traffic,
counters that survive a worker's death, config and build gauges."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import RawClient, Seen, gateway_config, request, response, wait_until

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read().decode()


def scrape(gw) -> Samples:
    status, ctype, text = fetch(gw.status_url + "/metrics")
    assert status == 200, text
    assert ctype.startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def status_doc(gw) -> dict[str, Any]:
    code, _, text = fetch(gw.status_url + "/status")
    assert code == 200
    return json.loads(text)


async def by_path(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """/api/status/<code> answers <code>; anything else 200 with a 20-byte body."""
    parts = seen.target.split("/")
    code = int(parts[3]) if len(parts) > 3 and parts[2] == "status" else 200
    writer.write(response(code, b"" if seen.method == "HEAD" else b"x" * 20))
    return True


def config(api_url: str, files_url: str, **gateway: Any) -> dict[str, Any]:
    return {
        "gateway": {"listen": ["127.0.0.1:0"], "status_listen": "127.0.0.1:0", **gateway},
        "services": [{"name": "backend", "url": api_url}, {"name": "files", "url": files_url}],
        "routes": [
            {"name": "api", "service": "backend", "paths": ["/api"]},
            {"name": "static", "service": "files", "paths": ["/files"], "methods": ["GET", "HEAD"]},
        ],
    }


def send_known_traffic(port: int) -> int:
    """Every request on its own connection, so both workers get some. Returns bytes the clients got
    for the static route (read to EOF: exactly what the gateway sent)."""
    for _ in range(10):
        assert request(port, "GET", "/api/status/200").status == 200
    for _ in range(4):
        assert request(port, "POST", "/api/status/201", body=b"hello").status == 201
    for _ in range(3):
        assert request(port, "DELETE", "/api/status/503").status == 503
    assert request(port, "PROPFIND", "/api/status/200").status == 200
    for _ in range(6):
        assert request(port, "GET", "/nothing").status == 404
    for _ in range(2):
        assert request(port, "POST", "/files/x").status == 405
    static_bytes = 0
    for method in ("GET",) * 5 + ("HEAD",) * 2:
        client = RawClient(port)
        client.send(f"{method} /files/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        assert client.closed_by_peer(10)
        static_bytes += len(client.buf)
        client.close()
    return static_bytes


def test_counts_are_exact_across_two_workers(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    gw = gateway(config(api.url, files.url), workers=2)
    static_bytes = send_known_traffic(gw.port)
    m = scrape(gw)

    def requests(service: str, route: str, method: str, code: str) -> float:
        return value(m, "tollway_http_requests_total", service=service, route=route, method=method, code=code)

    assert requests("backend", "api", "GET", "2xx") == 10
    assert requests("backend", "api", "POST", "2xx") == 4
    assert requests("backend", "api", "DELETE", "5xx") == 3
    assert requests("backend", "api", "other", "2xx") == 1
    assert requests("files", "static", "GET", "2xx") == 5
    assert requests("files", "static", "HEAD", "2xx") == 2
    assert requests("", "", "GET", "4xx") == 6  # no route matched
    assert requests("", "", "POST", "4xx") == 2  # 405
    total = sum(v for (name, _), v in m.items() if name == "tollway_http_requests_total")
    assert total == 33

    api_labels = {"service": "backend", "route": "api"}
    assert value(m, "tollway_http_request_duration_seconds_count", **api_labels) == 18
    assert value(m, "tollway_http_request_duration_seconds_bucket", le="+Inf", **api_labels) == 18
    assert value(m, "tollway_http_upstream_duration_seconds_count", **api_labels) == 18
    assert value(m, "tollway_http_gateway_duration_seconds_count", **api_labels) == 18
    assert value(m, "tollway_http_upstream_duration_seconds_count", service="", route="") == 0
    assert value(m, "tollway_http_gateway_duration_seconds_count", service="", route="") == 8
    assert value(m, "tollway_http_received_bytes_total", **api_labels) == 4 * 5
    assert value(m, "tollway_http_sent_bytes_total", service="files", route="static") == static_bytes
    assert value(m, "tollway_connections_accepted_total") == 33

    # Both workers served some of it, and the merged view adds up to the per-worker numbers.
    doc = status_doc(gw)
    assert [w["alive"] for w in doc["workers"]] == [True, True]
    per_worker = [w["requests"] for w in doc["workers"]]
    assert all(n > 0 for n in per_worker) and sum(per_worker) == 33


def test_counters_never_go_backwards_when_a_worker_dies(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    gw = gateway(config(api.url, files.url), workers=2)
    send_known_traffic(gw.port)
    before = scrape(gw)
    victim = status_doc(gw)["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted() -> bool:
        w = status_doc(gw)["workers"][0]
        return w["pid"] != victim["pid"] and w["alive"] and w["config_version"] == 1

    assert wait_until(restarted, timeout=20)
    after = scrape(gw)
    for (name, labels), old in before.items():
        if name.endswith(("_total", "_count", "_bucket", "_sum")) and not name.startswith("tollway_worker"):
            assert after.get((name, labels), 0.0) >= old, (name, dict(labels))
    assert value(after, "tollway_worker_restarts_total", worker="0") == 1

    send_known_traffic(gw.port)
    again = scrape(gw)
    total = sum(v for (name, _), v in again.items() if name == "tollway_http_requests_total")
    assert total == 66  # nothing lost: the dead worker's counts plus everything since


def test_config_build_and_worker_gauges(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    gw = gateway(config(api.url, files.url, watch_interval=0), workers=2)
    m = scrape(gw)
    assert value(m, "tollway_config_version") == 1
    assert value(m, "tollway_config_last_reload_success") == 1
    assert value(m, "tollway_workers", state="alive") == 2
    assert value(m, "tollway_workers", state="ready") == 2
    build = [labels for (name, labels), v in m.items() if name == "tollway_build_info" and v == 1]
    assert build and ("version", "0.1.0") in build[0]
    for slot in ("0", "1"):
        assert value(m, "tollway_worker_resident_memory_bytes", worker=slot) > 10 * 1024 * 1024

    gw.write_config(config(api.url, files.url, watch_interval=0, server_header="tw"))
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: value(scrape(gw), "tollway_config_version") == 2)
    gw.write_config("routes: [{name: broken}]")
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: value(scrape(gw), "tollway_config_last_reload_success") == 0)
    m = scrape(gw)
    assert value(m, "tollway_config_reloads_total", result="ok") == 1
    assert value(m, "tollway_config_reloads_total", result="failed") == 1
    assert value(m, "tollway_config_version") == 2


def test_status_document(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    gw = gateway(config(api.url, files.url), workers=2)
    held = RawClient(gw.port)  # an open keep-alive connection shows up in the counts
    held.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert held.read_response().status == 200
    doc = status_doc(gw)
    assert doc["version"] == "0.1.0"
    assert doc["config"]["version"] == 1 and doc["config"]["last_reload"]["result"] == "initial"
    assert doc["ready"] is True and doc["draining"] is False
    assert len(doc["workers"]) == 2
    keys = {"pid", "alive", "config_version", "connections", "requests", "uptime_seconds"}
    assert keys <= set(doc["workers"][0])
    assert doc["connections"]["active"] == 1 == sum(w["connections"] for w in doc["workers"])
    pids = [w["pid"] for w in doc["workers"]]
    assert [w["pid"] for w in status_doc(gw)["workers"]] == pids  # the supervisor answers: one view
    held.close()


def test_metrics_can_be_turned_off(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    gw = gateway(config(api.url, files.url, metrics={"enabled": False}))
    assert request(gw.port, "GET", "/api/x").status == 200
    code, _, text = fetch(gw.status_url + "/metrics")
    assert code == 404 and "disabled" in text


def test_exact_status_codes_when_asked(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    gw = gateway(config(api.url, files.url, metrics={"status_codes": True}))
    request(gw.port, "GET", "/api/status/429")
    request(gw.port, "GET", "/api/status/429")
    request(gw.port, "GET", "/api/status/204")
    m = scrape(gw)
    labels = {"service": "backend", "route": "api", "method": "GET"}
    assert value(m, "tollway_http_requests_total", code="429", **labels) == 2
    assert value(m, "tollway_http_requests_total", code="204", **labels) == 1


def test_upstream_errors_are_counted_by_kind(gateway, backend):
    api, files = backend(by_path), backend(by_path)
    cfg = config(api.url, files.url)
    cfg["services"].append({"name": "down", "url": "http://127.0.0.1:1"})
    cfg["routes"].append({"name": "down", "service": "down", "paths": ["/down"]})
    gw = gateway(cfg)
    for _ in range(3):
        assert request(gw.port, "GET", "/down").status == 502
    m = scrape(gw)
    errors = value(m, "tollway_upstream_errors_total", service="down", target="127.0.0.1:1", error="connect")
    assert errors == 3
    labels = {"service": "down", "route": "down", "method": "GET", "code": "5xx"}
    assert value(m, "tollway_http_requests_total", **labels) == 3


def test_upstream_health_ejections_and_retries(gateway, backend):
    """Upstream state reported through the metrics API: a refusing target is retried around, ejected by
    passive checks (counted once, however many workers) and shown in tollway_upstream_target_health."""
    import socket as socket_module

    with socket_module.socket() as sock:  # nothing will listen here
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    good = backend()
    live = f"127.0.0.1:{good.port}"
    cfg = {
        "gateway": {
            "listen": ["127.0.0.1:0"],
            "status_listen": "127.0.0.1:0",
            "access_log": {"enabled": False},
        },
        "upstreams": [
            {
                "name": "u",
                "targets": [{"target": dead}, {"target": live}],
                "healthchecks": {"passive": {"consecutive_failures": 2, "base_ejection_time": 60}},
            }
        ],
        "services": [{"name": "s", "upstream": "u", "connect_timeout": "1s"}],
        "routes": [{"name": "r", "service": "s", "paths": ["/"]}],
    }
    gw = gateway(cfg, workers=2)
    for _ in range(12):
        assert request(gw.port, "GET", "/x").status == 200  # the dead target's tries are retried

    def ejected() -> bool:
        labels = {"upstream": "u", "target": dead, "address": dead, "state": "ejected"}
        return value(scrape(gw), "tollway_upstream_target_health", **labels) == 1

    assert wait_until(ejected, timeout=10)
    m = scrape(gw)
    health = {"upstream": "u", "target": live, "address": live}
    assert value(m, "tollway_upstream_target_health", state="healthy", **health) == 1
    assert value(m, "tollway_upstream_target_health", state="ejected", **health) == 0
    ejections = value(m, "tollway_upstream_ejections_total", upstream="u", target=dead, address=dead)
    assert ejections >= 1
    retried = value(m, "tollway_upstream_retries_total", upstream="u", result="retried")
    failed_tries = value(m, "tollway_upstream_target_failures_total", upstream="u", target=dead, address=dead)
    assert retried >= 2 and retried == failed_tries  # every refused try was retried on the live target
    live_tries = value(m, "tollway_upstream_target_requests_total", **health)
    assert live_tries == 12  # every request ended there
    assert value(m, "tollway_upstream_errors_total", service="s", target=dead, error="connect") == 0
    assert value(m, "tollway_http_requests_total", service="s", route="r", method="GET", code="2xx") == 12


def test_auth_failures_are_counted_by_plugin_route_and_reason(gateway, backend):
    be = backend()
    cfg = gateway_config(be.url, routes=[{"name": "orders", "service": "backend", "paths": ["/orders"]}])
    cfg["routes"][0]["plugins"] = [{"name": "key-auth"}]
    cfg["consumers"] = [{"username": "app", "credentials": {"key-auth": [{"key": "good-key"}]}}]
    gw = gateway(cfg, workers=2)
    for _ in range(3):
        assert request(gw.port, "GET", "/orders").status == 401
    for _ in range(2):
        assert request(gw.port, "GET", "/orders", headers={"apikey": "wrong"}).status == 401
    assert request(gw.port, "GET", "/orders", headers={"apikey": "good-key"}).status == 200
    m = scrape(gw)
    labels = {"plugin": "key-auth", "route": "orders"}
    assert value(m, "tollway_auth_failures_total", reason="missing", **labels) == 3
    assert value(m, "tollway_auth_failures_total", reason="invalid", **labels) == 2
    requests = {"service": "backend", "route": "orders", "method": "GET", "code": "4xx"}
    assert value(m, "tollway_http_requests_total", **requests) == 5
