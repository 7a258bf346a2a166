"""The upstream part of the config schema: defaults as documented, errors that name the field, and the
worker registry's start-up state."""

from __future__ import annotations

import asyncio

import pytest

from tollway.config.loader import load_text
from tollway.config.schema import Upstream
from tollway.errors import ConfigError
from tollway.observability.tracecontext import TraceSettings
from tollway.proxy.snapshot import build_snapshot
from tollway.upstream.pool import Pool, PoolSettings
from tollway.upstream.worker_registry import UpstreamRegistry, target_records


def test_defaults_are_the_documented_ones():
    upstream = Upstream.model_validate({"name": "u", "targets": [{"target": "10.0.0.1:80"}]})
    assert upstream.algorithm == "round-robin" and upstream.hash_on == "ip"
    assert upstream.targets[0].weight == 100 and not upstream.targets[0].backup
    assert upstream.healthchecks.active is None
    passive = upstream.healthchecks.passive
    assert (passive.enabled, passive.consecutive_failures) == (True, 5)
    assert passive.statuses == [500, 502, 503, 504]
    assert (passive.base_ejection_time, passive.max_ejection_time) == (30, 300)
    assert passive.max_ejection_percent == 50
    retries = upstream.retries
    assert (retries.attempts, retries.retry_on, retries.statuses) == (3, ["error", "timeout"], [])
    assert retries.replay_limit == 65536
    assert (retries.budget.ratio, retries.budget.min_per_second, retries.budget.window) == (0.2, 10, 10)
    assert (retries.backoff.base, retries.backoff.max) == (0.025, 0.25)
    limits = upstream.circuit_breaker
    assert (limits.max_connections, limits.max_pending_requests) == (0, 0)
    pool = upstream.pool
    assert (pool.max_idle, pool.idle_timeout, pool.max_requests) == (256, 60, 10000)
    assert (
        upstream.dns.record_types,
        upstream.dns.min_ttl,
        upstream.dns.max_ttl,
    ) == (["A", "AAAA"], 1, 300)
    active = Upstream.model_validate(
        {"name": "u", "targets": [{"target": "10.0.0.1:80"}], "healthchecks": {"active": {}}}
    ).healthchecks.active
    assert active is not None
    assert (active.type, active.http_path, active.interval, active.timeout) == ("http", "/", 5, 1)
    assert (active.healthy_threshold, active.unhealthy_threshold, active.unhealthy_interval) == (2, 3, None)
    statuses = active.expected_statuses
    assert 200 in statuses and 399 in statuses and 404 not in statuses


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            "{name: u, algorithm: consistent-hashing, hash_on: header, targets: [{target: 'a:1'}]}",
            "upstreams[0] \"u\": hash_key: required when hash_on is 'header'",
        ),
        (
            "{name: u, targets: [{target: 'a:1'}, {target: 'a:1'}]}",
            "targets[1]: duplicate target 'a:1' (give one a distinct name)",
        ),
        ("{name: u, targets: [{target: nohost}]}", "target: 'nohost' must be host:port"),
        ("{name: u, targets: [{target: '_x._tcp.a:80', srv: true}]}", "an SRV name has no port"),
        (
            "{name: u, algorithm: fastest, targets: [{target: 'a:1'}]}",
            "algorithm: must be one of 'round-robin'",
        ),
        (
            "{name: u, targets: [{target: 'a:1'}], healthchecks: {active: {expected_statuses: [700]}}}",
            "700: a status code is from 100 to 599",
        ),
        (
            "{name: u, targets: [{target: 'a:1'}], healthchecks: {active: {http_path: health}}}",
            'http_path: must start with "/"',
        ),
        (
            "{name: u, targets: [{target: 'a:1'}], healthchecks: {passive: {base_ejection_time: 60s, "
            "max_ejection_time: 10s}}}",
            "max_ejection_time: must not be less than base_ejection_time",
        ),
        (
            "{name: u, targets: [{target: 'a:1'}], retries: {backoff: {base: 1s, max: 10ms}}}",
            "max: must not be less than base",
        ),
        ("{name: u, targets: [{target: 'a:1'}], retries: {retry_on: [reset]}}", "retries.retry_on[0]"),
        (
            "{name: u, targets: [{target: 'a:1'}], circuit_breaker: {max_conections: 5}}",
            "circuit_breaker.max_conections: unknown field",
        ),
    ],
)
def test_errors_name_the_field(upstream, message):
    with pytest.raises(ConfigError) as err:
        load_text(f"upstreams:\n  - {upstream}\n", "gw.yaml")
    text = "\n".join(err.value.issues)
    assert message in text, text
    assert text.startswith("gw.yaml:2: upstreams[0]")


def test_nameservers_are_checked():
    with pytest.raises(ConfigError, match=r"gateway.dns.nameservers: 'dns.example': must be an IP address"):
        load_text("gateway: {dns: {nameservers: [dns.example]}}")
    assert load_text("gateway: {dns: {nameservers: ['10.0.0.2', '[::1]:5353']}}").gateway.dns.nameservers


def test_target_records():
    u = Upstream.model_validate(
        {
            "name": "u",
            "targets": [
                {"target": "10.0.0.1:80", "weight": 5},
                {"target": "api.test:8080", "backup": True},
                {"target": "_s._tcp.api.test", "srv": True},
            ],
        }
    )
    ip, name, srv = u.targets
    assert target_records(ip, None) == [("10.0.0.1", 80, 5, False)]
    assert target_records(name, None) == [("api.test", 8080, 100, True)]  # by name until DNS answers
    assert target_records(name, [("10.0.0.7", 8080, -1, False)]) == [("10.0.0.7", 8080, 100, True)]
    assert target_records(srv, None) == []
    assert target_records(srv, [("10.0.0.8", 9000, 7, True)]) == [("10.0.0.8", 9000, 7, True)]


def test_a_new_worker_starts_with_the_supervisors_state():
    """DNS answers, health verdicts and running ejections arrive before the first config."""
    loop = asyncio.new_event_loop()
    try:
        registry = UpstreamRegistry(loop)
        registry.on_message(
            (
                "upstream_state",
                {("u", "api.test:80"): [("10.0.0.7", 80, -1, False), ("10.0.0.8", 80, -1, False)]},
                {("u", "api.test:80", "10.0.0.7:80"): False},
                {("u", "api.test:80", "10.0.0.8:80"): (12.0, 2, "5 consecutive failures")},
            )
        )
        config = load_text(
            "upstreams: [{name: u, targets: [{target: 'api.test:80'}]}]\n"
            "services: [{name: s, upstream: u}]\nroutes: [{name: r, service: s, paths: [/]}]"
        )

        def pool_for(host, port, tls, sni, settings=None, owner=None):
            return Pool(loop, host, port, settings or PoolSettings())

        trace = TraceSettings.from_config(config.gateway.tracing)
        snapshot = build_snapshot(config, 1, pool_for, registry, trace=trace)
        registry.activate(snapshot.clusters)
        cluster = snapshot.services["s"].cluster
        assert [t.label for t in cluster.targets] == ["10.0.0.7:80", "10.0.0.8:80"]
        unhealthy, ejected = cluster.targets
        assert not unhealthy.state.healthy and ejected.state.ejected and ejected.state.ejections == 2
        assert cluster.pick(object()) is None  # neither is available
        registry.on_message(("upstream_dns", "u", "api.test:80", [("10.0.0.9", 80, -1, False)]))
        target = cluster.pick(object())
        assert target is not None and target.label == "10.0.0.9:80"  # the cluster followed DNS in place
        stats = registry.stats()["u"]
        assert stats["targets"][("api.test:80", "10.0.0.9:80")]["in_flight"] == 1
        registry.close()
    finally:
        loop.close()
