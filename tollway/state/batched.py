"""The `batched` policy: quota taken from Redis in slices and spent through the node-shared table
(the overview and its accuracy: tollway.state.limits, docs/rate-limiting.md).

Compiled with mypyc (setup.py HOT_MODULES): runs per request with a batched limit.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from typing import Final

from tollway.state.policy_stats import stuck
from tollway.state.redis_backends import RedisBackend
from tollway.state.redis_client import RedisError
from tollway.state.redis_policy import Clock, RedisBacked, Result
from tollway.state.shared import _CACHE_MAX, SharedTable, StateLockTimeout
from tollway.state.spec import Decision, LimitSpec

_B: Final = struct.Struct("<8d")  # the record in the node table, per limit and key (fields below)
# `SharedTable.take_reserve`'s status (tollway/state/_shmlock.c): answered locally (taken, blocked), a
# slice is needed (empty), or take the general path (a new key, a busy stripe, a recovered lock).
_TAKEN: Final = 0
_BLOCKED: Final = 1
_EMPTY: Final = 2
_RECOVERED: Final = 5

EXPIRES: Final = 0
WID: Final = 1
RESERVE: Final = 2
BLOCKED: Final = 3
RETRY_AT: Final = 4
REMAINING: Final = 5
STOCK: Final = 6
LAST_FETCH: Final = 7

# Every slice request in flight in this process. Redis counts a slice's units when it runs the script,
# so a process that exits before the reply lands loses them for the window; a draining worker (and the
# multi-process tests) waits for these first (`settle_slices`).
_in_flight: set[asyncio.Task[bool]] = set()


async def settle_slices(timeout: float) -> int:
    """Wait up to `timeout` seconds for this process's slice requests in flight to deposit what Redis
    granted in the node table, where the node's other workers spend it. Returns how many were waited
    for."""
    pending = list(_in_flight)
    if pending and timeout > 0:
        await asyncio.wait(pending, timeout=timeout)
    return len(pending)


class BatchedRedisPolicy(RedisBacked):
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
        self.waiting: dict[str, int] = {}  # units requested by checks waiting on a key's slice
        self._prefix = b"batched\0" + spec.ident.encode() + b"\0"
        self._fps: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def kind(self) -> str:
        return "batched"

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
            return stuck(self.spec)
        if decision is not None:
            return decision
        if self.health.skip():
            return self.fail(key, now, cost)
        return self._fetch_then_check(key, fp, cost)

    def _local(self, key: str, fp: int, now: float, cost: int) -> Decision | None:
        """Admit from the node's reserve, deny while blocked, or None: a slice is needed."""
        table = self.table
        fast = table.take_reserve
        if fast is not None:  # a key already in the table, its stripe free: one C call
            result: tuple[int, float, float, float, float, float] = fast(fp, now, cost)
            status, expires, reserve, retry_at, remaining, stock = result
            if status <= _EMPTY:
                return self._answer(status, key, fp, now, cost, expires, reserve, retry_at, remaining, stock)
            if status == _RECOVERED:
                table.stats.recovered += 1
        return self._local_general(key, fp, now, cost)

    def _local_general(self, key: str, fp: int, now: float, cost: int) -> Decision | None:
        """`_local` through struct reads and writes: a new key, a busy stripe, or no C module."""
        table = self.table
        buf = table.buf
        status = _EMPTY
        expires = reserve = retry_at = remaining = stock = 0.0
        stripe = table.lock(fp)
        try:
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
                    status = _TAKEN
                elif blocked > now:
                    status = _BLOCKED
        finally:
            table.unlock(stripe)
        return self._answer(status, key, fp, now, cost, expires, reserve, retry_at, remaining, stock)

    def _answer(
        self,
        status: int,
        key: str,
        fp: int,
        now: float,
        cost: int,
        expires: float,
        reserve: float,
        retry_at: float,
        remaining: float,
        stock: float,
    ) -> Decision | None:
        if status == _EMPTY:
            return None
        stats = self.stats
        stats.local += 1
        spec = self.spec
        if status == _TAKEN:
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
        waiting = self.waiting
        for _ in range(3):
            future = self.fetching.get(key) or self._start_fetch(key, fp, cost)
            waiting[key] = waiting.get(key, 0) + cost
            try:
                ok = await asyncio.shield(future)
            finally:
                left = waiting[key] - cost
                if left > 0:
                    waiting[key] = left
                else:
                    del waiting[key]
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
        _in_flight.add(task)
        task.add_done_callback(_in_flight.discard)
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
        want = self._slice_size(key, fp, sent, cost)
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

    def _slice_size(self, key: str, fp: int, now: float, cost: int) -> int:
        """The node's recent rate for this key x slice_interval, within [cost, max_slice]."""
        table = self.table
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            record = _B.unpack_from(table.buf, offset) if offset >= 0 else None
        finally:
            table.unlock(stripe)
        want = self.initial_slice
        # STOCK is 0 once the sweeper took an idle reserve back: the rate is unknown again, as for a
        # new key (a slice of one unit for a burst starved the requests waiting on it: 429s).
        if record is not None and record[LAST_FETCH] > 0 and record[STOCK] > 0:
            consumed = max(0.0, record[STOCK] - record[RESERVE])
            elapsed = max(now - record[LAST_FETCH], 1e-3)
            want = math.ceil(consumed / elapsed * self.slice_interval)
        # Enough for the requests already waiting on this slice: they would otherwise go round again.
        want = max(want, self.waiting.get(key, 0) + cost)
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
                if record[EXPIRES] > now:
                    record[RESERVE] += cost
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
            expires, wid, reserve = record[EXPIRES], record[WID], record[RESERVE]
            if offset < 0:
                del self.fetched[key]
            elif reserve <= 0:
                if expires <= now:
                    del self.fetched[key]
                else:
                    self.fetched[key] = 0.0
            elif expires <= now or reserve == seen:  # expired, or idle for a whole sweep
                record[RESERVE] = 0.0
                record[STOCK] = 0.0
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
