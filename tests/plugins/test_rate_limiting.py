"""rate-limiting and concurrency-limit: schemas, and handlers through the in-process gateway (the real
worker, exchange and pipeline) on a node table of the test's own. Policies against real Redis and real
gateway processes are in tests/integration/test_rate_limiting.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tollway.config.loader import ConfigError, validate
from tollway.counters.metrics import REGISTRY
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.state.shared import SharedTable, current_node_table, set_node_table

ROUTE = {"name": "users", "paths": ["/users"], "service": "backend"}


@pytest.fixture(autouse=True)
def own_node_table() -> Iterator[SharedTable]:
    """Counts of one test never leak into another: a fresh node table per test."""
    previous = current_node_table()
    table = SharedTable.create(1 << 12)
    set_node_table(table)
    yield table
    set_node_table(previous)
    table.close()


def config(
    plugin: dict[str, Any], consumers: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "services": [{"name": "backend", "url": "http://127.0.0.1:9"}],
        "routes": [{**ROUTE, **extra}],
        "plugins": [plugin] if isinstance(plugin, dict) else plugin,
        "consumers": consumers or [],
    }


def decisions(decision: str, route: str = "users", plugin: str = "rate-limiting") -> int:
    return REGISTRY.counter("rate_limit_decisions_total", plugin=plugin, route=route, decision=decision).value


# -- schema ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("plugin_config", "message"),
    [
        ({}, "no limit"),
        ({"minute": -1}, "must be at least 0, not -1"),
        ({"minute": 5, "policy": "redis"}, "needs `redis"),
        ({"minute": 5, "policy": "batched", "redis": {"url": "http://x"}}, "redis.url must start with"),
        ({"minute": 5, "key": "header"}, "needs `header_name`"),
        ({"minute": 5, "key": ["ip", "nonsense"]}, "key"),
        ({"minute": 5, "limits": [{"limit": 3, "window": 60}]}, "repeated: minute"),
        ({"limits": [{"limit": 3, "window": 0}]}, "must be more than 0"),
        ({"limits": [{"limit": 3, "window": 10, "name": 'a"b'}]}, "name"),
        ({"minute": 5, "algorithm": "leaky"}, "algorithm"),
        ({"minute": 5, "on_failure": "maybe"}, "on_failure"),
        ({"minute": 5, "unknown": 1}, "unknown"),
    ],
)
def test_bad_configs_name_the_plugin_and_field(plugin_config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(config({"name": "rate-limiting", "config": plugin_config}), plugins=PLUGIN_CHECK)
    text = str(caught.value)
    assert 'plugins[0] "rate-limiting"' in text
    assert message in text


def test_concurrency_limit_schema() -> None:
    with pytest.raises(ConfigError, match="limit"):
        validate(config({"name": "concurrency-limit", "config": {}}), plugins=PLUGIN_CHECK)
    with pytest.raises(ConfigError, match="lease"):
        validate(
            config({"name": "concurrency-limit", "config": {"limit": 2, "lease": 0.1}}), plugins=PLUGIN_CHECK
        )
    with pytest.raises(ConfigError, match="needs `header_name`"):
        validate(
            config({"name": "concurrency-limit", "config": {"limit": 2, "key": "header"}}),
            plugins=PLUGIN_CHECK,
        )
    validate(config({"name": "concurrency-limit", "config": {"limit": 2, "key": "ip"}}), plugins=PLUGIN_CHECK)


# -- local policy through the gateway ----------------------------------------------------------------------
def test_five_per_minute_then_429_with_headers_and_json(harness: Any) -> None:
    gw = harness(config({"name": "rate-limiting", "config": {"minute": 5, "key": "ip"}}))
    _wait_for_fresh_window(60.0, 3.0)
    before = decisions("limited")
    for expected_remaining in (4, 3, 2, 1, 0):
        result = gw.request("GET", "/users")
        assert result.status == 200
        assert result.header("ratelimit-policy") == '"minute";q=5;w=60'
        ratelimit = result.header("ratelimit") or ""
        assert ratelimit.startswith(f'"minute";r={expected_remaining};t=')
    denied = gw.request("GET", "/users")
    assert denied.status == 429
    assert denied.upstream is None  # never reached the backend
    body = denied.json()
    assert body["message"] == "rate limit exceeded"
    assert body["request_id"] == denied.header("x-request-id")
    assert body["violated-policies"] == ["minute"]
    retry_after = int(denied.header("retry-after") or "0")
    assert 1 <= retry_after <= 60
    assert body["retry_after"] == retry_after
    assert (denied.header("ratelimit") or "").startswith('"minute";r=0;t=')
    assert denied.header("content-type") == "application/json"
    assert decisions("limited") == before + 1


def test_headers_reach_chunked_and_length_delimited_responses_alike(harness: Any) -> None:
    """Plugin-added fields ride after the backend's head, whatever framing the client gets."""
    gw = harness(config({"name": "rate-limiting", "config": {"hour": 5, "key": "ip"}}))
    chunked = gw.request(
        "GET", "/users", backend=(200, [("Transfer-Encoding", "chunked")], b"2\r\nok\r\n0\r\n\r\n")
    )
    assert chunked.status == 200
    assert chunked.header("transfer-encoding") == "chunked"
    assert chunked.header("ratelimit-policy") == '"hour";q=5;w=3600'
    assert (chunked.header("ratelimit") or "").startswith('"hour";r=4;t=')
    plain = gw.request("GET", "/users", backend=(200, [], b"ok"))
    assert (plain.header("ratelimit") or "").startswith('"hour";r=3;t=')


def test_headers_reach_the_gateways_own_answers(harness: Any, tmp_path: Path) -> None:
    """A later plugin answering itself (a proxy-cache hit) still carries the limit's fields: the lines
    rate-limiting adds whole (`add_response_lines`) become fields of a gateway-made response."""
    cache = {"name": "proxy-cache", "config": {"store": "node", "path": str(tmp_path / "c")}}
    gw = harness(config([{"name": "rate-limiting", "config": {"hour": 5, "key": "ip"}}, cache]))
    cacheable = (200, [("Content-Type", "application/json"), ("Cache-Control", "max-age=600")], b"{}")
    first = gw.request("GET", "/users", backend=cacheable)
    assert first.upstream is not None
    hit = gw.request("GET", "/users")
    assert hit.status == 200 and hit.upstream is None  # answered by the gateway, from its cache
    assert hit.header("ratelimit-policy") == '"hour";q=5;w=3600'
    assert (hit.header("ratelimit") or "").startswith('"hour";r=3;t=')
    assert hit.header("content-type") == "application/json"  # the stored fields are all still there
    assert hit.json() == {}


def test_each_client_ip_has_its_own_count(harness: Any) -> None:
    gw = harness(config({"name": "rate-limiting", "config": {"hour": 1, "key": "ip"}}))
    assert gw.request("GET", "/users", peer="10.0.0.1").status == 200
    assert gw.request("GET", "/users", peer="10.0.0.2").status == 200
    assert gw.request("GET", "/users", peer="10.0.0.1").status == 429


def test_several_limits_all_or_nothing_and_the_tightest_one_is_reported(harness: Any) -> None:
    plugin = {
        "name": "rate-limiting",
        "config": {
            "key": "ip",
            "limits": [{"limit": 100, "window": 86400}, {"limit": 2, "window": 1, "name": "burst"}],
            "headers": {"legacy": True, "per_limit": True},
        },
    }
    gw = harness(config(plugin))
    _wait_for_fresh_window(1.0, 0.3)
    first = gw.request("GET", "/users")
    assert first.header("ratelimit-policy") == '"day";q=100;w=86400, "burst";q=2;w=1'
    assert first.header("x-ratelimit-limit") == "2"  # the most restrictive: burst
    assert first.header("x-ratelimit-remaining") == "1"
    assert first.header("x-ratelimit-remaining-day") == "99"
    assert gw.request("GET", "/users").header("x-ratelimit-remaining-day") == "98"
    denied = gw.request("GET", "/users")
    assert denied.status == 429
    assert denied.json()["violated-policies"] == ["burst"]
    time.sleep(1.0 - time.time() % 1.0 + 0.01)  # the next one-second window
    after = gw.request("GET", "/users")
    assert after.status == 200
    assert after.header("x-ratelimit-remaining-day") == "97"  # the denied request was given back


def _wait_for_fresh_window(window: float, margin: float) -> None:
    """Fixed windows are aligned to the clock: start a test that must stay in one window with at least
    `margin` seconds of it left."""
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 0.01)


def test_headers_can_be_turned_off(harness: Any) -> None:
    gw = harness(config({"name": "rate-limiting", "config": {"hour": 1, "headers": {"ietf": False}}}))
    ok = gw.request("GET", "/users")
    assert ok.header("ratelimit") is None and ok.header("ratelimit-policy") is None
    denied = gw.request("GET", "/users")
    assert denied.status == 429
    assert denied.header("retry-after") is not None  # a 429 always says when to come back


def test_key_by_consumer_falls_back_to_ip_for_anonymous_clients(harness: Any) -> None:
    consumers = [
        {"username": "alice", "credentials": {"key-auth": [{"key": "key-a"}]}},
        {"username": "bob", "credentials": {"key-auth": [{"key": "key-b"}]}},
        {"username": "guest"},
    ]
    plugins = [
        {"name": "key-auth", "config": {"anonymous": "guest"}},
        {"name": "rate-limiting", "config": {"hour": 1, "key": "consumer"}},
    ]
    gw = harness(config(plugins, consumers))
    assert gw.request("GET", "/users", {"apikey": "key-a"}).status == 200
    assert gw.request("GET", "/users", {"apikey": "key-a"}, peer="10.0.0.7").status == 429  # alice, anywhere
    assert gw.request("GET", "/users", {"apikey": "key-b"}).status == 200
    # the anonymous consumer is a consumer: all anonymous clients share the guest's count
    assert gw.request("GET", "/users", peer="10.0.0.8").status == 200
    assert gw.request("GET", "/users", peer="10.0.0.9").status == 429


def test_key_by_header_and_missing_header_falls_back_to_ip(harness: Any) -> None:
    plugin = {"name": "rate-limiting", "config": {"hour": 1, "key": "header", "header_name": "X-Tenant"}}
    gw = harness(config(plugin))
    assert gw.request("GET", "/users", {"X-Tenant": "a"}).status == 200
    assert gw.request("GET", "/users", {"X-Tenant": "a"}, peer="10.1.1.1").status == 429
    assert gw.request("GET", "/users", {"X-Tenant": "b"}).status == 200
    assert gw.request("GET", "/users", peer="10.1.1.2").status == 200
    assert gw.request("GET", "/users", peer="10.1.1.2").status == 429


def test_combined_key_counts_each_path_per_client(harness: Any) -> None:
    route = {"paths": ["/users"], "name": "users", "service": "backend"}
    plugin = {"name": "rate-limiting", "config": {"hour": 1, "key": ["ip", "path"]}}
    gw = harness({**config(plugin), "routes": [route]})
    assert gw.request("GET", "/users/1").status == 200
    assert gw.request("GET", "/users/2").status == 200
    assert gw.request("GET", "/users/1").status == 429


def test_cost_counts_several_units(harness: Any) -> None:
    gw = harness(config({"name": "rate-limiting", "config": {"hour": 5, "cost": 2}}))
    assert gw.request("GET", "/users").status == 200
    assert gw.request("GET", "/users").status == 200
    assert gw.request("GET", "/users").status == 429  # 4 used, 2 more would make 6


def test_gcra_refills_over_time(harness: Any) -> None:
    plugin = {
        "name": "rate-limiting",
        "config": {"limits": [{"limit": 10, "window": 1, "burst": 2}], "algorithm": "gcra"},
    }
    gw = harness(config(plugin))
    assert [gw.request("GET", "/users").status for _ in range(3)] == [200, 200, 429]
    time.sleep(0.25)  # 10/s refills one unit every 0.1 s
    assert gw.request("GET", "/users").status == 200


def test_counts_survive_a_config_reload_and_instances_do_not_share(harness: Any) -> None:
    """Counters belong to where the instance is attached; a rebuilt config (same attachment) keeps them,
    another route's instance counts on its own."""
    two_routes = {
        "services": [{"name": "backend", "url": "http://127.0.0.1:9"}],
        "routes": [
            {
                "name": "a",
                "paths": ["/a"],
                "service": "backend",
                "plugins": [{"name": "rate-limiting", "config": {"hour": 1, "key": "ip"}}],
            },
            {
                "name": "b",
                "paths": ["/b"],
                "service": "backend",
                "plugins": [{"name": "rate-limiting", "config": {"hour": 1, "key": "ip"}}],
            },
        ],
    }
    gw = harness(two_routes)
    assert gw.request("GET", "/a").status == 200
    assert gw.request("GET", "/b").status == 200
    assert gw.request("GET", "/a").status == 429
    reloaded = harness(two_routes)  # a new config version: new plugin objects, same node table
    assert reloaded.request("GET", "/a").status == 429
    assert reloaded.request("GET", "/b").status == 429


def test_a_global_instance_counts_once_across_routes(harness: Any) -> None:
    cfg = {
        "services": [{"name": "backend", "url": "http://127.0.0.1:9"}],
        "routes": [
            {"name": "a", "paths": ["/a"], "service": "backend"},
            {"name": "b", "paths": ["/b"], "service": "backend"},
        ],
        "plugins": [{"name": "rate-limiting", "config": {"hour": 2, "key": "ip"}}],
    }
    gw = harness(cfg)
    assert gw.request("GET", "/a").status == 200
    assert gw.request("GET", "/b").status == 200
    assert gw.request("GET", "/a").status == 429
    assert decisions("limited", route="a") >= 1


# -- concurrency-limit -------------------------------------------------------------------------------------
def test_concurrency_slot_is_released_when_the_request_ends(harness: Any) -> None:
    gw = harness(config({"name": "concurrency-limit", "config": {"limit": 1, "key": "ip"}}))
    for _ in range(3):  # sequential requests never overlap: each gets the slot back
        result = gw.request("GET", "/users")
        assert result.status == 200
        assert result.header("ratelimit-policy") == '"concurrency";q=1;qu="concurrent-requests"'


def test_concurrency_limit_refuses_while_a_request_is_in_flight(harness: Any) -> None:
    from tollway.plugins.builtin.concurrency_limit import ConcurrencyLimit

    gw = harness(config({"name": "concurrency-limit", "config": {"limit": 1, "key": "ip"}}))
    plugin = next(
        hook.__self__
        for route in gw.worker.snapshot.routes
        for hook in (route.pipeline.access if route.pipeline else ())
        if isinstance(hook.__self__, ConcurrencyLimit)
    )
    policy = plugin._held.policy
    assert policy.check("127.0.0.1", time.time()).allowed  # a long request holds the only slot
    denied = gw.request("GET", "/users")
    assert denied.status == 429
    assert denied.json()["violated-policies"] == ["concurrency"]
    assert denied.header("retry-after") == "1"
    policy.release("127.0.0.1", time.time())
    assert gw.request("GET", "/users").status == 200
    assert gw.request("GET", "/users").status == 200  # and the gateway released its own slot


# -- the refusal's status and message ------------------------------------------------------------------------
def test_rejection_status_and_message_are_configurable(harness: Any) -> None:
    gw = harness(
        config(
            {
                "name": "rate-limiting",
                "config": {"minute": 0, "key": "ip", "status": 503, "message": "slow down, please"},
            }
        )
    )
    before = decisions("limited")
    denied = gw.request("GET", "/users")
    assert denied.status == 503
    assert denied.upstream is None
    assert denied.json()["message"] == "slow down, please"
    assert denied.json()["violated-policies"] == ["minute"]
    assert denied.header("retry-after") is not None
    assert decisions("limited") == before + 1  # still counted as limited, not as a Redis error


def test_concurrency_limit_rejection_status_and_message(harness: Any) -> None:
    gw = harness(
        config(
            {
                "name": "concurrency-limit",
                "config": {"limit": 0, "key": "ip", "status": 418, "message": "busy"},
            }
        )
    )
    denied = gw.request("GET", "/users")
    assert (denied.status, denied.json()["message"]) == (418, "busy")
    assert denied.upstream is None


@pytest.mark.parametrize("bad", [{"status": 200}, {"status": 600}, {"message": ""}, {"message": "x" * 201}])
def test_rejection_status_and_message_are_checked(bad: dict[str, Any]) -> None:
    for name, limit in (("rate-limiting", {"minute": 1}), ("concurrency-limit", {"limit": 1})):
        with pytest.raises(ConfigError, match=r"status|message"):
            validate(config({"name": name, "config": {**limit, **bad}}), plugins=PLUGIN_CHECK)
