"""The algorithms on the node-shared table: node-exact limits with no external service.

One object per limit (built once per config): `check(key, now, cost=1) -> Decision` counts and
answers in one critical section; `refund` gives units back (a request denied by a later limit of the
same plugin returns what it took from the earlier ones). Records, eight doubles per slot:

    fixed        [expires, window id, count]
    sliding      [expires, window id, current count, previous count]
    gcra         [TAT in seconds (= expiry), TAT in units of interval, interval]
    concurrency  [expires, lease epoch, in flight this epoch, in flight last epoch]

The same arithmetic runs in Redis (`tollway.state.scripts`); tests hold the two to the same answers.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Final, cast

from tollway.state.shared import _CACHE_MAX, SharedTable, node_table
from tollway.state.spec import Decision, LimitSpec

# `SharedTable.fixed_window`'s status (tollway/state/_shmlock.c): decided (0, 1), or take the general path.
_DENIED: Final = 0
_ALLOWED: Final = 1
_RECOVERED: Final = 4
_F3: Final = struct.Struct("<3d")
_F4: Final = struct.Struct("<4d")


class LocalLimit:
    """Base: key fingerprints (cached per process) and the table."""

    __slots__ = ("_cache", "_prefix", "buf", "limit", "spec", "table", "window")

    def __init__(self, spec: LimitSpec, table: SharedTable | None = None) -> None:
        self.spec = spec
        self.table = table if table is not None else node_table()
        self.buf = self.table.buf
        self.limit = spec.limit
        self.window = spec.window
        self._prefix = spec.ident.encode() + b"\0"
        self._cache: dict[str, int] = {}

    def fingerprint(self, key: str) -> int:
        fp = self._cache.get(key)
        if fp is None:
            cache = self._cache
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            fp = cache[key] = self.table.fingerprint(self._prefix + key.encode())
        return fp

    def check(self, key: str, now: float, cost: int = 1) -> Decision:
        raise NotImplementedError

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        s = self.spec
        return f"<{type(self).__name__} {s.name} {s.limit}/{s.window:g}s {s.algorithm}>"


class LocalFixedWindow(LocalLimit):
    __slots__ = ("_limit_arg", "_window_arg")

    def __init__(self, spec: LimitSpec, table: SharedTable | None = None) -> None:
        super().__init__(spec, table)
        # The C check's arguments as Python objects, made once: typed `object`, compiled code passes
        # them as they are instead of boxing a new float and int on every call.
        self._window_arg: object = float(spec.window)
        self._limit_arg: object = spec.limit

    def check(self, key: str, now: float, cost: int = 1) -> Decision:
        # `object`, not int: the cached fingerprint is passed on as the int object it is (unboxed and
        # boxed again, a 62-bit int is a new object per request).
        fp: object = self._cache.get(key)
        if fp is None:
            fp = self.fingerprint(key)
        table = self.table
        fast = table.fixed_window
        if fast is not None:  # a key already in the table, its stripe free: one C call
            result: tuple[int, float, float] = fast(fp, now, self._window_arg, self._limit_arg, cost)
            status, counted, ends = result
            if status <= _ALLOWED:  # decided: _DENIED or _ALLOWED
                return self._decided(status == _ALLOWED, counted, ends, now)
            if status == _RECOVERED:
                table.stats.recovered += 1
        return self._check(cast(int, fp), now, cost)

    def _decided(self, allowed: bool, count: float, end: float, now: float) -> Decision:
        limit = self.limit
        reset_after = end - now
        remaining = int(limit - count) if count < limit else 0
        return Decision(allowed, limit, remaining, reset_after, 0.0 if allowed else reset_after, self.spec)

    def _check(self, fp: int, now: float, cost: int) -> Decision:
        """The check through memoryview items: a new key, a busy stripe, or no C module."""
        table = self.table
        # Any, not memoryview: typeshed says its items are ints, and a compiled int check would refuse
        # the doubles. Indexed reads and writes of single fields cost a fraction of a struct call.
        doubles: Any = table.doubles
        window = self.window
        limit = self.limit
        stripe = table.lock(fp)
        try:
            offset, found = table.slot(fp, now)
            i = offset >> 3
            wid = now // window
            count = 0.0
            if found:
                rwid: float = doubles[i + 1]
                if rwid >= wid:  # this window (or a later one, if the clock stepped back)
                    wid = rwid
                    count = doubles[i + 2]
            end = (wid + 1.0) * window
            allowed = count + cost <= limit
            if allowed:
                count += cost
            if allowed or not found:  # a new key that is denied at once still gets its window
                doubles[i] = end
                doubles[i + 1] = wid
                doubles[i + 2] = count
        finally:
            table.unlock(stripe)
        return self._decided(allowed, count, end, now)

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        fp = self.fingerprint(key)
        table = self.table
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            if offset >= 0:
                end, wid, count = _F3.unpack_from(self.buf, offset)
                if wid >= now // self.window:
                    _F3.pack_into(self.buf, offset, end, wid, max(0.0, count - cost))
        finally:
            table.unlock(stripe)


class LocalSlidingWindow(LocalLimit):
    __slots__ = ()

    def check(self, key: str, now: float, cost: int = 1) -> Decision:
        fp = self._cache.get(key) or self.fingerprint(key)
        table = self.table
        buf = self.buf
        window = self.window
        limit = self.limit
        stripe = table.lock(fp)
        try:
            offset, found = table.slot(fp, now)
            wid = now // window
            cur = prev = 0.0
            if found:
                _, rwid, rcur, rprev = _F4.unpack_from(buf, offset)
                if rwid >= wid:
                    wid, cur, prev = rwid, rcur, rprev
                elif rwid == wid - 1.0:
                    prev = rcur
            start = wid * window
            elapsed = now - start if now > start else 0.0
            weight = 1.0 - elapsed / window
            estimate = prev * weight + cur
            allowed = estimate + cost <= limit + 1e-9
            if allowed:
                cur += cost
                estimate += cost
            if allowed or not found:
                _F4.pack_into(buf, offset, start + 2.0 * window, wid, cur, prev)
        finally:
            table.unlock(stripe)
        remaining = int(limit - estimate + 1e-9) if estimate < limit else 0
        reset_after = start + window - now
        if allowed:
            return Decision(True, limit, remaining, reset_after, 0.0, self.spec)
        retry = sliding_retry_after(prev, cur, elapsed, window, limit, cost)
        return Decision(False, limit, remaining, reset_after, retry, self.spec)

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        fp = self.fingerprint(key)
        table = self.table
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            if offset >= 0:
                end, wid, cur, prev = _F4.unpack_from(self.buf, offset)
                if wid >= now // self.window:
                    _F4.pack_into(self.buf, offset, end, wid, max(0.0, cur - cost), prev)
        finally:
            table.unlock(stripe)


def sliding_retry_after(
    prev: float, cur: float, elapsed: float, window: float, limit: int, cost: int
) -> float:
    """Seconds until the two-window estimate leaves room for `cost` units, if nothing else is admitted."""
    if cost > limit:
        return 2.0 * window  # never; tell the client to go away for a while
    if cur + cost <= limit and prev > 0:
        # The previous window's weight decays: prev x (1 - (elapsed + x)/window) + cur + cost ≤ limit.
        x = window * (1.0 - (limit - cur - cost) / prev) - elapsed
        return max(0.0, x)
    # Not within this window: in the next one the current count becomes the decaying previous one.
    y = window * (1.0 - (limit - cost) / cur) if cur > 0 else 0.0
    return (window - elapsed) + max(0.0, y)


class LocalGcra(LocalLimit):
    """GCRA: one theoretical arrival time (TAT) per key. A unit costs `interval` = window/limit seconds
    of TAT; a request passes while TAT - now stays within the burst tolerance capacity x interval.

    The TAT is kept in units of `interval` (seconds / interval), so spending a unit adds exactly 1.0:
    adding 0.6 s to 1.7e9 s a thousand times would pile up float rounding, adding 1.0 to a count of
    units does not. The record also keeps the TAT in seconds (its expiry) and the interval it was
    counted with, so a changed limit rescales instead of misreading the units.
    """

    __slots__ = ("capacity", "interval")

    def __init__(self, spec: LimitSpec, table: SharedTable | None = None) -> None:
        super().__init__(spec, table)
        self.interval = spec.emission_interval
        self.capacity = float(spec.capacity)

    def check(self, key: str, now: float, cost: int = 1) -> Decision:
        fp = self._cache.get(key) or self.fingerprint(key)
        table = self.table
        buf = self.buf
        interval = self.interval
        capacity = self.capacity
        now_u = now / interval
        stripe = table.lock(fp)
        try:
            offset, found = table.slot(fp, now)
            tat = now_u
            if found:
                tat_s, tat_u, counted_with = _F3.unpack_from(buf, offset)
                if counted_with != interval:
                    tat_u = tat_s / interval
                if tat_u > now_u:
                    tat = tat_u
            new_tat = tat + cost
            allowed = new_tat - now_u <= capacity + 1e-6
            if allowed:
                _F3.pack_into(buf, offset, new_tat * interval, new_tat, interval)
        finally:
            table.unlock(stripe)
        if allowed:
            remaining = int(capacity - (new_tat - now_u) + 1e-6)
            return Decision(True, self.limit, max(0, remaining), (new_tat - now_u) * interval, 0.0, self.spec)
        remaining = int(capacity - (tat - now_u) + 1e-6)
        retry = (new_tat - capacity - now_u) * interval if cost <= capacity else 2.0 * self.window
        return Decision(False, self.limit, max(0, remaining), (tat - now_u) * interval, retry, self.spec)

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        fp = self.fingerprint(key)
        table = self.table
        interval = self.interval
        stripe = table.lock(fp)
        try:
            offset = table.find(fp)
            if offset >= 0:
                tat_s, tat_u, counted_with = _F3.unpack_from(self.buf, offset)
                if counted_with != interval:
                    tat_u = tat_s / interval
                tat = max(tat_u - cost, now / interval)
                _F3.pack_into(self.buf, offset, tat * interval, tat, interval)
        finally:
            table.unlock(stripe)


class LocalConcurrency(LocalLimit):
    """At most `limit` requests in flight per key on the node.

    Leases: time is cut into epochs of `window` seconds (the lease). A slot counts what is in flight
    in the current and the previous epoch; older counts are dropped. Each process remembers what it
    holds per key and moves its holdings into the current epoch (`renew`, run at least every
    window/3 — `start_renewal` schedules it — and on every acquire/release). A process that dies
    stops renewing, so its in-flight counts vanish within two leases; a live one never loses them.
    """

    __slots__ = ("_next_renew", "held")

    def __init__(self, spec: LimitSpec, table: SharedTable | None = None) -> None:
        super().__init__(spec, table)
        self.held: dict[str, list[float]] = {}  # key -> [epoch, count] held by this process
        self._next_renew = 0.0

    def check(self, key: str, now: float, cost: int = 1) -> Decision:
        """Acquire one in-flight unit; pair every allowed check with `release(key, now)`."""
        if now >= self._next_renew:
            self.renew(now)
        fp = self._cache.get(key) or self.fingerprint(key)
        table = self.table
        limit = self.limit
        stripe = table.lock(fp)
        try:
            offset, epoch, cur, prev = self._load(fp, now)
            held = self.held.get(key)
            if held is not None and held[0] != epoch:
                cur, prev = _migrate(held, epoch, cur, prev)
            inflight = cur + prev
            allowed = inflight + cost <= limit
            if allowed:
                cur += cost
                inflight += cost
                if held is None:
                    self.held[key] = [epoch, float(cost)]
                else:
                    held[1] += cost
            _F4.pack_into(self.buf, offset, (epoch + 2.0) * self.window, epoch, cur, prev)
        finally:
            table.unlock(stripe)
        remaining = int(limit - inflight) if inflight < limit else 0
        return Decision(allowed, limit, remaining, 0.0, 0.0 if allowed else 1.0, self.spec)

    def release(self, key: str, now: float, cost: int = 1) -> None:
        held = self.held.get(key)
        if held is None:
            return
        fp = self.fingerprint(key)
        table = self.table
        stripe = table.lock(fp)
        try:
            offset, epoch, cur, prev = self._load(fp, now)
            if held[0] == epoch:
                cur = max(0.0, cur - cost)
            elif held[0] == epoch - 1.0:
                prev = max(0.0, prev - cost)
            _F4.pack_into(self.buf, offset, (epoch + 2.0) * self.window, epoch, cur, prev)
        finally:
            table.unlock(stripe)
        held[1] -= cost
        if held[1] <= 0:
            del self.held[key]

    def refund(self, key: str, now: float, cost: int = 1) -> None:
        self.release(key, now, cost)

    def inflight(self, key: str, now: float) -> int:
        fp = self.fingerprint(key)
        count = 0.0
        stripe = self.table.lock(fp)
        try:
            offset = self.table.find(fp)
            if offset >= 0:
                _, _, cur, prev = _rolled(_F4.unpack_from(self.buf, offset), now // self.window)
                count = cur + prev
        finally:
            self.table.unlock(stripe)
        return int(count)

    def renew(self, now: float) -> int:
        """Move this process's holdings from earlier epochs into the current one; returns how many."""
        epoch = now // self.window
        self._next_renew = now + self.window / 3.0
        moved = 0
        for key, held in list(self.held.items()):
            if held[0] == epoch:
                continue
            fp = self.fingerprint(key)
            stripe = self.table.lock(fp)
            try:
                offset, current, cur, prev = self._load(fp, now)
                cur, prev = _migrate(held, current, cur, prev)
                _F4.pack_into(self.buf, offset, (current + 2.0) * self.window, current, cur, prev)
            finally:
                self.table.unlock(stripe)
            moved += 1
        return moved

    def start_renewal(self, loop: asyncio.AbstractEventLoop, clock: Any = None) -> asyncio.TimerHandle:
        """Renew every window/3 on `loop` (keeps long requests counted); cancel the handle to stop."""
        import time

        now_fn = clock or time.time
        handle: list[asyncio.TimerHandle] = []

        def tick() -> None:
            self.renew(now_fn())
            handle[0] = loop.call_later(self.window / 3.0, tick)

        handle.append(loop.call_later(self.window / 3.0, tick))
        return _Renewal(handle)  # type: ignore[return-value]

    def _load(self, fp: int, now: float) -> tuple[int, float, float, float]:
        offset, found = self.table.slot(fp, now)
        epoch = now // self.window
        if not found:
            return offset, epoch, 0.0, 0.0
        _, e, cur, prev = _rolled(_F4.unpack_from(self.buf, offset), epoch)
        return offset, e, cur, prev


class _Renewal:
    """A cancellable handle over a rescheduling timer."""

    def __init__(self, handle: list[asyncio.TimerHandle]) -> None:
        self._handle = handle

    def cancel(self) -> None:
        self._handle[0].cancel()


def _rolled(record: tuple[float, ...], epoch: float) -> tuple[float, float, float, float]:
    """A concurrency record seen from `epoch`: counts older than the previous epoch are dropped."""
    expires, e, cur, prev = record
    if e >= epoch:
        return expires, e, cur, prev
    if e == epoch - 1.0:
        return expires, epoch, 0.0, cur
    return expires, epoch, 0.0, 0.0


def _migrate(held: list[float], epoch: float, cur: float, prev: float) -> tuple[float, float]:
    """Move a process's holding into `epoch` (from the previous epoch, or re-add it if it expired)."""
    n = held[1]
    if held[0] == epoch - 1.0:
        prev = max(0.0, prev - n)
    cur += n
    held[0] = epoch
    return cur, prev


def local_limit(spec: LimitSpec, table: SharedTable | None = None) -> LocalLimit:
    """The node-local implementation of `spec`."""
    cls = {
        "fixed": LocalFixedWindow,
        "sliding": LocalSlidingWindow,
        "gcra": LocalGcra,
        "concurrency": LocalConcurrency,
    }[spec.algorithm]
    return cls(spec, table)


def check_all(limits: list[LocalLimit], key: str, now: float, cost: int = 1) -> list[Decision]:
    """Check several limits for one request: all count it, or — when one denies — none does."""
    decisions = []
    for index, limit in enumerate(limits):
        decision = limit.check(key, now, cost)
        decisions.append(decision)
        if not decision.allowed:
            for earlier in limits[:index]:
                earlier.refund(key, now, cost)
            break
    return decisions
