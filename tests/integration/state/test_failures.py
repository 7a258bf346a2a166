"""Redis failing under the policies — our own redis-server, stopped or frozen mid-test: fail-open falls
back to node-local limits, fail-closed denies with 503, an outage is logged once, nothing raises and
nothing hangs, and traffic goes back to Redis when it returns."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.state_support import ServerSet
from tollway.state.headers import denial_body
from tollway.state.limits import BatchedRedisPolicy, RedisPolicy
from tollway.state.redis_backends import Standalone
from tollway.state.redis_client import RedisClient
from tollway.state.shared import SharedTable
from tollway.state.spec import Decision, LimitSpec

pytestmark = pytest.mark.integration
LOGGER = "tollway.state.redis_health"


async def resolve(result: object) -> Decision:
    return result if isinstance(result, Decision) else await result  # type: ignore[misc]


def records(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == LOGGER and text in r.getMessage())


async def until_redis_answers(policy: object, timeout: float = 15.0) -> Decision:
    deadline = time.monotonic() + timeout
    while True:
        decision = await resolve(policy.check("alice", time.time()))  # type: ignore[attr-defined]
        if not decision.degraded:
            return decision
        assert time.monotonic() < deadline, "the policy did not go back to Redis"
        await asyncio.sleep(0.05)


@pytest.fixture
async def quick_backend():  # type: ignore[no-untyped-def]
    made: list[Standalone] = []

    def make(port: int) -> Standalone:
        backend = Standalone(RedisClient("127.0.0.1", port, timeout=0.3, connect_timeout=0.3))
        backend.health.probe_interval = 0.2
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


async def test_redis_policy_fails_open_to_local_limits_and_recovers(
    servers: ServerSet, table: SharedTable, quick_backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server = servers.start()
    backend = quick_backend(server.port)
    policy = RedisPolicy(LimitSpec("hour", 5, 3600), backend, table=table, on_failure="open")
    assert (await resolve(policy.check("alice", time.time()))).degraded == ""
    server.stop()
    decisions = [await resolve(policy.check("alice", time.time())) for _ in range(40)]
    assert all(d.degraded == "fail-open" for d in decisions)
    assert sum(d.allowed for d in decisions) == 5  # the node-local limit, exactly
    assert records(caplog, "unreachable") == 1  # once per outage, not per request
    health = policy.health
    assert health.down and health.outages == 1 and health.fallbacks == 40
    server.start()
    back = await until_redis_answers(policy)
    assert (
        back.allowed and back.remaining == 4
    )  # counting in Redis again (a restart without persistence forgot)
    assert not health.down and records(caplog, "reachable again") == 1


async def test_redis_policy_fails_closed_with_503(
    servers: ServerSet, table: SharedTable, quick_backend
) -> None:
    server = servers.start()
    policy = RedisPolicy(
        LimitSpec("hour", 5, 3600), quick_backend(server.port), table=table, on_failure="closed"
    )
    server.stop()
    decisions = [await resolve(policy.check("alice", time.time())) for _ in range(10)]
    assert all(not d.allowed and d.unavailable for d in decisions)
    assert denial_body(decisions[:1])[0] == 503
    server.start()
    assert (await until_redis_answers(policy)).allowed


async def test_a_frozen_redis_costs_at_most_the_timeout(
    servers: ServerSet, table: SharedTable, quick_backend
) -> None:
    server = servers.start()
    policy = RedisPolicy(LimitSpec("hour", 100, 3600), quick_backend(server.port), table=table)
    assert (await resolve(policy.check("alice", time.time()))).degraded == ""
    policy.health.probe_interval = 30.0  # no probe while we look (the machine may be slow)
    server.pause()  # accepts bytes, never answers
    try:
        # bounded by the 0.3 s request timeout (wait_for only guards the test against a hang)
        pending = asyncio.gather(*(resolve(policy.check("alice", time.time())) for _ in range(20)))
        first = await asyncio.wait_for(pending, 10)
        assert all(d.allowed and d.degraded == "fail-open" for d in first)
        later = policy.check("alice", time.time())  # down: decided at once, no coroutine, no wait
        assert isinstance(later, Decision) and later.degraded == "fail-open"
    finally:
        server.resume()
    policy.health.probe_interval = 0.2
    policy.health.retry_at = 0.0
    assert (await until_redis_answers(policy)).allowed


async def test_batched_spends_its_reserve_then_falls_back_and_recovers(
    servers: ServerSet, table: SharedTable, quick_backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server = servers.start()
    spec = LimitSpec("hour", 1000, 3600)
    policy = BatchedRedisPolicy(
        spec, quick_backend(server.port), table=table, max_slice=50, on_failure="open"
    )
    try:
        for _ in range(30):  # builds up a reserve
            assert (await resolve(policy.check("alice", time.time()))).allowed
            await asyncio.sleep(0.001)
        server.stop()
        decisions = [await resolve(policy.check("alice", time.time())) for _ in range(200)]
        assert all(d.allowed for d in decisions)
        from_reserve = [d for d in decisions if not d.degraded]
        assert from_reserve and decisions[-1].degraded == "fail-open"  # reserve first, then local
        assert records(caplog, "unreachable") == 1
        server.start()
        assert (await until_redis_answers(policy)).allowed
        assert records(caplog, "reachable again") == 1
    finally:
        policy.close()


async def test_an_outage_ends_without_traffic_when_redis_returns(
    servers: ServerSet, table: SharedTable, quick_backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that only spends a batched reserve never calls Redis itself: the background probe (a
    PING every probe_interval while down) must still notice that Redis is back."""
    caplog.set_level(logging.INFO, LOGGER)
    server = servers.start()
    backend = quick_backend(server.port)
    policy = RedisPolicy(LimitSpec("hour", 5, 3600), backend, table=table, on_failure="open")
    server.stop()
    assert (await resolve(policy.check("alice", time.time()))).degraded == "fail-open"
    health = policy.health
    assert health.down
    server.start()
    deadline = time.monotonic() + 10
    while health.down:  # no check is made meanwhile
        assert time.monotonic() < deadline, "the outage never ended without traffic"
        await asyncio.sleep(0.05)
    assert records(caplog, "reachable again") == 1
