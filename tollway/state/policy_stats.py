"""The rate-limit policies' counters in this process, and the snapshot the metrics layer exports.

A config reload builds new policy objects; the same limit picks up the same `PolicyStats`, so the counts
only ever grow (Prometheus counters). Compiled with mypyc (setup.py HOT_MODULES): policies bump these
per request.
"""

from __future__ import annotations

import logging
from typing import Any

from tollway.state.spec import Decision, LimitSpec

log = logging.getLogger("tollway.state.limits")


class PolicyStats:
    """Per-policy counters: `redis_calls / requests` is the Redis commands per request."""

    __slots__ = ("denied", "fallbacks", "gave_back", "local", "redis_calls", "requests")

    def __init__(self) -> None:
        self.requests = 0  # checks
        self.denied = 0
        self.local = 0  # decided without a round trip (node table, reserve, or blocked window)
        self.redis_calls = 0  # scripts run (takes and give-backs)
        self.fallbacks = 0  # decided without Redis because it was unreachable
        self.gave_back = 0  # units returned to Redis (batched)

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "denied": self.denied,
            "local": self.local,
            "redis_calls": self.redis_calls,
            "fallbacks": self.fallbacks,
            "gave_back": self.gave_back,
        }

    def __repr__(self) -> str:
        return "<PolicyStats " + " ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ">"


# Counters of every policy built in this process, by kind, limit and backend. A config reload builds new
# policy objects; the same limit picks up the same counters, so they only ever grow (Prometheus counters).
_STATS: dict[str, PolicyStats] = {}


def registered(kind: str, spec: LimitSpec, backend: str) -> PolicyStats:
    key = f"{kind} {spec.ident} {backend}".rstrip()
    stats = _STATS.get(key)
    if stats is None:
        stats = _STATS[key] = PolicyStats()
    return stats


def stats_snapshot() -> dict[str, Any]:
    """Everything the metrics layer exports from this process (cheap; call it per scrape):

    table     node-table counters of this process (TableStats: new_keys, evicted_expired,
              evicted_live, recovered, lock_timeouts)
    redis     per backend (from `backend_for`): RedisHealth (down, outages, fallbacks, errors,
              last_error) and ClientStats (commands, connects, failed_connects, timeouts, errors,
              noscript, redirects)
    policies  per "<kind> <scope>|<name>|<algorithm>|<window> [<backend> <prefix>]": PolicyStats (requests,
              denied, local, redis_calls, fallbacks, gave_back); redis_calls / requests is the Redis
              commands per request
    """
    from tollway.state.redis_backends import cached_backends
    from tollway.state.shared import current_node_table

    table = current_node_table()
    redis: dict[str, Any] = {}
    for backend in cached_backends():
        redis[backend.name] = {**backend.health.as_dict(), **backend.stats.as_dict()}
    return {
        "table": table.stats.as_dict() if table is not None else {},
        "redis": redis,
        "policies": {key: stats.as_dict() for key, stats in _STATS.items()},
    }


def stuck(spec: LimitSpec) -> Decision:
    """A node-table lock held for over a second by a live process (stopped in a debugger, say): let
    the request through rather than fail it; `TableStats.lock_timeouts` counts these."""
    log.error("node state table lock stuck: %s admitted without counting", spec.name)
    return Decision(True, spec.limit, 0, 0.0, 0.0, spec, "fail-open")
