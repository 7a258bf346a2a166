"""The node-table algorithms with a fake clock: exact admission counts, window boundaries, GCRA burst,
sliding-window weights, concurrency leases, eviction and the full-table behaviour, lock variants."""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tollway.state import locks
from tollway.state.limits import LocalPolicy
from tollway.state.local import (
    LocalConcurrency,
    LocalFixedWindow,
    LocalGcra,
    LocalSlidingWindow,
    check_all,
    local_limit,
    sliding_retry_after,
)
from tollway.state.shared import WAYS, SharedTable
from tollway.state.spec import Decision, LimitSpec, most_restrictive

T0 = 1_000_000_020.0  # a multiple of 60: the start of a minute window


def _native_available() -> bool:
    try:
        from tollway.state import _shmlock  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["native", "ctypes", "fcntl"])
def table(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[SharedTable]:
    kind = request.param
    if kind == "native" and not _native_available():
        pytest.skip("tollway.state._shmlock is not built (TOLLWAY_PURE_PYTHON install)")
    if kind == "ctypes":
        monkeypatch.setenv("TOLLWAY_STATE_LOCK", "ctypes")
    t = SharedTable.create(1 << 10, lock="fcntl" if kind == "fcntl" else "pthread")
    expected = {"native": "MutexArray", "ctypes": "CtypesMutexes", "fcntl": "FcntlLocks"}[kind]
    assert t.lock_impl == expected
    yield t
    t.close()


def spec(limit: int, window: float, algorithm: str = "fixed", **kw: object) -> LimitSpec:
    return LimitSpec("minute", limit, window, algorithm, **kw)  # type: ignore[arg-type]


# -- fixed window -------------------------------------------------------------------------------------------
def test_fixed_window_admits_exactly_the_limit_then_resets_at_the_boundary(table: SharedTable) -> None:
    limit = LocalFixedWindow(spec(5, 60), table)
    decisions = [limit.check("alice", T0 + 10) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert decisions[0].reset_after == pytest.approx(50.0)
    assert decisions[-1].retry_after == pytest.approx(50.0)
    assert not limit.check("alice", T0 + 59.999).allowed
    fresh = limit.check("alice", T0 + 60.0)
    assert fresh.allowed and fresh.remaining == 4 and fresh.reset_after == pytest.approx(60.0)


def test_fixed_window_one_call_check_decides_exactly_as_the_general_path() -> None:
    """`_shmlock`'s fixed_window (one C call for a known key) against the memoryview path, step by step:
    window boundaries, costs, denials, a clock stepping back, windows that are not binary fractions."""
    if not _native_available():
        pytest.skip("tollway.state._shmlock is not built (TOLLWAY_PURE_PYTHON install)")
    rng = random.Random(17)
    for window in (60.0, 0.1, 7.3):
        fast_table, slow_table = SharedTable.create(1 << 10), SharedTable.create(1 << 10)
        slow_table.fixed_window = None  # the general path only
        assert fast_table.fixed_window is not None
        fast, slow = (
            LocalFixedWindow(spec(7, window), fast_table),
            LocalFixedWindow(spec(7, window), slow_table),
        )
        now = T0
        try:
            for _ in range(600):
                now += rng.choice([0.0, 0.0, 0.01, window / 3, window, -window / 2])
                key, cost = rng.choice(["a", "b", "c"]), rng.choice([1, 1, 1, 2, 8])
                a, b = fast.check(key, now, cost), slow.check(key, now, cost)
                assert (a.allowed, a.remaining, a.reset_after, a.retry_after) == (
                    b.allowed,
                    b.remaining,
                    b.reset_after,
                    b.retry_after,
                ), (window, now, key, cost)
        finally:
            fast_table.close()
            slow_table.close()


def test_fixed_window_one_call_statuses_and_argument_checks() -> None:
    if not _native_available():
        pytest.skip("tollway.state._shmlock is not built (TOLLWAY_PURE_PYTHON install)")
    table = SharedTable.create(1 << 10)
    limit = LocalFixedWindow(spec(2, 60), table)
    fp = limit.fingerprint("k")
    try:
        assert table.fixed_window(fp, T0, 60.0, 2, 1) == (2, 0.0, 0.0)  # a new key: general path
        assert limit.check("k", T0).allowed  # claims the slot
        assert table.fixed_window(fp, T0, 60.0, 2, 1) == (1, 2.0, T0 + 60.0)
        assert table.fixed_window(fp, T0, 60.0, 2, 1) == (0, 2.0, T0 + 60.0)  # denied: unchanged
        assert table.fixed_window(fp, T0 + 60.0, 60.0, 2, 1) == (1, 1.0, T0 + 120.0)
        stripe = table.lock(fp)  # held (by this thread): the one-call check does not wait for it
        try:
            assert table.fixed_window(fp, T0 + 60.0, 60.0, 2, 1) == (3, 0.0, 0.0)
        finally:
            table.unlock(stripe)
        with pytest.raises(ValueError):
            table.fixed_window(fp, T0, 0.0, 2, 1)  # no window
        with pytest.raises(TypeError):
            table.fixed_window(fp, T0)
        with pytest.raises(OverflowError):
            table.fixed_window(-1, T0, 60.0, 2, 1)  # a fingerprint is unsigned
    finally:
        table.close()


def test_take_reserve_statuses() -> None:
    """`_shmlock`'s take_reserve (the batched policy's local step for a known key)."""
    if not _native_available():
        pytest.skip("tollway.state._shmlock is not built (TOLLWAY_PURE_PYTHON install)")
    table = SharedTable.create(1 << 10)
    fp = table.fingerprint(b"key")
    records = table.records_offset + (fp & table.bucket_mask) * WAYS * 64  # the bucket's records
    record = struct.Struct("<8d")  # expires, wid, reserve, blocked_until, retry_at, remaining, stock, last
    try:
        assert table.take_reserve(fp, T0, 1) == (3, 0.0, 0.0, 0.0, 0.0, 0.0)  # new: general path
        stripe = table.lock(fp)
        offset, found = table.slot(fp, T0)
        record.pack_into(table.buf, offset, T0 + 60, 7.0, 3.0, 0.0, T0 + 5, 40.0, 10.0, T0)
        table.unlock(stripe)
        assert not found and records <= offset < records + WAYS * 64
        assert table.take_reserve(fp, T0, 2) == (0, T0 + 60, 1.0, T0 + 5, 40.0, 10.0)  # taken
        assert table.take_reserve(fp, T0, 2) == (2, T0 + 60, 1.0, T0 + 5, 40.0, 10.0)  # empty
        assert record.unpack_from(table.buf, offset) == (T0 + 60, 7.0, 1.0, 0.0, T0 + 5, 40.0, 10.0, T0)
        assert table.take_reserve(fp, T0 + 61, 1)[0] == 2  # expired reserve: a slice is needed
        record.pack_into(table.buf, offset, T0 + 60, 7.0, 0.0, T0 + 3, T0 + 5, 0.0, 10.0, T0)
        assert table.take_reserve(fp, T0, 1)[0] == 1  # blocked
        assert table.take_reserve(fp, T0 + 3, 1)[0] == 2  # the block is over
        stripe = table.lock(fp)
        try:
            assert table.take_reserve(fp, T0, 1)[0] == 4  # busy: the general path waits
        finally:
            table.unlock(stripe)
        with pytest.raises(TypeError):
            table.take_reserve(fp, T0)
    finally:
        table.close()


def test_a_check_waits_for_a_stripe_another_thread_holds(table: SharedTable) -> None:
    limit = LocalFixedWindow(spec(3, 60), table)
    assert limit.check("busy", T0).allowed
    locked, released = threading.Event(), threading.Event()

    def hold_briefly() -> None:  # a robust mutex is unlocked by the thread that locked it
        stripe = table.lock(limit.fingerprint("busy"))
        locked.set()
        time.sleep(0.1)
        released.set()
        table.unlock(stripe)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    try:
        assert locked.wait(5)
        decision = limit.check("busy", T0)
        assert released.is_set() and decision.allowed and decision.remaining == 1
    finally:
        holder.join()


def test_fixed_window_keys_are_independent_and_cost_counts(table: SharedTable) -> None:
    limit = LocalFixedWindow(spec(10, 60), table)
    assert limit.check("a", T0, cost=7).remaining == 3
    assert not limit.check("a", T0, cost=4).allowed
    assert limit.check("a", T0, cost=3).remaining == 0
    assert limit.check("b", T0, cost=10).allowed
    assert not limit.check("c", T0, cost=11).allowed  # more than the whole limit: never


def test_fixed_window_refund_and_clock_stepping_back(table: SharedTable) -> None:
    limit = LocalFixedWindow(spec(2, 60), table)
    assert limit.check("a", T0 + 61).allowed
    assert limit.check("a", T0 + 61).allowed
    limit.refund("a", T0 + 62)
    assert limit.check("a", T0 + 62).allowed
    # The clock steps back into the previous window: the later window keeps counting (no reset).
    back = limit.check("a", T0 + 30)
    assert not back.allowed and back.remaining == 0


def test_identity_ignores_the_limit_value_so_a_reload_keeps_counts(table: SharedTable) -> None:
    LocalFixedWindow(spec(3, 60), table).check("a", T0, cost=3)
    raised = LocalFixedWindow(spec(5, 60), table).check("a", T0)
    assert raised.allowed and raised.remaining == 1
    other_scope = LocalFixedWindow(spec(3, 60, scope="route-2"), table).check("a", T0)
    assert other_scope.remaining == 2


# -- sliding window ---------------------------------------------------------------------------------------
def test_sliding_window_weights_the_previous_window(table: SharedTable) -> None:
    limit = LocalSlidingWindow(spec(10, 60), table)
    for _ in range(10):
        assert limit.check("k", T0 + 50).allowed
    assert not limit.check("k", T0 + 55).allowed
    # 15 s into the next window the previous count weighs 0.75: 7.5 + 2 admitted <= 10, a third not.
    results = [limit.check("k", T0 + 75) for _ in range(3)]
    assert [d.allowed for d in results] == [True, True, False]
    # Retry-After is when the decaying estimate leaves room for one more: 60*(1-7/10) - 15 = 3 s.
    assert results[2].retry_after == pytest.approx(3.0)
    assert not limit.check("k", T0 + 77.9).allowed
    assert limit.check("k", T0 + 78.0 + 1e-6).allowed


def test_sliding_window_never_exceeds_the_limit_per_calendar_window(table: SharedTable) -> None:
    limit = LocalSlidingWindow(spec(20, 10), table)
    admitted: dict[int, int] = {}
    for step in range(400):
        now = T0 + step * 0.1
        if limit.check("k", now).allowed:
            admitted[int((now - T0) // 10)] = admitted.get(int((now - T0) // 10), 0) + 1
    assert max(admitted.values()) <= 20
    assert sum(admitted.values()) >= 20 * 3  # and it does let traffic through


def test_sliding_retry_after_formula() -> None:
    assert sliding_retry_after(prev=10, cur=2, elapsed=15, window=60, limit=10, cost=1) == pytest.approx(3.0)
    # the current window alone is full: wait for the next window, then for cur's weight to decay
    assert sliding_retry_after(prev=0, cur=10, elapsed=30, window=60, limit=10, cost=1) == pytest.approx(36.0)
    assert sliding_retry_after(prev=0, cur=0, elapsed=0, window=60, limit=1, cost=2) == 120.0


# -- GCRA ---------------------------------------------------------------------------------------------------
def test_gcra_burst_then_steady_rate(table: SharedTable) -> None:
    limit = LocalGcra(spec(10, 10, "gcra", burst=3), table)  # 1 per second, bursts of 3
    burst = [limit.check("k", T0) for _ in range(4)]
    assert [d.allowed for d in burst] == [True, True, True, False]
    assert [d.remaining for d in burst[:3]] == [2, 1, 0]
    assert burst[3].retry_after == pytest.approx(1.0)
    assert not limit.check("k", T0 + 0.999).allowed
    assert limit.check("k", T0 + 1.0).allowed
    assert not limit.check("k", T0 + 1.0).allowed
    full = limit.check("k", T0 + 100)  # idle long enough: the whole burst is back
    assert full.allowed and full.remaining == 2


def test_gcra_default_burst_is_the_limit_and_counts_exactly(table: SharedTable) -> None:
    limit = LocalGcra(spec(100, 60, "gcra"), table)
    assert sum(limit.check("k", T0).allowed for _ in range(150)) == 100
    # over the next 60 s exactly one unit per 0.6 s comes back
    admitted = sum(limit.check("k", T0 + i * 0.1).allowed for i in range(1, 601))
    assert admitted == 100


def test_gcra_refund(table: SharedTable) -> None:
    limit = LocalGcra(spec(2, 10, "gcra"), table)
    assert limit.check("k", T0).allowed and limit.check("k", T0).allowed
    limit.refund("k", T0)
    assert limit.check("k", T0).allowed


# -- concurrency ------------------------------------------------------------------------------------------
def test_concurrency_limit_acquire_release(table: SharedTable) -> None:
    limit = LocalConcurrency(spec(2, 30, "concurrency"), table)
    assert limit.check("k", T0).allowed
    assert limit.check("k", T0).allowed
    denied = limit.check("k", T0)
    assert not denied.allowed and denied.remaining == 0 and denied.retry_after > 0
    limit.release("k", T0 + 1)
    assert limit.check("k", T0 + 1).allowed
    assert limit.inflight("k", T0 + 1) == 2


def test_concurrency_counts_of_a_dead_process_expire_within_two_leases(table: SharedTable) -> None:
    lease = 30.0
    dead = LocalConcurrency(spec(2, lease, "concurrency"), table)  # "another process" that dies
    live = LocalConcurrency(spec(2, lease, "concurrency"), table)
    assert dead.check("k", T0).allowed and dead.check("k", T0).allowed
    assert not live.check("k", T0 + 1).allowed
    # one lease later the dead process's counts still count (they may be renewed)...
    assert not live.check("k", T0 + lease + 1).allowed
    # ...two leases later nobody renewed them: gone.
    assert live.check("k", T0 + 2 * lease + 1).allowed


def test_concurrency_renewal_keeps_long_requests_counted(table: SharedTable) -> None:
    lease = 30.0
    holder = LocalConcurrency(spec(1, lease, "concurrency"), table)
    other = LocalConcurrency(spec(1, lease, "concurrency"), table)
    assert holder.check("k", T0).allowed
    for step in range(1, 20):  # a ten-minute request; renewals every lease/3
        now = T0 + step * lease / 3
        holder.renew(now)
        assert not other.check("k", now).allowed
    holder.release("k", T0 + 20 * lease / 3)
    assert other.check("k", T0 + 20 * lease / 3).allowed


# -- several limits, the table ------------------------------------------------------------------------------
def test_check_all_counts_all_or_none(table: SharedTable) -> None:
    minute = LocalFixedWindow(LimitSpec("minute", 5, 60), table)
    second = LocalFixedWindow(LimitSpec("second", 2, 1), table)
    results = [check_all([minute, second], "k", T0 + 0.5) for _ in range(3)]
    assert [all(d.allowed for d in r) for r in results] == [True, True, False]
    assert results[2][1].spec.name == "second"
    # the denied request gave its minute unit back: 3 left, not 2
    assert minute.check("k", T0 + 1.5).remaining == 2
    assert most_restrictive(results[1]).spec.name == "second"


def test_full_bucket_evicts_the_entry_expiring_soonest(monkeypatch: pytest.MonkeyPatch) -> None:
    t = SharedTable.create(WAYS)  # one bucket: eight slots
    try:
        assert t.buckets == 1
        limit = LocalFixedWindow(spec(1, 60), t)
        short = LocalFixedWindow(LimitSpec("second", 1, 1), t)
        for i in range(WAYS - 1):
            assert limit.check(f"k{i}", T0).allowed
        assert short.check("soon", T0).allowed  # expires at T0 + 1, the others at T0 + 60
        assert limit.check("new", T0).allowed  # the bucket is full of live entries
        assert t.stats.evicted_live == 1
        assert short.check("soon", T0).allowed  # evicted: its count restarted (documented)
        assert t.used(T0) == WAYS
        # once entries expire, their slots are reused without counting live evictions
        assert limit.check("later", T0 + 120).allowed
        assert t.stats.evicted_expired == 1
        assert repr(t).startswith("<SharedTable fd=")
    finally:
        t.close()


def test_fingerprints_are_salted_per_table() -> None:
    a, b = SharedTable.create(64), SharedTable.create(64)
    try:
        assert a.fingerprint(b"key") != b.fingerprint(b"key")
        attached = SharedTable.attach(a.fileno())
        assert attached.fingerprint(b"key") == a.fingerprint(b"key")
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("lock", ["native", "ctypes"])
def test_a_stuck_lock_holder_times_out_and_the_request_passes(
    lock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (fcntl locks belong to the process: a thread of this one cannot be blocked by another)
    if lock == "ctypes":
        monkeypatch.setenv("TOLLWAY_STATE_LOCK", "ctypes")
    elif not _native_available():
        pytest.skip("tollway.state._shmlock is not built (TOLLWAY_PURE_PYTHON install)")
    table = SharedTable.create(1 << 10)
    policy = LocalPolicy(spec(5, 60), table)
    fp = policy.limit.fingerprint("k")
    stripe = table.lock(fp)
    released = threading.Event()

    def other() -> None:
        table.lock_timeout = 0.05
        decision = policy.check("k", T0)
        assert decision.allowed and decision.degraded == "fail-open"
        released.set()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(10)  # bounded: without the lock timeout it would wait for the holder forever
    table.unlock(stripe)
    assert released.is_set()
    assert table.stats.lock_timeouts == 1
    table.close()


def test_local_limit_factory_and_reprs(table: SharedTable) -> None:
    assert isinstance(local_limit(spec(1, 60, "gcra"), table), LocalGcra)
    assert repr(local_limit(spec(1, 60, "sliding"), table)) == "<LocalSlidingWindow minute 1/60s sliding>"
    d = Decision(False, 5, 0, 2.0, 2.0, spec(5, 60), "fail-closed")
    assert d.unavailable and "fail-closed" in repr(d)
    with pytest.raises(ValueError):
        LimitSpec("x", 1, 0)
    with pytest.raises(ValueError):
        LimitSpec("x", 1, 1, "leaky")


def test_lock_choice() -> None:
    assert locks.choose_lock("fcntl") == locks.LOCK_FCNTL
    assert locks.choose_lock("auto") == locks.LOCK_PTHREAD  # Linux with glibc
    with pytest.raises(ValueError):
        locks.choose_lock("spin")


async def test_concurrency_through_the_local_policy(table: SharedTable) -> None:
    import asyncio

    policy = LocalPolicy(spec(1, 30, "concurrency"), table)
    assert policy.check("k", T0).allowed
    assert not policy.check("k", T0).allowed
    policy.release("k", T0)
    assert policy.check("k", T0).allowed
    renewal = policy.start_renewal(asyncio.get_running_loop())
    renewal.cancel()
    with pytest.raises(TypeError):
        LocalPolicy(spec(1, 30), table).release("k", T0)
