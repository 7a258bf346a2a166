"""The `redis` policy, and what it shares with `batched` (tollway.state.batched): Redis keys, the Lua
scripts, the backend's health and the fallback while Redis is unreachable.

Compiled with mypyc (setup.py HOT_MODULES): runs per request with a Redis limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tollway.state.local import local_limit
from tollway.state.policy_stats import registered
from tollway.state.redis_backends import RedisBackend
from tollway.state.redis_client import RedisError, Script
from tollway.state.scripts import GIVE, TAKE
from tollway.state.shared import _CACHE_MAX, SharedTable, node_table
from tollway.state.spec import Decision, LimitSpec

Result = Decision | Awaitable[Decision]
Clock = Callable[[], float]
_KEY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/|@=+,;")
_background: set[asyncio.Task[Any]] = set()  # strong references to fire-and-forget tasks


class RedisBacked:
    """What the two Redis policies share: keys, scripts, health and the fallback."""

    def __init__(
        self,
        spec: LimitSpec,
        backend: RedisBackend,
        *,
        table: SharedTable | None = None,
        on_failure: str = "open",
        fallback: LimitSpec | None = None,
        prefix: str = "tw:",
        server_time: bool = True,
        clock: Clock = time.time,
    ) -> None:
        if spec.algorithm not in TAKE:
            raise ValueError(f"the redis policies support {', '.join(TAKE)}, not {spec.algorithm!r}")
        if on_failure not in ("open", "closed"):
            raise ValueError("on_failure is 'open' or 'closed'")
        self.spec = spec
        self.backend = backend
        self.health = backend.health
        self.on_failure = on_failure
        self.table = table if table is not None else node_table()
        self.fallback = local_limit(fallback or spec, self.table)
        self.prefix = prefix
        self.server_time = server_time
        self.clock = clock
        self.take: Script = TAKE[spec.algorithm]
        self.give: Script = GIVE[spec.algorithm]
        if spec.algorithm == "gcra":
            self.p1: float = spec.emission_interval
            self.p2: float = float(spec.capacity)
        else:
            self.p1, self.p2 = float(spec.limit), spec.window
        self.stats = registered(self.kind(), spec, f"{backend.name} {prefix}")
        self._keys: dict[str, bytes] = {}
        self._tag = spec.ident

    def kind(self) -> str:
        """The policy's name in its stats key."""
        return "redis"

    def redis_key(self, key: str) -> bytes:
        """`tw:{<scope>|<name>|<algorithm>|<window>:<key>}` — the braces are the cluster hash tag; a key
        that is long or has characters outside a safe set is replaced by its BLAKE2b digest."""
        rkey = self._keys.get(key)
        if rkey is None:
            if len(self._keys) >= _CACHE_MAX:
                self._keys.clear()
            text = key if len(key) <= 128 and _KEY_SAFE.issuperset(key) else "#" + _digest(key)
            tag = self._tag if _KEY_SAFE.issuperset(self._tag) else "#" + _digest(self._tag)
            rkey = self._keys[key] = f"{self.prefix}{{{tag}:{text}}}".encode()
        return rkey

    def now_arg(self, now: float) -> str:
        return "" if self.server_time else repr(now)

    def fail(self, key: str, now: float, cost: int) -> Decision:
        """The decision while Redis is unreachable."""
        self.health.fallbacks += 1
        self.stats.fallbacks += 1
        spec = self.spec
        if self.on_failure == "closed":
            self.stats.denied += 1
            return Decision(False, spec.limit, 0, 1.0, 1.0, spec, "fail-closed")
        decision = self.fallback.check(key, now, cost)
        decision.degraded = "fail-open"
        decision.spec = spec
        if not decision.allowed:
            self.stats.denied += 1
        return decision

    def _give_back(self, key: str, units: float, wid: float, now: float) -> None:
        """Return unused units (fire and forget: a lost give-back only under-admits)."""
        if units <= 0:
            return
        self.stats.gave_back += int(units)
        self.stats.redis_calls += 1
        args = (self.p1, self.p2, int(units), int(wid), self.now_arg(now))
        task = asyncio.get_running_loop().create_task(self._quiet(self.give, key, args))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _quiet(self, script: Script, key: str, args: Sequence[Any]) -> None:
        try:
            await self.backend.script(script, self.redis_key(key), args)
        except RedisError as exc:
            self.health.failed(exc)


class RedisPolicy(RedisBacked):
    """`redis`: one atomic script per request (cluster-wide, exact)."""

    def check(self, key: str, now: float, cost: int = 1) -> Result:
        self.stats.requests += 1
        if self.health.skip():
            return self.fail(key, now, cost)
        return self._remote(key, now, cost)

    async def _remote(self, key: str, now: float, cost: int) -> Decision:
        self.stats.redis_calls += 1
        args = (self.p1, self.p2, cost, 0, self.now_arg(now))
        try:
            reply = await self.backend.script(self.take, self.redis_key(key), args)
        except RedisError as exc:
            self.health.failed(exc)
            return self.fail(key, self.clock() if self.server_time else now, cost)
        self.health.recovered()
        granted, remaining, reset_us, retry_us, _ = reply
        if not granted:
            self.stats.denied += 1
        return Decision(bool(granted), self.spec.limit, remaining, reset_us / 1e6, retry_us / 1e6, self.spec)

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        wid = now // self.spec.window if self.spec.algorithm != "gcra" else 0.0
        self._give_back(key, cost, wid, now)

    def __repr__(self) -> str:
        s = self.spec
        return f"<RedisPolicy {s.name} {s.limit}/{s.window:g}s {s.algorithm} on_failure={self.on_failure}>"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
