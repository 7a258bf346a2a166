"""Node-wide shared counters: one table in shared memory, used by every worker process of a node.

The supervisor creates the table (a memfd) before it starts workers and hands each worker the file
descriptor; workers map it and run every rate-limit check against it, so a node with N workers admits
exactly its limit, not N times it. No external service is involved.

Layout (all little-endian, fixed at creation)::

    header   4 KiB   magic, layout, bucket count, stripe count, lock kind, key salt
    locks    stripes x 64 B    robust process-shared pthread mutexes (or fcntl byte ranges)
    keys     buckets x 8 x 8 B  62-bit key fingerprints in 64-bit words, one cache line per bucket (0 = free)
    records  buckets x 8 x 64 B eight doubles per slot; their meaning depends on the algorithm

Keys. A key is hashed with BLAKE2b keyed by a random per-table salt into a 62-bit fingerprint: the low
bits pick a bucket of 8 slots (set-associative: a key lives in one of its bucket's 8 slots, so there are
no probe chains and no tombstones), the whole fingerprint identifies the slot. Two different keys with
the same fingerprint would share a counter; with 62 bits and a secret salt that takes ~2^31 live keys
by chance and cannot be forced by a client choosing its key. Each process caches key → fingerprint.

Eviction and a full table. Every record carries an expiry (its window's end, a GCRA TAT, a lease's
end); a slot whose record has expired is free for reuse. A new key takes a free or expired slot in its
bucket; if all 8 hold live entries, the one expiring soonest is evicted and counted in
`stats.evicted_live`. The evicted key starts from zero next time, so it may be admitted more than its
limit in that window: size the table for the number of keys that are live at once (the default, 2^17
slots, is 9 MiB of shared memory; `TOLLWAY_STATE_SLOTS` changes it).

Locking. Buckets are spread over `stripes` locks (bucket % stripes), so checks on different keys rarely
wait for each other. The lock is a robust, process-shared pthread mutex taken through the tiny C module
`_shmlock` (0.04 µs CPU per lock+unlock uncontended), or through ctypes on the same mutex when that
module is not built (0.5 µs). A worker killed while holding a lock does not wedge the node: the kernel
marks the mutex owner-dead, the next locker takes it over (`stats.recovered`). What the dead worker was
writing is at most one record, which may be stale. Measured alternatives (bench/state_local.py): fcntl
byte-range locks 1.4 µs CPU per lock+unlock (two system calls; 3.4 µs wall time on a loaded machine), a
POSIX semaphore 0.06 µs but never released if its holder dies. Where robust mutexes are unavailable
(not Linux/glibc) fcntl locks are used: the kernel releases them on death too.

Clock. `now` is wall-clock seconds (`time.time()`); windows are aligned to multiples of their length
since the epoch (a minute window resets at :00), the same windows the Redis policies use. A clock that
steps back never reopens a finished window: a record from a "future" window keeps counting.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import struct
import threading
from typing import Any, Final

from tollway.state.locks import (
    HEADER_SIZE,
    LOCK_PTHREAD,
    MUTEX_STRIDE,
    choose_lock,
    init_mutexes,
    open_locks,
)

MAGIC = b"TWSTATE1"
LAYOUT = 2  # 2: fingerprints are 62-bit
WAYS: Final = 8  # slots per bucket: one 64-byte cache line of fingerprints
RECORD: Final = 64  # bytes per slot record: eight doubles
# Fingerprints keep 62 bits: a compiled (mypyc) int below 2**62 is a machine word, a larger one a
# heap object whose every `&` and comparison is a library call (~800 instructions per check).
FP_MASK: Final = (1 << 62) - 1
DEFAULT_SLOTS = 1 << 17
DEFAULT_STRIPES = 64
LOCK_TIMEOUT = 1.0  # a lock held this long means a stuck (not dead) holder: fail the check, never hang
ENV_FD = "TOLLWAY_STATE_FD"
ENV_SLOTS = "TOLLWAY_STATE_SLOTS"
EPSILON = 1e-9  # float slack when comparing times built from repeated additions

_HEADER = struct.Struct("<8sIIIII12x16s")  # magic, layout, buckets, stripes, lock kind, ways, salt
_FPS: Final = struct.Struct("<8Q")
_F1: Final = struct.Struct("<d")
_F2 = struct.Struct("<2d")
_F3 = struct.Struct("<3d")
_F4 = struct.Struct("<4d")
_F8: Final = struct.Struct("<8d")
_CACHE_MAX = 1 << 16  # per-process key → fingerprint cache entries before it is cleared


class TableStats:
    """Per-process counters (the metrics layer sums them over workers)."""

    __slots__ = ("evicted_expired", "evicted_live", "lock_timeouts", "new_keys", "recovered")

    def __init__(self) -> None:
        self.new_keys = 0  # keys that took a slot
        self.evicted_expired = 0  # slots reused after their record expired
        self.evicted_live = 0  # live entries pushed out because their bucket was full
        self.recovered = 0  # locks taken over from a process that died holding them
        self.lock_timeouts = 0  # checks that gave up waiting for a stuck lock holder

    def as_dict(self) -> dict[str, int]:
        return {
            "new_keys": self.new_keys,
            "evicted_expired": self.evicted_expired,
            "evicted_live": self.evicted_live,
            "recovered": self.recovered,
            "lock_timeouts": self.lock_timeouts,
        }

    def __repr__(self) -> str:
        return "<TableStats " + " ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ">"


class StateLockTimeout(Exception):
    """A shared-table lock was held longer than LOCK_TIMEOUT by a live process."""


class SharedTable:
    """The node-wide table. Create it once per node (`create`), attach to it in each process (`attach`).

    Algorithms live in `tollway.state.local` (`LocalFixedWindow` and friends); they use `lock`,
    `unlock` and `slot` from here, always in that pattern::

        stripe = table.lock(fp)
        try:
            offset, found = table.slot(fp, now)
            ... read and write the record at `offset` in `table.buf` ...
        finally:
            table.unlock(stripe)
    """

    def __init__(self, fd: int, size: int, owner: bool) -> None:
        self.fd = fd
        self.owner = owner
        self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        magic, layout, buckets, stripes, lock_kind, ways, salt = _HEADER.unpack_from(self.buf, 0)
        if magic != MAGIC or layout != LAYOUT or ways != WAYS:
            raise ValueError(f"fd {fd} is not a Tollway state table of layout {LAYOUT}")
        self.buckets: int = buckets
        self.bucket_mask: int = buckets - 1
        self.stripes: int = stripes
        self.stripe_mask: int = stripes - 1
        self.salt: bytes = salt
        self.lock_kind: int = lock_kind
        self.keys_offset: int = HEADER_SIZE + stripes * MUTEX_STRIDE
        self.records_offset: int = self.keys_offset + buckets * WAYS * 8
        self.size = size
        self.stats = TableStats()
        self.lock_timeout = LOCK_TIMEOUT
        self._locks: Any = open_locks(self.buf, self.fd, stripes, lock_kind)
        self.lock_impl = type(self._locks).__name__
        self._acquire = self._locks.acquire
        self._release = self._locks.release
        # The fixed-window check and the batched policy's local step in one C call each
        # (`_shmlock.MutexArray`), or None where the locks are not the C module's (a pure-Python install,
        # fcntl locks): LocalFixedWindow and BatchedRedisPolicy then take their general path.
        self.fixed_window: Any = None
        self.take_reserve: Any = None
        layout = getattr(self._locks, "layout", None)
        if layout is not None:
            layout(self.keys_offset, self.records_offset, buckets)
            self.fixed_window = self._locks.fixed_window
            self.take_reserve = self._locks.take_reserve
        # The same memory as 64-bit words: one indexed read or write per field, where a struct
        # unpack_from/pack_into is a method call that builds (or parses) a tuple.
        self.words = memoryview(self.buf).cast("Q")
        self.doubles = memoryview(self.buf).cast("d")

    # -- lifecycle ---------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, slots: int = DEFAULT_SLOTS, stripes: int = DEFAULT_STRIPES, lock: str = "auto"
    ) -> SharedTable:
        """A new, empty table in an anonymous memfd (freed when the last process holding it exits)."""
        buckets = max(1, _pow2(max(slots, WAYS) // WAYS))
        stripes = min(_pow2(stripes), buckets)
        size = HEADER_SIZE + stripes * MUTEX_STRIDE + buckets * WAYS * (8 + RECORD)
        kind = choose_lock(lock)
        fd = _memfd("tollway-state")
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as buf:
                _HEADER.pack_into(buf, 0, MAGIC, LAYOUT, buckets, stripes, kind, WAYS, os.urandom(16))
                if kind == LOCK_PTHREAD:
                    init_mutexes(buf, stripes)
            table = cls(fd, size, owner=True)
        except BaseException:
            os.close(fd)
            raise
        return table

    @classmethod
    def attach(cls, fd: int) -> SharedTable:
        """Map a table created by another process (its fd inherited or passed over a socket)."""
        size = os.fstat(fd).st_size
        return cls(fd, size, owner=False)

    def close(self) -> None:
        self._locks = None
        self._acquire = self._release = _closed
        self.fixed_window = self.take_reserve = None
        self.words.release()
        self.doubles.release()
        with contextlib.suppress(BufferError):  # a C lock object still holds the buffer
            self.buf.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def fileno(self) -> int:
        return self.fd

    def __repr__(self) -> str:
        return (
            f"<SharedTable fd={self.fd} slots={self.buckets * WAYS} stripes={self.stripes} "
            f"lock={self.lock_impl} used={self.used()}>"
        )

    # -- the critical-section primitives -------------------------------------------------------------------
    def fingerprint(self, data: bytes) -> int:
        """62-bit keyed hash of a key; never 0 (0 marks a free slot)."""
        fp = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.salt).digest(), "little")
        return (fp & FP_MASK) or 1

    def lock(self, fp: int) -> int:
        """Lock the stripe that guards `fp`'s bucket; returns the stripe to pass to `unlock`."""
        stripe = fp & self.bucket_mask & self.stripe_mask
        try:
            if self._acquire(stripe, self.lock_timeout):
                self.stats.recovered += 1
        except TimeoutError:
            self.stats.lock_timeouts += 1
            raise StateLockTimeout(f"state table stripe {stripe} held over {self.lock_timeout}s") from None
        return stripe

    def unlock(self, stripe: int) -> None:
        self._release(stripe)

    def slot(self, fp: int, now: float) -> tuple[int, bool]:
        """(record offset, found) for `fp`, claiming a slot in its bucket when the key is new.

        Call with the stripe locked. A claimed slot's record is garbage: the caller writes all of it.
        """
        bucket = fp & self.bucket_mask
        way = self._way(bucket, fp)
        if way < 0:
            base = self.keys_offset + bucket * (WAYS * 8)
            return self._claim(bucket, base, _FPS.unpack_from(self.buf, base), fp, now), False
        return self.records_offset + (bucket * WAYS + way) * RECORD, True

    def find(self, fp: int) -> int:
        """The record offset of `fp`, or -1 (stripe locked by the caller)."""
        bucket = fp & self.bucket_mask
        way = self._way(bucket, fp)
        if way < 0:
            return -1
        return self.records_offset + (bucket * WAYS + way) * RECORD

    def _way(self, bucket: int, fp: int) -> int:
        """The way of `bucket` holding `fp`, or -1."""
        words = self.words
        first = (self.keys_offset >> 3) + bucket * WAYS
        for way in range(WAYS):
            if words[first + way] == fp:
                return way
        return -1

    def _claim(self, bucket: int, base: int, fps: tuple[int, ...], fp: int, now: float) -> int:
        records = self.records_offset + bucket * WAYS * RECORD
        stats = self.stats
        stats.new_keys += 1
        if 0 in fps:
            way = fps.index(0)
        else:
            buf = self.buf
            expiries = [_F1.unpack_from(buf, records + w * RECORD)[0] for w in range(WAYS)]
            soonest = min(expiries)
            way = expiries.index(soonest)
            if soonest > now:
                stats.evicted_live += 1
            else:
                stats.evicted_expired += 1
        # Record first, fingerprint second: a process killed in between leaves a free-looking slot,
        # never a key pointing at another key's counts.
        offset = records + way * RECORD
        _F8.pack_into(self.buf, offset, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        struct.pack_into("<Q", self.buf, base + way * 8, fp)
        return offset

    # -- maintenance and inspection ------------------------------------------------------------------------
    def used(self, now: float | None = None) -> int:
        """Slots holding a key (not yet expired at `now`, when given). A scan: not for the hot path."""
        count = 0
        buf = self.buf
        for bucket in range(self.buckets):
            fps = _FPS.unpack_from(buf, self.keys_offset + bucket * WAYS * 8)
            for way, fp in enumerate(fps):
                if not fp:
                    continue
                if now is not None:
                    offset = self.records_offset + (bucket * WAYS + way) * RECORD
                    if _F1.unpack_from(buf, offset)[0] <= now:
                        continue
                count += 1
        return count

    def clear(self) -> None:
        """Forget every key (tests; a config change that redefines limits keeps its keys instead)."""
        for stripe in range(self.stripes):
            self._acquire(stripe, self.lock_timeout)
        try:
            start = self.keys_offset
            self.buf[start : self.size] = bytes(self.size - start)
        finally:
            for stripe in range(self.stripes):
                self._release(stripe)


# -- the node's table in this process ----------------------------------------------------------------------
_node_table: SharedTable | None = None
_node_lock = threading.Lock()


def node_table() -> SharedTable:
    """This node's shared table: the supervisor's (inherited fd), else a private one for this process.

    A private table is still exact for a single process; it is what `python -m tollway` gets with one
    worker run in-process, and what unit tests get.
    """
    global _node_table
    table = _node_table
    if table is not None:
        return table
    with _node_lock:
        if _node_table is None:
            fd = os.environ.get(ENV_FD)
            _node_table = SharedTable.attach(int(fd)) if fd else SharedTable.create(_slots_from_env())
        return _node_table


def current_node_table() -> SharedTable | None:
    """The node table if this process has one already (never creates it)."""
    return _node_table


def set_node_table(table: SharedTable | None) -> None:
    """Install the table this process uses (the worker at start-up; tests)."""
    global _node_table
    _node_table = table


def create_for_workers() -> SharedTable:
    """Called by the supervisor: a table sized from TOLLWAY_STATE_SLOTS, its fd to pass to workers."""
    table = SharedTable.create(_slots_from_env())
    os.set_inheritable(table.fd, False)  # passed explicitly (pass_fds), never leaked to other children
    return table


def _slots_from_env() -> int:
    text = os.environ.get(ENV_SLOTS)
    return int(text) if text else DEFAULT_SLOTS


def _closed(*args: Any) -> Any:
    raise ValueError("the shared table is closed")


def _memfd(name: str) -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name, os.MFD_CLOEXEC)
    import tempfile  # no memfd (macOS): an unlinked file in shared memory or tmp

    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix=name + "-", dir=directory)
    os.unlink(path)
    return fd


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
