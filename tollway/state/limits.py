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
logged once, counted in `RedisHealth.outages` — and until a probe succeeds (one request per
`probe_interval` tries Redis; the others do not wait for it) decisions are taken without Redis:
``on_failure="open"``: by the node-local limit (`fallback`, default the same limit per node), tagged
"fail-open"; ``on_failure="closed"``: denied, tagged "fail-closed" (the plugin answers 503). Units
already reserved by the batched policy are still spent. The first success ends the outage (logged
once, with how long it lasted and how many decisions fell back).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tollway.state.local import LocalConcurrency, LocalLimit, local_limit
from tollway.state.redis_client import RedisBackend, RedisClosed, RedisError, Script
from tollway.state.scripts import GIVE, TAKE
from tollway.state.shared import _CACHE_MAX, SharedTable, StateLockTimeout, node_table
from tollway.state.spec import Decision, LimitSpec

log = logging.getLogger("tollway.state.limits")

Result = Decision | Awaitable[Decision]
Clock = Callable[[], float]
_B = struct.Struct("<8d")  # batched record, see BatchedRedisPolicy
_KEY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/|@=+,;")


# -- Redis outages ------------------------------------------------------------------------------------------
class RedisHealth:
    """Whether one Redis backend answers, as seen by this process; shared by every policy using it.

    Metrics: `down` (gauge), `outages` (outages begun), `fallbacks` (decisions taken without Redis),
    `errors` (failed Redis calls), `last_error`.
    """

    def __init__(self, name: str, probe_interval: float = 0.5, backend: RedisBackend | None = None) -> None:
        self.name = name
        self.probe_interval = probe_interval
        # While down, a background PING every probe_interval ends the outage even when no request asks
        # Redis (a batched node spending a reserve another worker fetched never would).
        self.backend = backend
        self._prober: asyncio.Task[None] | None = None
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.outages = 0
        self.fallbacks = 0
        self.errors = 0
        self.last_error = ""
        self._fallbacks_at_outage = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def skip(self) -> bool:
        """True when this call should not try Redis (down, and not yet time for the next probe)."""
        if self.down_since is None:
            return False
        now = time.monotonic()
        if now >= self.retry_at:
            self.retry_at = now + self.probe_interval  # this caller is the probe
            return False
        return True

    def failed(self, error: BaseException) -> None:
        if isinstance(error, RedisClosed):
            return  # closed on purpose (shutdown, reload): not an outage
        self.errors += 1
        now = time.monotonic()
        self.retry_at = now + self.probe_interval
        self.last_error = getattr(error, "message", None) or str(error)
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            self._fallbacks_at_outage = self.fallbacks
            self._start_prober()
            log.error(
                "redis %s unreachable (%s): rate limits fall back (fail-open: node-local limits; "
                "fail-closed: 503) until it answers again",
                self.name,
                self.last_error,
            )

    def _start_prober(self) -> None:
        if self.backend is None or self._prober is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a synchronous caller): requests still probe, one per interval
        self._prober = loop.create_task(self._probe())

    async def _probe(self) -> None:
        # (no try/finally: mypyc mis-compiles a return inside one — tests/unit/test_compiled_rules.py)
        backend = self.backend
        assert backend is not None
        while self.down_since is not None:
            await asyncio.sleep(self.probe_interval)
            if self.down_since is None:
                break
            try:
                await backend.call("PING")
            except RedisClosed:
                break  # closed on purpose: nobody needs it any more
            except RedisError:
                continue
            self.recovered()
        self._prober = None

    def recovered(self) -> None:
        if self.down_since is not None:
            log.warning(
                "redis %s reachable again after %.1fs; %d decisions were taken without it",
                self.name,
                time.monotonic() - self.down_since,
                self.fallbacks - self._fallbacks_at_outage,
            )
            self.down_since = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "down": self.down,
            "outages": self.outages,
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        state = "down" if self.down else "up"
        return f"<RedisHealth {self.name} {state} outages={self.outages} fallbacks={self.fallbacks}>"


def health_of(backend: RedisBackend) -> RedisHealth:
    """The backend's health tracker in this process (created on first use)."""
    health = getattr(backend, "health", None)
    if health is None:
        health = RedisHealth(backend.name, backend=backend)
        backend.health = health  # type: ignore[attr-defined]
    return health


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


def _registered(kind: str, spec: LimitSpec, backend: str) -> PolicyStats:
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
    from tollway.state.redis_client import cached_backends
    from tollway.state.shared import current_node_table

    table = current_node_table()
    redis: dict[str, Any] = {}
    for backend in cached_backends():
        redis[backend.name] = {**health_of(backend).as_dict(), **backend.stats.as_dict()}
    return {
        "table": table.stats.as_dict() if table is not None else {},
        "redis": redis,
        "policies": {key: stats.as_dict() for key, stats in _STATS.items()},
    }


# -- policies -----------------------------------------------------------------------------------------------
class LocalPolicy:
    """`local`: one count per node, shared by its workers (tollway.state.local)."""

    def __init__(self, spec: LimitSpec, table: SharedTable | None = None) -> None:
        self.spec = spec
        self.limit: LocalLimit = local_limit(spec, table)
        self.stats = _registered("local", spec, "")

    def check(self, key: str, now: float, cost: int = 1) -> Result:
        stats = self.stats
        stats.requests += 1
        stats.local += 1
        try:
            decision = self.limit.check(key, now, cost)
        except StateLockTimeout:
            return _stuck(self.spec)
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


class _RedisBacked:
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
        self.health = health_of(backend)
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
        kind = "batched" if isinstance(self, BatchedRedisPolicy) else "redis"
        self.stats = _registered(kind, spec, f"{backend.name} {prefix}")
        self._keys: dict[str, bytes] = {}
        self._tag = spec.ident

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


_background: set[asyncio.Task[Any]] = set()  # strong references to fire-and-forget tasks


class RedisPolicy(_RedisBacked):
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


class BatchedRedisPolicy(_RedisBacked):
    """`redis` with batching: quota taken from Redis in slices, spent through the node-shared table.

    Record in the node table (eight doubles), per limit and key:
        expires        reserved units are void after this (window end; gcra: grant + lease)
        wid            the Redis window the reserve belongs to (for give-backs)
        reserve        units this node may still admit without asking
        blocked_until  Redis had nothing left: deny without asking until then (re-asked at most every
                       slice_interval, so units given back by other nodes are found)
        retry_at       when a denied client should retry (Retry-After)
        remaining      cluster-wide units left after the last grant (RateLimit `r` hint)
        stock          reserve right after the last grant (consumption since = stock - reserve)
        last_fetch     when the last slice was asked for (with stock: the node's rate)
    """

    def __init__(
        self,
        spec: LimitSpec,
        backend: RedisBackend,
        *,
        slice_interval: float | None = None,
        max_slice: int | None = None,
        lease: float | None = None,
        table: SharedTable | None = None,
        on_failure: str = "open",
        fallback: LimitSpec | None = None,
        prefix: str = "tw:",
        server_time: bool = True,
        clock: Clock = time.time,
    ) -> None:
        # (the base's options are spelled out: mypyc mis-forwards **kwargs to keyword-only parameters)
        super().__init__(
            spec,
            backend,
            table=table,
            on_failure=on_failure,
            fallback=fallback,
            prefix=prefix,
            server_time=server_time,
            clock=clock,
        )
        self.slice_interval = slice_interval or min(1.0, spec.window / 10.0)
        self.max_slice = max(1, max_slice or math.ceil(spec.capacity / 10))
        self.initial_slice = max(1, min(self.max_slice, math.ceil(spec.capacity / 100)))
        self.lease = lease or self.slice_interval
        self.gcra = spec.algorithm == "gcra"
        self.fetching: dict[str, asyncio.Future[bool]] = {}
        self.fetched: dict[str, float] = {}  # keys this process fetched for -> reserve seen at last sweep
        self._prefix = b"batched\0" + spec.ident.encode() + b"\0"
        self._fps: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"<BatchedRedisPolicy {s.name} {s.limit}/{s.window:g}s {s.algorithm} "
            f"slice<={self.max_slice} interval={self.slice_interval:g}s on_failure={self.on_failure}>"
        )

    def _fp(self, key: str) -> int:
        fp = self._fps.get(key)
        if fp is None:
            if len(self._fps) >= _CACHE_MAX:
                self._fps.clear()
            fp = self._fps[key] = self.table.fingerprint(self._prefix + key.encode())
        return fp

    # the hot path
    def check(self, key: str, now: float, cost: int = 1) -> Result:
        self.stats.requests += 1
        fp = self._fp(key)
        try:
            decision = self._local(key, fp, now, cost)
        except StateLockTimeout:
            return _stuck(self.spec)
        if decision is not None:
            return decision
        if self.health.skip():
            return self.fail(key, now, cost)
        return self._fetch_then_check(key, fp, cost)

    def _local(self, key: str, fp: int, now: float, cost: int) -> Decision | None:
        """Admit from the node's reserve, deny while blocked, or None: a slice is needed."""
        table = self.table
        buf = table.buf
        outcome = 0  # 0: a slice is needed, 1: admitted from the reserve, 2: denied (blocked)
        expires = reserve = retry_at = remaining = stock = 0.0
        stripe = table.lock(fp)
        try:  # (no return inside: see the note in tollway/state/local.py)
            offset, found = table.slot(fp, now)
            if not found:
                _B.pack_into(buf, offset, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            else:
                expires, wid, reserve, blocked, retry_at, remaining, stock, last = _B.unpack_from(buf, offset)
                if reserve >= cost and expires > now:
                    reserve -= cost
                    _B.pack_into(
                        buf, offset, expires, wid, reserve, blocked, retry_at, remaining, stock, last
                    )
                    outcome = 1
                elif blocked > now:
                    outcome = 2
        finally:
            table.unlock(stripe)
        if outcome == 0:
            return None
        stats = self.stats
        stats.local += 1
        spec = self.spec
        if outcome == 1:
            # Top up before it runs out — unless slices are single units (a quiet key: a unit fetched
            # ahead would mostly be given back later, two commands instead of one).
            if reserve * 4.0 <= stock and stock >= 2.0 and key not in self.fetching and not self.health.down:
                self._start_fetch(key, fp, cost)
            left = int(remaining + reserve)
            return Decision(True, spec.limit, left, self._reset_after(expires, left, now), 0.0, spec)
        stats.denied += 1
        wait = max(retry_at - now, 0.0)
        return Decision(False, spec.limit, 0, wait, wait, spec)

    def _reset_after(self, expires: float, left: int, now: float) -> float:
        if self.gcra:  # until the bucket would be full again
            return max(0.0, (self.spec.capacity - left) * self.p1)
        return max(0.0, expires - now)

    async def _fetch_then_check(self, key: str, fp: int, cost: int) -> Decision:
        for _ in range(3):
            future = self.fetching.get(key) or self._start_fetch(key, fp, cost)
            ok = await asyncio.shield(future)
            now = self.clock()
            if not ok:
                return self.fail(key, now, cost)
            decision = self._local(key, fp, now, cost)
            if decision is not None:
                return decision
        # Slices kept going to concurrent requests; deny briefly rather than loop.
        self.stats.denied += 1
        spec = self.spec
        return Decision(False, spec.limit, 0, self.slice_interval, self.slice_interval, spec)

    # slices
    def _start_fetch(self, key: str, fp: int, cost: int) -> asyncio.Future[bool]:
        task = asyncio.get_running_loop().create_task(self._fetch(key, fp, cost))
        self.fetching[key] = task
        self.fetched.setdefault(key, -1.0)
        self._ensure_sweeper()
        return task

    async def _fetch(self, key: str, fp: int, cost: int) -> bool:
        ok = False
        try:
            ok = await self._take_slice(key, fp, cost)
        finally:
            self.fetching.pop(key, None)
        return ok

    async def _take_slice(self, key: str, fp: int, cost: int) -> bool:
        """Ask Redis for a slice and park what it grants in the node table; False if Redis failed."""
        sent = self.clock()
        want = self._slice_size(fp, sent, cost)
        self.stats.redis_calls += 1
        args = (self.p1, self.p2, want, 1, self.now_arg(sent))
        try:
            reply = await self.backend.script(self.take, self.redis_key(key), args)
        except RedisError as exc:
            self.health.failed(exc)
            return False
        self.health.recovered()
        granted, remaining, reset_us, retry_us, wid = reply
        self._deposit(key, fp, sent, granted, remaining, reset_us / 1e6, retry_us / 1e6, float(wid))
        return True

    def _slice_size(self, fp: int, now: float, cost: int) -> int:
        """The node's recent rate for this key x slice_interval, within [cost, max_slice]."""
        table = self.table
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            record = _B.unpack_from(table.buf, offset) if offset >= 0 else None
        finally:
            table.unlock(stripe)
        want = self.initial_slice
        if record is not None and record[7] > 0:
            consumed = max(0.0, record[6] - record[2])
            elapsed = max(now - record[7], 1e-3)
            want = math.ceil(consumed / elapsed * self.slice_interval)
        return int(min(self.max_slice, max(want, cost, 1)))

    def _deposit(
        self,
        key: str,
        fp: int,
        sent: float,
        granted: int,
        remaining: int,
        reset: float,
        retry: float,
        wid: float,
    ) -> None:
        table = self.table
        buf = table.buf
        now = self.clock()
        stripe = table.lock(fp)
        try:
            offset, found = table.slot(fp, now)
            if found:
                expires, old_wid, reserve, _, retry_at, _, _, _ = _B.unpack_from(buf, offset)
            else:
                expires = old_wid = reserve = retry_at = 0.0
            void = 0.0
            if reserve > 0 and (expires <= now or (not self.gcra and old_wid != wid)):
                void, reserve = reserve, 0.0  # another window's (or an expired lease's) units
            blocked = 0.0
            if granted:
                reserve += granted
                # `sent` is no later than the server's clock reading, so the local deadline never
                # outlives the server's window.
                expires = sent + (self.lease if self.gcra else reset)
            else:
                retry_at = sent + retry
                blocked = sent + min(retry, self.slice_interval)
            _B.pack_into(buf, offset, expires, wid, reserve, blocked, retry_at, remaining, reserve, sent)
        finally:
            table.unlock(stripe)
        if void and self.spec.algorithm != "fixed":  # a fixed window that ended has nothing to return
            self._give_back(key, void, old_wid, now)

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        fp = self._fp(key)
        table = self.table
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            if offset >= 0:
                record = list(_B.unpack_from(table.buf, offset))
                if record[0] > now:
                    record[2] += cost
                    _B.pack_into(table.buf, offset, *record)
        finally:
            table.unlock(stripe)

    # giving back
    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.slice_interval, self._sweep_tick)

    def _sweep_tick(self) -> None:
        self._sweeper = None
        self.sweep(self.clock())
        if self.fetched:
            self._ensure_sweeper()

    def sweep(self, now: float) -> float:
        """Give back reserves nobody spent since the last sweep, and expired sliding/GCRA reserves;
        forget keys with nothing left. Runs every slice_interval while this process holds keys.
        Returns the units given back."""
        total = 0.0
        for key, seen in list(self.fetched.items()):
            if key in self.fetching:
                continue
            units, wid = self._sweep_key(key, seen, now)
            if units:
                total += units
                self._give_back(key, units, wid, now)
        return total

    def _sweep_key(self, key: str, seen: float, now: float) -> tuple[float, float]:
        """(units to give back, their window) for one key; updates `fetched`."""
        table = self.table
        buf = table.buf
        fp = self._fp(key)
        units = wid = 0.0
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            record = list(_B.unpack_from(buf, offset)) if offset >= 0 else [0.0] * 8
            expires, wid, reserve = record[0], record[1], record[2]
            if offset < 0:
                del self.fetched[key]
            elif reserve <= 0:
                if expires <= now:
                    del self.fetched[key]
                else:
                    self.fetched[key] = 0.0
            elif expires <= now or reserve == seen:  # expired, or idle for a whole sweep
                record[2] = 0.0
                record[6] = 0.0
                _B.pack_into(buf, offset, *record)
                if expires > now or self.spec.algorithm != "fixed":
                    units = reserve
                del self.fetched[key]
            else:
                self.fetched[key] = reserve
        finally:
            table.unlock(stripe)
        return units, wid

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


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


def _stuck(spec: LimitSpec) -> Decision:
    """A node-table lock held for over a second by a live process (stopped in a debugger, say): let
    the request through rather than fail it; `TableStats.lock_timeouts` counts these."""
    log.error("node state table lock stuck: %s admitted without counting", spec.name)
    return Decision(True, spec.limit, 0, 0.0, 0.0, spec, "fail-open")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
