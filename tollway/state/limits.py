"""The rate-limit policies and what they do when Redis fails.

    policy    where the count lives                     cost per request        accuracy
    local     the node-shared table (all workers)       ~1 µs, no I/O           exact per node
    redis     Redis, one atomic script per request      one round trip          exact cluster-wide
    batched   Redis, taken in slices; spent locally     ~1 µs; a round trip     never over the limit
              through the node-shared table             per slice (adaptive)    (fixed/sliding); see below

Every policy has one method, ``check(key, now, cost=1)``, returning a `Decision` — or, when it must
wait for Redis, an awaitable of one (the plugin pipeline then awaits it; nothing else allocates a
coroutine). `check_all` checks several limits of one plugin for one request, all-or-nothing.

Batched policy. A node reserves a slice of units from Redis (the take script with partial=1 adds the
units to the cluster-wide count at once), parks them in the node-shared table, and admits requests
from there with no round trip until the slice runs low; the next slice is fetched in the background
before it runs out. Slice size = the node's recent rate for that key x `slice_interval`, at most
`max_slice`, and Redis never grants more than half of what is left, so the last units of a window go
out in ever smaller slices. Unused units are given back when a node stops spending them.

Accuracy (docs/rate-limiting.md derives it). Units are counted in Redis *before* they are spent, so:
  fixed, sliding   admitted per window <= limit, exactly as the `redis` policy — overshoot 0. Units a
                   node reserved but did not spend are lost to the others (undershoot), at most the
                   unspent reserve: <= sum over nodes of min(max_slice, remaining/2) at the window end,
                   and given back when a node goes idle.
  gcra             reserved units expire `lease` (default slice_interval) after their slice was taken,
                   and a top-up can extend a remainder once, so each unit is spent within 2 x lease
                   of being counted: in any interval of length t, admitted <= burst + rate x
                   (t + 2 x lease) — overshoot <= 2 x lease x rate over plain GCRA.

Redis unreachable (refused, reset, timed out after `timeout`): the first failure starts an outage —
logged once, counted in `RedisHealth.outages` (tollway.state.redis_health) — and until a probe
succeeds (one request per `probe_interval` tries Redis; the others do not wait for it) decisions are
taken without Redis: ``on_failure="open"``: by the node-local limit (`fallback`, default the same
limit per node), tagged "fail-open"; ``on_failure="closed"``: denied, tagged "fail-closed" (the plugin
answers 503). Units already reserved by the batched policy are still spent. The first success ends
the outage (logged once, with how long it lasted and how many decisions fell back).

Modules: this one holds `LocalPolicy`, `check_all` and `build_policy`; `redis_policy` the `redis`
policy and what it shares with `batched` (tollway.state.batched); `redis_health` the outage state of
a backend; `policy_stats` the counters (`stats_snapshot`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from tollway.state.batched import BatchedRedisPolicy
from tollway.state.local import LocalConcurrency, LocalLimit, local_limit
from tollway.state.policy_stats import registered, stats_snapshot, stuck
from tollway.state.redis_backends import RedisBackend
from tollway.state.redis_policy import RedisPolicy, Result
from tollway.state.shared import SharedTable, StateLockTimeout
from tollway.state.spec import Decision, LimitSpec

__all__ = [
    "BatchedRedisPolicy",
    "LocalPolicy",
    "Policy",
    "RedisPolicy",
    "build_policy",
    "check_all",
    "stats_snapshot",
]


class LocalPolicy:
    """`local`: one count per node, shared by its workers (tollway.state.local)."""

    def __init__(self, spec: LimitSpec, table: SharedTable | None = None) -> None:
        self.spec = spec
        self.limit: LocalLimit = local_limit(spec, table)
        self.stats = registered("local", spec, "")

    def check(self, key: str, now: float, cost: int = 1) -> Result:
        stats = self.stats
        stats.requests += 1
        stats.local += 1
        try:
            decision = self.limit.check(key, now, cost)
        except StateLockTimeout:
            return stuck(self.spec)
        if not decision.allowed:
            stats.denied += 1
        return decision

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        self.limit.refund(key, now, cost)

    def release(self, key: str, now: float, cost: int = 1) -> None:
        """Concurrency limits: the request admitted by `check` has ended."""
        limit = self.limit
        if not isinstance(limit, LocalConcurrency):
            raise TypeError(f"release() is for concurrency limits, not {self.spec.algorithm}")
        limit.release(key, now, cost)

    def start_renewal(self, loop: asyncio.AbstractEventLoop) -> Any:
        """Concurrency limits: keep this process's in-flight leases fresh (returns a cancellable)."""
        limit = self.limit
        if not isinstance(limit, LocalConcurrency):
            raise TypeError(f"start_renewal() is for concurrency limits, not {self.spec.algorithm}")
        return limit.start_renewal(loop)

    def __repr__(self) -> str:
        return f"<LocalPolicy {self.limit!r}>"


# -- several limits at once --------------------------------------------------------------------------------
Policy = LocalPolicy | RedisPolicy | BatchedRedisPolicy


def check_all(
    policies: Sequence[Policy], key: str, now: float, cost: int = 1
) -> list[Decision] | Awaitable[list[Decision]]:
    """Check every limit of a plugin for one request: all count it, or none does.

    Synchronous policies go first; if one denies, the others are not asked. Policies that need Redis
    are then asked together (one round trip, not one per limit); if any denies, every limit that
    counted the request gets its units back.
    """
    decisions: list[Decision] = []
    pending: list[tuple[int, Awaitable[Decision]]] = []
    for index, policy in enumerate(policies):
        result = policy.check(key, now, cost)
        if isinstance(result, Decision):
            decisions.append(result)
            if not result.allowed:
                for earlier, decision in zip(policies, decisions, strict=False):
                    if decision.allowed:
                        earlier.refund(key, now, cost)
                for _, awaitable in pending:
                    _discard(awaitable)
                return decisions
        else:
            decisions.append(None)  # type: ignore[arg-type]
            pending.append((index, result))
    if not pending:
        return decisions
    return _finish(policies, decisions, pending, key, now, cost)


async def _finish(
    policies: Sequence[Policy],
    decisions: list[Decision],
    pending: list[tuple[int, Awaitable[Decision]]],
    key: str,
    now: float,
    cost: int,
) -> list[Decision]:
    results = await asyncio.gather(*[a for _, a in pending])
    for (index, _), decision in zip(pending, results, strict=True):
        decisions[index] = decision
    if all(d.allowed for d in decisions):
        return decisions
    for policy, decision in zip(policies, decisions, strict=False):
        if decision.allowed:
            policy.refund(key, now, cost)
    return decisions


def _discard(awaitable: Awaitable[Decision]) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # a coroutine never started


def build_policy(
    spec: LimitSpec,
    policy: str = "local",
    backend: RedisBackend | None = None,
    **options: Any,
) -> Policy:
    """`policy` is "local", "redis" or "batched" (redis with batching); options as the classes take."""
    if policy == "local":
        return LocalPolicy(spec, options.get("table"))
    if backend is None:
        raise ValueError(f"the {policy!r} policy needs a redis backend")
    if policy == "redis":
        return RedisPolicy(spec, backend, **options)
    if policy == "batched":
        return BatchedRedisPolicy(spec, backend, **options)
    raise ValueError(f"unknown policy {policy!r} (local, redis, batched)")
