"""Balancers and clusters without sockets: distribution, consistent hashing, backups, retry picks, and
state that survives a config rebuild."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tollway.config.loader import load_text
from tollway.upstream.balancers import (
    ConsistentHash,
    LatencyP2C,
    LeastConnections,
    RoundRobin,
    WeightedRandom,
    make_balancer,
    seed,
)
from tollway.upstream.cluster import Cluster, UpstreamState
from tollway.upstream.pool import Pool, PoolSettings
from tollway.upstream.target import FAILED, NEUTRAL, OK, Target
from tollway.upstream.worker_registry import UpstreamRegistry

WEIGHTS = [100, 200, 300, 400]  # shares 10%, 20%, 30%, 40%
PICKS = 10_000


class Ctx:
    """What balancers read from a request."""

    def __init__(
        self,
        ip: str = "10.0.0.1",
        path: str = "/",
        headers: dict[str, str] | None = None,
        consumer: Any = None,
    ) -> None:
        self.client_ip = ip
        self.path = path
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.consumer = consumer

    def get_header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    seed(20261126)


def make_targets(loop: asyncio.AbstractEventLoop, weights: list[int], backups: int = 0) -> list[Target]:
    targets = []
    for i, weight in enumerate(weights):
        pool = Pool(loop, "127.0.0.1", 9000 + i, PoolSettings())
        targets.append(Target("127.0.0.1", 9000 + i, weight, pool, backup=i >= len(weights) - backups))
    return targets


def make_cluster(loop: asyncio.AbstractEventLoop, algorithm: str, weights: list[int], **kw: Any) -> Cluster:
    targets = make_targets(loop, weights, kw.pop("backups", 0))
    balancers = make_balancer(algorithm, **kw), make_balancer(algorithm, **kw)
    return Cluster("u", targets, UpstreamState("u"), *balancers)


def shares(counts: Counter[str], cluster: Cluster) -> list[float]:
    total = sum(counts.values())
    return [counts[t.label] / total for t in cluster.targets]


def expected_shares(weights: list[int]) -> list[float]:
    return [w / sum(weights) for w in weights]


def assert_within_2_percent(actual: list[float], expected: list[float]) -> None:
    for got, want in zip(actual, expected, strict=True):
        assert abs(got - want) <= 0.02, (actual, expected)


@pytest.mark.parametrize("algorithm", ["round-robin", "random", "least-connections", "latency"])
def test_each_balancer_gives_every_target_its_weight_share(loop, algorithm):
    cluster = make_cluster(loop, algorithm, WEIGHTS)
    counts: Counter[str] = Counter()
    ctx = Ctx()
    for _ in range(PICKS):
        target = cluster.pick(ctx)
        assert target is not None
        counts[target.label] += 1
        cluster.release(target, ctx, OK, 0.005)
    assert_within_2_percent(shares(counts, cluster), expected_shares(WEIGHTS))


@pytest.mark.parametrize("hash_on", ["ip", "header", "cookie", "consumer", "path"])
def test_consistent_hashing_spreads_keys_by_weight(loop, hash_on):
    cluster = make_cluster(loop, "consistent-hashing", WEIGHTS, hash_on=hash_on, hash_key="k")
    counts: Counter[str] = Counter()
    for i in range(PICKS):
        key = f"key-{i}"
        ctx = Ctx(
            ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
            path=f"/items/{i}",
            headers={"k": key, "cookie": f"a=1; k={key}"},
            consumer=type("C", (), {"username": key})(),
        )
        target = cluster.pick(ctx)
        assert target is not None
        counts[target.label] += 1
        cluster.release(target, ctx, OK, 0.005)
    assert_within_2_percent(shares(counts, cluster), expected_shares(WEIGHTS))


def test_least_connections_with_requests_in_flight_follows_weights(loop):
    """Without releases, picks fill targets in proportion to weight: in-flight/weight stays level."""
    cluster = make_cluster(loop, "least-connections", WEIGHTS)
    counts: Counter[str] = Counter()
    for _ in range(PICKS):
        target = cluster.pick(Ctx())
        assert target is not None
        counts[target.label] += 1
    assert_within_2_percent(shares(counts, cluster), expected_shares(WEIGHTS))
    assert [t.state.inflight for t in cluster.targets] == [1000, 2000, 3000, 4000]


def test_least_connections_prefers_the_least_loaded_target(loop):
    cluster = make_cluster(loop, "least-connections", [100, 100, 100])
    busy = [cluster.pick(Ctx()) for _ in range(3)]  # one each
    assert {t.label for t in busy if t} == {t.label for t in cluster.targets}
    cluster.release(cluster.targets[1], Ctx(), OK, 0.01)  # the second target finishes
    assert cluster.pick(Ctx()) is cluster.targets[1]


def test_round_robin_is_smooth(loop):
    cluster = make_cluster(loop, "round-robin", [5, 1, 1])
    order = []
    for _ in range(7):
        target = cluster.pick(Ctx())
        assert target is not None
        order.append("abc"[cluster.targets.index(target)])
        cluster.release(target, Ctx(), OK, 0.0)
    assert "".join(order) == "aabacaa"


def test_latency_balancer_prefers_the_faster_target(loop):
    cluster = make_cluster(loop, "latency", [100, 100])
    fast, slow = cluster.targets
    counts: Counter[str] = Counter()
    for _ in range(2000):
        target = cluster.pick(Ctx())
        assert target is not None
        counts[target.label] += 1
        cluster.release(target, Ctx(), OK, 0.001 if target is fast else 0.050)
    assert counts[fast.label] > 3 * counts[slow.label]


def test_latency_balancer_counts_failures_as_slow(loop):
    cluster = make_cluster(loop, "latency", [100, 100])
    good, bad = cluster.targets
    counts: Counter[str] = Counter()
    for _ in range(1000):
        target = cluster.pick(Ctx())
        assert target is not None
        counts[target.label] += 1
        cluster.release(target, Ctx(), OK if target is good else FAILED, 0.002 if target is good else -1.0)
    assert counts[good.label] > 10 * counts[bad.label]


def test_consistent_hashing_moves_few_keys_when_a_target_joins(loop):
    four = ConsistentHash("header", "k")
    targets = make_targets(loop, [100] * 5)
    four.build(targets[:4])
    four.reset(targets[:4])
    five = ConsistentHash("header", "k")
    five.build(targets)
    five.reset(targets)
    keys = [f"user-{i}".encode() for i in range(PICKS)]
    before = [four.lookup(k) for k in keys]
    after = [five.lookup(k) for k in keys]
    moved = sum(1 for a, b in zip(before, after, strict=True) if a is not b)
    assert moved / len(keys) <= 0.25 + 0.03
    # Only keys that go to the new target move: none moves between the old four.
    assert all(b is targets[4] for a, b in zip(before, after, strict=True) if a is not b)


def test_consistent_hashing_is_the_same_in_every_worker(loop):
    """Ring positions come from target names, not from process-randomised hashes."""
    first, second = ConsistentHash(), ConsistentHash()
    for balancer in (first, second):
        targets = make_targets(loop, [100] * 3)
        balancer.build(targets)
        balancer.reset(targets)
    for i in range(200):
        key = f"10.1.{i}.7".encode()
        a, b = first.lookup(key), second.lookup(key)
        assert a is not None and b is not None and a.label == b.label


def test_consistent_hashing_walks_past_unavailable_targets_and_gets_keys_back(loop):
    cluster = make_cluster(loop, "consistent-hashing", [100] * 4, hash_on="path")
    ctxs = [Ctx(path=f"/p/{i}") for i in range(2000)]
    before = [cluster.pick(c) for c in ctxs]
    down = cluster.targets[2]
    down.state.healthy = False
    down.state.update_available()
    cluster.upstream.changed()
    during = [cluster.pick(c) for c in ctxs]
    assert down not in during
    assert all(b is d for b, d in zip(before, during, strict=True) if b is not down)  # others keep their keys
    down.state.healthy = True
    down.state.update_available()
    cluster.upstream.changed()
    assert [cluster.pick(c) for c in ctxs] == before


def test_cookie_and_missing_key_fall_back_to_client_ip(loop):
    balancer = ConsistentHash("cookie", "session")
    assert balancer.key_of(Ctx(ip="10.9.9.9", headers={"cookie": "a=b; session=xyz"})) == b"xyz"
    assert balancer.key_of(Ctx(ip="10.9.9.9", headers={"cookie": "a=b"})) == b"10.9.9.9"
    assert ConsistentHash("header", "X-User").key_of(Ctx(ip="1.2.3.4")) == b"1.2.3.4"


def test_backups_take_traffic_only_while_every_primary_is_down(loop):
    cluster = make_cluster(loop, "round-robin", [100, 100, 100], backups=1)
    primary_a, primary_b, backup = cluster.targets
    assert backup.backup and not primary_a.backup
    picked = {cluster.pick(Ctx()) for _ in range(10)}
    assert backup not in picked
    for target in (primary_a, primary_b):
        target.state.ejected = True
        target.state.update_available()
        cluster.upstream.changed()
        if target is primary_a:
            assert {cluster.pick(Ctx()) for _ in range(10)} == {primary_b}
    assert {cluster.pick(Ctx()) for _ in range(10)} == {backup}
    backup.state.healthy = False
    backup.state.update_available()
    cluster.upstream.changed()
    assert cluster.pick(Ctx()) is None
    assert cluster.upstream.no_target == 1


def test_retry_picks_another_target_then_a_backup(loop):
    cluster = make_cluster(loop, "least-connections", [100, 100, 100], backups=1)
    a, b, backup = cluster.targets
    assert cluster.pick_retry(Ctx(), [a]) is b
    assert cluster.pick_retry(Ctx(), [a, b]) is backup
    assert cluster.pick_retry(Ctx(), [a, b, backup]) is None


@pytest.mark.parametrize(
    "balancer", [RoundRobin(), WeightedRandom(), LeastConnections(), LatencyP2C(), ConsistentHash()]
)
def test_no_available_target_is_none(loop, balancer):
    balancer.build([])
    balancer.reset([])
    assert balancer.pick(Ctx(), None) is None


CONFIG = """
upstreams:
  - name: users
    algorithm: least-connections
    targets: [{target: "127.0.0.1:9001"}, {target: "127.0.0.1:9002"}, {target: "127.0.0.1:9003"}]
services: [{name: users, upstream: users}]
routes: [{name: users, service: users, paths: ["/"]}]
"""


def _build(registry: UpstreamRegistry, loop: asyncio.AbstractEventLoop, text: str) -> Cluster:
    pools: dict[tuple[Any, ...], Pool] = {}

    def pool_for(host: str, port: int, tls: Any, sni: Any, settings: Any = None, owner: Any = None) -> Pool:
        return pools.setdefault((host, port, owner), Pool(loop, host, port, settings or PoolSettings()))

    config = load_text(text)
    cluster = registry.upstream_cluster(config.upstreams[0], pool_for)
    registry.activate([cluster])
    return cluster


def test_in_flight_counts_survive_a_config_rebuild(loop):
    registry = UpstreamRegistry(loop)
    old = _build(registry, loop, CONFIG)
    busy = old.pick(Ctx())
    assert busy is not None and busy.state.inflight == 1
    changed = CONFIG.replace("least-connections", "least-connections\n    retries: {attempts: 1}")
    new = _build(registry, loop, changed)
    assert new is not old
    same = next(t for t in new.targets if t.label == busy.label)
    assert same.state is busy.state and same.state.inflight == 1
    # The rebuilt balancer sees the request in flight: the next two picks go to the idle targets.
    picks = {new.pick(Ctx()), new.pick(Ctx())}
    assert same not in picks
    old.release(busy, Ctx(), OK, 0.01)  # a request started before the reload ends after it
    assert same.state.inflight == 0
    registry.close()


def test_state_of_removed_targets_is_dropped(loop):
    registry = UpstreamRegistry(loop)
    _build(registry, loop, CONFIG)
    _build(registry, loop, CONFIG.replace(', {target: "127.0.0.1:9003"}', ""))
    assert sorted(a for _, a in registry.states["users"].targets) == ["127.0.0.1:9001", "127.0.0.1:9002"]
    registry.close()


def test_release_outcomes_drive_passive_counters(loop):
    cluster = make_cluster(loop, "round-robin", [100])
    target = cluster.pick(Ctx())
    assert target is not None
    cluster.release(target, Ctx(), FAILED, -1.0)
    assert target.state.failures == 1 and target.state.failed == 1
    target = cluster.pick(Ctx())
    assert target is not None
    cluster.release(target, Ctx(), NEUTRAL, -1.0)  # a client that left says nothing about the target
    assert target.state.failures == 1
    target = cluster.pick(Ctx())
    assert target is not None
    cluster.release(target, Ctx(), OK, 0.01)
    assert target.state.failures == 0 and target.state.inflight == 0
    assert repr(target.state).startswith("<TargetState ")
