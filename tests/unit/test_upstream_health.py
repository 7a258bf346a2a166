"""Health verdicts, passive ejection and the retry budget, on a fake clock (no sockets, no sleeping)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tollway.config.schema import ActiveHealthcheck
from tollway.upstream.balancers import LeastConnections, seed
from tollway.upstream.cluster import Breaker, Cluster, UpstreamState
from tollway.upstream.connection import UpstreamConnection
from tollway.upstream.outlier import Outlier
from tollway.upstream.pool import Pool, PoolSettings
from tollway.upstream.retry import RetryBudget, RetryPolicy
from tollway.upstream.supervisor_health import CheckResult, CheckState
from tollway.upstream.supervisor_manager import UpstreamManager
from tollway.upstream.target import FAILED, OK, Target
from tollway.upstream.worker_registry import UpstreamRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRegistry(UpstreamRegistry):
    """A registry whose clock the test moves, and whose messages to the supervisor are recorded."""

    def __init__(self, clock: Clock) -> None:
        self.sent: list[tuple[Any, ...]] = []
        super().__init__(None, self.sent.append)
        self.clock = clock

    def now(self) -> float:
        return self.clock()


class Ctx:
    client_ip = "10.0.0.1"
    path = "/"
    consumer = None

    def get_header(self, name: str) -> None:
        return None


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def cluster_of(
    loop: asyncio.AbstractEventLoop, registry: UpstreamRegistry, n: int, **outlier: Any
) -> Cluster:
    state = registry.upstream_state("u")
    targets = [
        Target(
            "127.0.0.1",
            9000 + i,
            100,
            Pool(loop, "127.0.0.1", 9000 + i, PoolSettings()),
            state=state.target_state(f"t{i}", f"127.0.0.1:{9000 + i}"),
            key=f"t{i}",
        )
        for i in range(n)
    ]
    balancers = LeastConnections(), LeastConnections()
    return Cluster("u", targets, state, *balancers, RetryPolicy(), Outlier(**outlier))


def fail(cluster: Cluster, target: Target, times: int) -> None:
    for _ in range(times):
        target.state.inflight += 1
        cluster.release(target, Ctx(), FAILED, -1.0)


# -- active checks: verdicts ------------------------------------------------------------------------------
def result(ok: bool) -> CheckResult:
    return CheckResult(ok, 200 if ok else None, None if ok else "connection refused")


def test_thresholds_flip_the_verdict():
    state = CheckState()
    assert state.healthy
    assert state.record(result(False), 2, 3) is None
    assert state.record(result(False), 2, 3) is None
    assert state.record(result(False), 2, 3) is False  # third failure in a row
    assert state.record(result(False), 2, 3) is None  # no repeat of a verdict
    assert state.record(result(True), 2, 3) is None
    assert state.record(result(False), 2, 3) is None  # a failure resets the count of passes
    assert state.record(result(True), 2, 3) is None
    assert state.record(result(True), 2, 3) is True
    assert state.successes == 2 and state.failures == 0 and state.probes == 8


def test_only_unhealthy_targets_are_probed_faster():
    settings = ActiveHealthcheck(interval=5, unhealthy_interval=0.5)
    state = CheckState()
    assert state.next_interval(settings) == 5
    state.healthy = False
    assert state.next_interval(settings) == 0.5
    assert CheckState(healthy=False).next_interval(ActiveHealthcheck(interval=5)) == 5
    assert CheckState().next_interval(settings, ejected=True) == 0.5


def test_status_lists_accept_classes():
    assert ActiveHealthcheck(expected_statuses=[204, "3xx"]).expected_statuses == [204, *range(300, 400)]
    with pytest.raises(ValueError, match="status code"):
        ActiveHealthcheck(expected_statuses=["6xx"])


# -- active checks in the supervisor: broadcasts and ending ejections ---------------------------------
def test_manager_broadcasts_verdicts_and_ends_an_ejection_after_passing_checks(monkeypatch):
    sent: list[tuple[Any, ...]] = []
    manager = UpstreamManager(lambda message, skip: sent.append((message, skip)), lambda: [])
    clock = Clock()
    monkeypatch.setattr("tollway.upstream.supervisor_manager.time.monotonic", clock)
    settings = ActiveHealthcheck(healthy_threshold=2, unhealthy_threshold=2)
    key = ("u", "t0", "127.0.0.1:9000")
    state = CheckState()
    manager.checks[key] = state
    # Worker 1 ejects the target: every other worker is told.
    manager.on_worker_message(1, ("upstream_ejected", *key, 30.0, 1, "5 consecutive failures"))
    assert sent[-1] == (("upstream_eject", *key, 30.0, 1, "5 consecutive failures"), 1)
    for _ in range(2):
        manager.record_check(key, state, result(False), settings)
    assert sent[-1] == (("upstream_health", *key, False), None)
    manager.record_check(key, state, result(True), settings)
    assert manager.ejection(key) is not None
    manager.record_check(key, state, result(True), settings)  # healthy again, and the ejection is over
    assert [m for m, _ in sent[-2:]] == [("upstream_health", *key, True), ("upstream_uneject", *key)]
    assert manager.ejection(key) is None
    # An ejection also ends by itself when its time is up.
    manager.on_worker_message(2, ("upstream_ejected", *key, 30.0, 2, "5 consecutive failures"))
    clock.now += 31
    assert manager.ejection(key) is None
    assert manager.state_message()[3] == {}


# -- passive: ejection -------------------------------------------------------------------------------------
def test_consecutive_failures_eject_and_tell_the_supervisor(loop):
    clock = Clock()
    registry = FakeRegistry(clock)
    cluster = cluster_of(loop, registry, 4, threshold=3, base_time=10, max_time=100)
    bad = cluster.targets[0]
    fail(cluster, bad, 2)
    bad.state.inflight += 1
    cluster.release(bad, Ctx(), OK, 0.01)  # a success resets the count
    fail(cluster, bad, 2)
    assert not bad.state.ejected
    fail(cluster, bad, 1)
    assert bad.state.ejected and not bad.state.available
    assert bad.state.ejected_until == clock.now + 10
    assert registry.sent == [
        ("upstream_ejected", "u", "t0", "127.0.0.1:9000", 10, 1, "3 consecutive failures")
    ]
    assert all(cluster.pick(Ctx()) is not bad for _ in range(20))


def test_ejection_time_grows_with_repeat_offences_and_is_forgiven(loop):
    clock = Clock()
    registry = FakeRegistry(clock)
    cluster = cluster_of(loop, registry, 4, threshold=1, base_time=10, max_time=25)
    bad = cluster.targets[0]
    durations = []
    for _ in range(4):
        fail(cluster, bad, 1)
        durations.append(registry.sent[-1][4])
        clock.now += 1
        registry._restore(cluster.upstream, bad.state)  # the ejection ends (as its timer would)
    assert durations == [10, 20, 25, 25]  # n * base, capped
    clock.now += 35  # back in rotation for three and a half base periods: three of four offences forgiven
    fail(cluster, bad, 1)
    assert registry.sent[-1][4] == 20


def test_ejections_are_capped_and_never_empty_the_upstream(loop):
    registry = FakeRegistry(Clock())
    cluster = cluster_of(loop, registry, 4, threshold=1, max_percent=50)
    for target in cluster.targets:
        fail(cluster, target, 1)
    assert [t.state.ejected for t in cluster.targets] == [True, True, False, False]
    single = cluster_of(loop, FakeRegistry(Clock()), 1, threshold=1, max_percent=100)
    fail(single, single.targets[0], 3)
    assert not single.targets[0].state.ejected  # the only target is never ejected (as nginx)
    off = cluster_of(loop, FakeRegistry(Clock()), 4, threshold=1, max_percent=0)
    fail(off, off.targets[0], 3)
    assert not off.targets[0].state.ejected


def test_an_ejection_from_another_worker_and_its_end(loop):
    clock = Clock()
    registry = FakeRegistry(clock)
    cluster = cluster_of(loop, registry, 3)
    registry.activate([cluster])
    registry.on_message(("upstream_eject", "u", "t1", "127.0.0.1:9001", 30.0, 2, "5 consecutive failures"))
    target = cluster.targets[1]
    assert target.state.ejected and target.state.ejections == 2
    assert all(cluster.pick(Ctx()) is not target for _ in range(10))
    registry.on_message(("upstream_uneject", "u", "t1", "127.0.0.1:9001"))
    assert target.state.available
    registry.on_message(("upstream_health", "u", "t2", "127.0.0.1:9002", False))
    assert not cluster.targets[2].state.available
    assert registry.sent == []  # none of that is echoed back


def test_ejection_timers_end_ejections(loop):
    registry = UpstreamRegistry(loop)
    cluster = cluster_of(loop, registry, 3, threshold=1, base_time=0.05)
    fail(cluster, cluster.targets[0], 1)
    assert cluster.targets[0].state.ejected
    loop.run_until_complete(asyncio.sleep(0.2))
    assert cluster.targets[0].state.available
    registry.close()


# -- retry budget and backoff -------------------------------------------------------------------------------
def test_budget_allows_a_share_of_requests_plus_a_reserve():
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10)  # reserve: 5 retries
    assert [budget.withdraw() for _ in range(6)] == [True] * 5 + [False]
    budget.requests += 100  # 100 requests: 20 more retries
    assert sum(budget.withdraw() for _ in range(30)) == 20
    assert budget.allowed() == 0


def test_budget_window_slides():
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=3)  # reserve: 0.3 -> no retry at all
    assert not budget.withdraw()
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=3)
    budget.requests = 2
    assert budget.withdraw() and budget.withdraw() and not budget.withdraw()
    budget.tick()
    budget.tick()  # two seconds on: still inside the window
    assert not budget.withdraw()
    budget.tick()  # three seconds on: the old second has left the window
    assert budget.total_requests() == 0 and budget.total_retries() == 0
    budget.requests = 1
    assert budget.withdraw()
    assert "RetryBudget" in repr(budget)


def test_backoff_is_jittered_exponential_and_capped():
    seed(7)
    policy = RetryPolicy(backoff_base=0.025, backoff_max=0.25)
    for retry, cap in ((1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (30, 0.25)):
        delays = [policy.backoff(retry) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > cap / 2  # spread over the range, not a constant
    assert RetryPolicy(backoff_base=0, backoff_max=0).backoff(3) == 0


def test_retry_statuses():
    policy = RetryPolicy(statuses=frozenset({502, 503}))
    assert policy.retries_status(503) and not policy.retries_status(200) and not policy.retries_status(500)
    assert not RetryPolicy().retries_status(503)


# -- circuit breaker -----------------------------------------------------------------------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        raise AssertionError("nothing is written on an idle connection")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def test_breaker_limits_and_makes_room_by_closing_idle_connections(loop):
    a = Pool(loop, "127.0.0.1", 1, PoolSettings())
    b = Pool(loop, "127.0.0.1", 2, PoolSettings())
    breaker = Breaker(max_connections=2, max_pending=1)
    assert breaker.admit([a, b], a) == ""
    breaker.pending = 1
    assert breaker.admit([a, b], a) == "max-pending-requests"
    breaker.pending = 0
    a.active = 1
    idle = UpstreamConnection(b)
    transport = FakeTransport()
    idle.connection_made(transport)  # type: ignore[arg-type]
    b.idle.append(idle)
    assert breaker.admit([a, b], a) == ""  # at the limit, but an idle connection to b makes room
    assert transport.closed and not b.idle
    a.active = 2
    assert breaker.admit([a, b], a) == "max-connections"
    assert (breaker.overflow_connections, breaker.overflow_pending) == (1, 1)


def test_upstream_state_repr_and_generation():
    state = UpstreamState("u")
    state.changed()
    assert repr(state) == "<UpstreamState u targets=0 generation=1>"
