"""Worker-side counters and histograms, the generic metrics API, merging across workers, exposition."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tollway.counters.catalog import CATALOG
from tollway.counters.metrics import KEY_STRIDE, Histogram, Registry, status_key
from tollway.observability.supervisor_side import MetricsHub, empty, families, merge_into


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def render(merged: dict[str, Any]) -> str:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class C:
        def collect(self):
            return families(merged)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(C())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


# -- histograms and request keys --------------------------------------------------------------------------
def test_histogram_buckets_are_le_and_the_last_is_inf():
    h = Histogram([0.1, 0.5, 1.0])
    for v in (0.05, 0.1, 0.2, 0.5, 0.7, 1.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 2, 1]  # ≤0.1: 0.05 0.1 | ≤0.5: 0.2 0.5 | ≤1: 0.7 1.0 | +Inf: 3.0
    assert h.sum == pytest.approx(5.55)


def test_status_key_by_class_or_code():
    assert status_key(b"GET", 204, exact=False) == 0 * KEY_STRIDE + 2
    assert status_key(b"DELETE", 503, exact=False) == 5 * KEY_STRIDE + 5
    assert status_key(b"PROPFIND", 404, exact=False) == 7 * KEY_STRIDE + 4  # other method
    assert status_key(b"POST", 429, exact=True) == 2 * KEY_STRIDE + 429
    assert status_key(b"GET", 0, exact=False) == 0  # no status: "unknown"


# -- the generic API ---------------------------------------------------------------------------------
def test_counter_handles_and_one_line_counts_share_series():
    reg = Registry()
    handle = reg.counter("auth_failures_total", plugin="key-auth", route="api", reason="missing")
    handle.inc()
    reg.count("auth_failures_total", plugin="key-auth", route="api", reason="missing")
    reg.count("auth_failures_total", 3, route="api", reason="invalid", plugin="key-auth")  # any order
    series = reg.snapshot()["families"]["auth_failures_total"][5]
    assert series == {("key-auth", "api", "missing"): 2, ("key-auth", "api", "invalid"): 3}


def test_catalogue_supplies_type_help_and_label_order():
    reg = Registry()
    reg.count("rate_limit_decisions_total", decision="limited", route="r", plugin="rate-limiting")
    family = reg.snapshot()["families"]["rate_limit_decisions_total"]
    kind, help_text, labels, _buckets, _merge, series = family
    entry = CATALOG["rate_limit_decisions_total"]
    assert (kind, help_text, labels) == ("counter", entry.help, ("plugin", "route", "decision"))
    assert series == {("rate-limiting", "r", "limited"): 1}


def test_wrong_labels_or_kind_are_refused():
    reg = Registry()
    with pytest.raises(ValueError, match="takes labels"):
        reg.count("auth_failures_total", plugin="key-auth")
    with pytest.raises(ValueError, match="counter"):
        reg.gauge("auth_failures_total", plugin="a", route="b", reason="c")


def test_undeclared_names_are_declared_by_first_use():
    reg = Registry()
    reg.histogram("my_plugin_seconds", plugin="mine").observe(0.02)
    reg.gauge("my_plugin_queue", plugin="mine").set(7)
    fams = reg.snapshot()["families"]
    assert fams["my_plugin_seconds"][0] == "histogram" and fams["my_plugin_seconds"][2] == ("plugin",)
    assert fams["my_plugin_queue"][5] == {("mine",): 7.0}


def test_label_sets_beyond_max_series_share_the_other_series():
    reg = Registry(max_series=10)
    for i in range(25):
        reg.count("auth_failures_total", plugin="p", route=f"route-{i}", reason="missing")
    series = reg.snapshot()["families"]["auth_failures_total"][5]
    assert len(series) == 11
    assert series[("other", "other", "other")] == 15


# -- merging and exposition --------------------------------------------------------------------------
def worker_snapshot(requests: int, connections: float, health: float = 1.0) -> dict[str, Any]:
    reg = Registry()
    reg.configure([0.1, 1.0], [0.001], 100)
    route = reg.route("users", "read")
    for _ in range(requests):
        route.record(status_key(b"GET", 200, False), 0.05, 0.04, 0.0005, 10, 100)
    route.record(status_key(b"POST", 503, False), 2.0, -1.0, 2.0, 5, 50)  # no upstream timing
    reg.gauge("connections_active").set(connections)
    target = {"upstream": "u", "target": "t:1", "address": "t:1"}
    reg.gauge("upstream_target_health", state="healthy", **target).set(health)
    reg.count("upstream_retries_total", upstream="u", result="retried")
    return reg.snapshot()


def test_merge_sums_counters_and_histograms_and_merges_gauges_by_their_rule():
    total = empty()
    merge_into(total, worker_snapshot(3, 4, health=1.0))
    merge_into(total, worker_snapshot(2, 5, health=0.0))
    got = samples(render(total))
    users = (("service", "users"), ("route", "read"))

    def labels(*extra):
        return tuple(sorted((*users, *extra)))

    assert got[("tollway_http_requests_total", labels(("method", "GET"), ("code", "2xx")))] == 5
    assert got[("tollway_http_requests_total", labels(("method", "POST"), ("code", "5xx")))] == 2
    assert got[("tollway_http_request_duration_seconds_bucket", labels(("le", "0.1")))] == 5
    assert got[("tollway_http_request_duration_seconds_bucket", labels(("le", "+Inf")))] == 7
    assert got[("tollway_http_request_duration_seconds_count", labels())] == 7
    assert got[("tollway_http_upstream_duration_seconds_count", labels())] == 5  # 503s had none
    assert got[("tollway_http_gateway_duration_seconds_bucket", labels(("le", "0.001")))] == 5
    assert got[("tollway_http_received_bytes_total", labels())] == 5 * 10 + 2 * 5
    assert got[("tollway_http_sent_bytes_total", labels())] == 5 * 100 + 2 * 50
    assert got[("tollway_connections_active", ())] == 9  # sum
    health = (("address", "t:1"), ("state", "healthy"), ("target", "t:1"), ("upstream", "u"))
    assert got[("tollway_upstream_target_health", health)] == 1  # max
    retries = (("result", "retried"), ("upstream", "u"))
    assert got[("tollway_upstream_retries_total", retries)] == 2


def test_a_retired_worker_keeps_its_counters_but_not_its_gauges():
    total = empty()
    merge_into(total, worker_snapshot(3, 4), gauges=False)
    got = samples(render(total))
    assert ("tollway_connections_active", ()) not in got
    key = (("code", "2xx"), ("method", "GET"), ("route", "read"), ("service", "users"))
    assert got[("tollway_http_requests_total", key)] == 3


# -- the supervisor's hub: collection and monotonic counters -----------------------------------------
class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> bool:
        self.sent.append(message)
        return True


def fake_supervisor(pids: list[int]) -> SimpleNamespace:
    workers = {
        slot: SimpleNamespace(
            slot=slot, process=SimpleNamespace(pid=pid), channel=FakeChannel(), ready_version=1
        )
        for slot, pid in enumerate(pids)
    }
    return SimpleNamespace(
        workers=workers, version=1, started=1.0, last_reload={"time": 1.0, "result": "initial"}
    )


def total_requests(hub: MetricsHub) -> float:
    return sum(
        v for (name, _), v in samples(hub.render().decode()).items() if name == "tollway_http_requests_total"
    )


async def test_hub_waits_for_every_worker_then_merges():
    sup = fake_supervisor([101, 102])
    hub = MetricsHub(sup, Registry())  # type: ignore[arg-type]

    async def answer() -> None:
        await asyncio.sleep(0.01)
        for handle in sup.workers.values():
            ((kind, token),) = handle.channel.sent
            assert kind == "collect"
            hub.received(handle.slot, handle.process.pid, token, worker_snapshot(10, 1))

    answering = asyncio.create_task(answer())
    await hub.collect(timeout=5.0)
    await answering
    assert total_requests(hub) == 22


async def test_hub_uses_last_numbers_of_a_silent_worker_and_counts_the_timeout():
    sup = fake_supervisor([101, 102])
    own = Registry()
    hub = MetricsHub(sup, own)  # type: ignore[arg-type]
    hub.received(0, 101, 0, worker_snapshot(10, 1))
    hub.received(1, 102, 0, worker_snapshot(10, 1))
    await hub.collect(timeout=0.05)  # nobody answers
    assert total_requests(hub) == 22
    assert own.snapshot()["families"]["metrics_collect_timeouts_total"][5] == {("0",): 1, ("1",): 1}


def test_counters_never_go_backwards_when_a_worker_dies_and_restarts():
    sup = fake_supervisor([101, 102])
    hub = MetricsHub(sup, Registry())  # type: ignore[arg-type]
    hub.received(0, 101, 0, worker_snapshot(10, 1))
    hub.received(1, 102, 0, worker_snapshot(20, 1))
    before = total_requests(hub)
    hub.worker_gone(101)  # crashed; a new process takes slot 0
    sup.workers[0].process = SimpleNamespace(pid=103)
    assert total_requests(hub) == before
    hub.received(0, 103, 0, worker_snapshot(1, 1))
    assert total_requests(hub) == before + 2
