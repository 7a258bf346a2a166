"""Where cached responses live, behind one small interface:

    get(key) -> bytes | None            put(key, value, ttl, tags)         delete(key) -> count
    purge_prefix(prefix) -> count       purge_tag(tag) -> count            stats -> CacheStats

The node store also has `lock/unlock/locked(key)`: leases that make concurrent misses in different
workers wait for one backend request (tollway.plugins.builtin.proxy_cache).

`delete(key)` removes the key and its variants (keys that extend it with ``#v``), so invalidating a
URI never leaves a variant behind. Values are opaque bytes (tollway.cache.entry encodes them).

- `MemoryStore`: one process's dict, LRU by bytes. For tests, and for `store: worker`.
- `LmdbStore`: the node store. One LMDB file (memory-mapped, copy-on-write B+tree, readers never
  block) opened by every worker of the node: what one worker stores, the others hit; a worker that
  restarts loses nothing. Bounded by bytes with LRU eviction (below).
- `tollway.cache.redis_store.RedisStore`: the cluster store (asynchronous: same names, awaitables).

Why LMDB for the node: a read is a B+tree walk in a shared mapping with no lock and no system call
(readers never wait for the writer); the rate limiter's shared-memory table (tollway.state.shared)
holds fixed 64-byte records and would need an allocator for variable-size bodies, which is what LMDB
is; SQLite would parse SQL and take file locks per read. The hit cost through the gateway is measured
by `python bench/bench.py --scenario cache` (bench/cache_scenario.py).

Reuse without a read. A process keeps the last value it read per key and returns it again without an
LMDB read for up to `TOUCH_AFTER` while the node's change count (`Generation`) is unchanged: a hit on a
hot key then costs a dict lookup and a memory read instead of a read transaction.

LRU. Every key has an access time in seconds. A hit rewrites it only when it is older than
`TOUCH_AFTER` (so a hot key costs one small write transaction a second, not one per hit); an `order`
table indexed by (access time, key) makes the least recently used key the first row. A put that
brings the total over the byte budget evicts from the front until it fits.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from tollway.cache.stats import STATS

TOUCH_AFTER = 1.0
_META = struct.Struct("<dd")  # expiry, access time
_HEAD = struct.Struct("<dQ")  # before each stored value: expiry, a stamp that changes with every put
_RECENT_MAX = 1024  # values a process keeps by key, to return the same object while the stamp holds
_RECENT_BYTES = 32 << 20  # ...and their bytes at most
_TOTAL = b"total"


class CacheStats:
    """Counters a store keeps (this process's view)."""

    __slots__ = ("errors", "evictions", "puts")

    def __init__(self) -> None:
        self.evictions = 0
        self.puts = 0
        self.errors = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class MemoryStore:
    """One process's LRU dict, bounded by bytes."""

    is_async = False

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = CacheStats()
        self._data: OrderedDict[bytes, tuple[bytes, float, tuple[str, ...]]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._data)} keys {self.bytes}/{self.max_bytes} bytes>"

    def get(self, key: bytes) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] < time.time():
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: bytes, ttl: float, tags: Iterable[str] = ()) -> None:
        if len(value) > self.max_bytes:
            return
        self._remove(key)
        self._data[key] = (value, time.time() + ttl, tuple(tags))
        self.bytes += len(value)
        self.stats.puts += 1
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._data))
            self._remove(oldest)
            self.stats.evictions += 1
            STATS.evictions += 1

    def _remove(self, key: bytes) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self.bytes -= len(item[0])
        return True

    def delete(self, key: bytes) -> int:
        variants = key + b"#v"
        doomed = [k for k in self._data if k == key or k.startswith(variants)]
        return sum(self._remove(k) for k in doomed)

    def purge_prefix(self, prefix: bytes) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        return sum(self._remove(k) for k in doomed)

    def purge_tag(self, tag: str) -> int:
        doomed = [k for k, item in self._data.items() if tag in item[2]]
        return sum(self._remove(k) for k in doomed)

    def used_bytes(self) -> int:
        return self.bytes


class _Recent:
    """A value this process read: its stamp, and until when it may be reused without a read, if
    `changes` is still the node's change count."""

    __slots__ = ("changes", "stamp", "until", "value")

    def __init__(self, stamp: int, value: bytes, changes: int, until: float) -> None:
        self.stamp = stamp
        self.value = value
        self.changes = changes
        self.until = until


class Generation:
    """How many times the node store's values changed: one 8-byte counter in a file every process
    of the node maps (`count()` is a memory read, no system call). A writer advances it after each
    commit that puts or deletes values (under a file lock, so no advance is lost); a reader may reuse
    a value it read while the count it saw before and after that read is unchanged. A value read
    before a commit is never reused after it: the commit's advance comes after the commit, so after
    the read. A writer killed between its commit and its advance leaves copies in other processes
    reusable for at most `TOUCH_AFTER` (the reuse window), the cost of sparing every hit an LMDB
    read (a transaction, a B+tree walk: about a third of a hit's instructions)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < 8:
            os.ftruncate(self._fd, 8)  # zeros; a second process doing the same changes nothing
        self._map = mmap.mmap(self._fd, 8)
        self._view = memoryview(self._map).cast("Q")

    def count(self) -> int:
        count: int = self._view[0]
        return count

    def close(self) -> None:
        self._view.release()
        self._map.close()
        os.close(self._fd)

    def advance(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._view[0] = (self._view[0] + 1) & 0xFFFFFFFFFFFFFFFF
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class LmdbStore:
    """The node store: an LMDB environment in a directory every worker of the node opens."""

    is_async = False

    def __init__(self, path: str, max_bytes: int = 256 << 20) -> None:
        import lmdb  # only a gateway that caches on the node pays for the import

        self.path = path
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        os.makedirs(path, mode=0o700, exist_ok=True)  # copies of responses: this user's only
        # The map holds the budget plus B+tree pages and free pages awaiting reuse: twice the budget
        # and a margin (address space only; pages are used as written). sync/metasync off: a cache
        # may lose its last writes in a power cut, and each commit stays a memory write.
        self._env = lmdb.open(
            path,
            map_size=max_bytes * 2 + (64 << 20),
            max_dbs=8,
            writemap=True,
            sync=False,
            metasync=False,
            readahead=False,
            max_readers=1024,
            mode=0o600,
        )
        self._data = self._env.open_db(b"data")
        self._meta = self._env.open_db(b"meta")  # key -> expiry, access time
        self._order = self._env.open_db(b"order")  # access time (8 bytes, big-endian) + key -> b""
        self._tags = self._env.open_db(b"tags", dupsort=True)  # tag -> key
        self._locks = self._env.open_db(b"locks")  # key being filled -> lease end (coalescing)
        self._lock = threading.Lock()  # one writer per process (LMDB allows one per environment)
        self._changes = Generation(os.path.join(path, "changes"))
        self._map_full = lmdb.MapFullError
        self._pid = os.getpid()
        # key -> (stamp, value): an unchanged value is returned as the same bytes object, without a
        # copy, so callers can memoise what they decode from it (tollway.plugins.builtin.proxy_cache).
        self._recent: dict[bytes, _Recent] = {}
        self._recent_bytes = 0
        self._touched: dict[bytes, float] = {}  # key -> when this process last refreshed its LRU time

    def __repr__(self) -> str:
        return f"<LmdbStore {self.path} {self.used_bytes()}/{self.max_bytes} bytes>"

    def close(self) -> None:
        self._env.close()
        self._changes.close()

    def get(self, key: bytes) -> bytes | None:
        """The value, or None. A value this process read less than `TOUCH_AFTER` ago is returned
        without reading LMDB while the node's change count (`Generation`) says no value changed since;
        otherwise a hit reads one B+tree entry through the shared mapping (no copy unless the value
        changed since this process last read it) and, at most once a second per key and process,
        refreshes its LRU time in a small write transaction."""
        now = time.time()
        changes = self._changes.count()
        recent = self._recent.get(key)
        if recent is not None and recent.changes == changes and now < recent.until:
            return recent.value
        with self._env.begin(buffers=True) as txn:
            view = txn.get(key, db=self._data)
            if view is None:
                return None
            expiry, stamp = _HEAD.unpack_from(view)
            if recent is not None and recent.stamp == stamp:
                value = recent.value
            else:
                value = bytes(view[_HEAD.size :])
                if len(self._recent) >= _RECENT_MAX or self._recent_bytes + len(value) > _RECENT_BYTES:
                    self._recent.clear()
                    self._recent_bytes = 0
                self._recent_bytes += len(value)
        if expiry < now:
            self.delete_exact(key)
            return None
        # Reusable without a read only if no change was counted while this read ran (see Generation).
        unchanged = changes if self._changes.count() == changes else -1
        self._recent[key] = _Recent(stamp, value, unchanged, min(expiry, now + TOUCH_AFTER))
        if now - self._touched.get(key, 0.0) > TOUCH_AFTER:
            self._touch(key, now)
        return value

    def _touch(self, key: bytes, now: float) -> None:
        if len(self._touched) >= _RECENT_MAX:
            self._touched.clear()
        self._touched[key] = now
        with self._lock, self._env.begin(write=True) as txn:
            meta = txn.get(key, db=self._meta)
            if meta is None:
                return
            expiry, atime = _META.unpack(meta)
            txn.delete(_order_key(atime, key), db=self._order)
            txn.put(_order_key(now, key), b"", db=self._order)
            txn.put(key, _META.pack(expiry, now), db=self._meta)

    def put(self, key: bytes, value: bytes, ttl: float, tags: Iterable[str] = ()) -> None:
        if len(value) > self.max_bytes:
            return
        now = time.time()
        stored = _HEAD.pack(now + ttl, random.getrandbits(64)) + value
        for _ in range(3):
            try:
                with self._lock, self._env.begin(write=True) as txn:
                    total = self._total(txn) - self._remove(txn, key) + len(stored)
                    txn.put(key, stored, db=self._data)
                    txn.put(key, _META.pack(now + ttl, now), db=self._meta)
                    txn.put(_order_key(now, key), b"", db=self._order)
                    for tag in tags:
                        txn.put(tag.encode("utf-8"), key, db=self._tags)
                    total = self._evict(txn, total)
                    txn.put(_TOTAL, struct.pack("<q", total), db=self._meta)
                self._changes.advance()
                self.stats.puts += 1
                return
            except self._map_full:  # fragmentation outgrew the margin: make room, try again
                with self._lock, self._env.begin(write=True) as txn:
                    total = self._evict(txn, self._total(txn), target=self.max_bytes // 2)
                    txn.put(_TOTAL, struct.pack("<q", total), db=self._meta)
                self._changes.advance()

    def _evict(self, txn: Any, total: int, target: int | None = None) -> int:
        limit = self.max_bytes if target is None else target
        if total <= limit:
            return total
        cursor = txn.cursor(db=self._order)
        victims: list[bytes] = []
        freed = 0
        for order_key, _ in cursor:
            if total - freed <= limit:
                break
            key = order_key[8:]
            value = txn.get(key, db=self._data)
            freed += len(value) if value is not None else 0
            victims.append(key)
        for key in victims:
            self._remove(txn, key)
            self.stats.evictions += 1
            STATS.evictions += 1
        return total - freed

    def _total(self, txn: Any) -> int:
        raw = txn.get(_TOTAL, db=self._meta)
        return struct.unpack("<q", raw)[0] if raw is not None else 0

    def _remove(self, txn: Any, key: bytes) -> int:
        """Delete one key's rows; the bytes it held (0 if absent). Tag rows are dropped lazily."""
        value = txn.get(key, db=self._data)
        if value is None:
            return 0
        meta = txn.get(key, db=self._meta)
        if meta is not None:
            txn.delete(_order_key(_META.unpack(meta)[1], key), db=self._order)
            txn.delete(key, db=self._meta)
        txn.delete(key, db=self._data)
        return len(value)

    def delete_exact(self, key: bytes) -> int:
        return self._delete_keys([key])

    def _delete_keys(self, keys: Iterable[bytes]) -> int:
        count = 0
        with self._lock, self._env.begin(write=True) as txn:
            total = self._total(txn)
            for key in keys:
                freed = self._remove(txn, key)
                if freed:
                    count += 1
                    total -= freed
            txn.put(_TOTAL, struct.pack("<q", max(0, total)), db=self._meta)
        if count:  # nothing deleted (an unsafe request to an uncached URI): nothing to re-read
            self._changes.advance()
        return count

    def delete(self, key: bytes) -> int:
        return self._delete_keys([key, *self._keys_with_prefix(key + b"#v")])

    def purge_prefix(self, prefix: bytes) -> int:
        return self._delete_keys(self._keys_with_prefix(prefix))

    def _keys_with_prefix(self, prefix: bytes) -> list[bytes]:
        keys: list[bytes] = []
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._data)
            if not cursor.set_range(prefix):
                return keys
            for key in cursor.iternext(values=False):
                if not key.startswith(prefix):
                    break
                keys.append(key)
        return keys

    def purge_tag(self, tag: str) -> int:
        name = tag.encode("utf-8")
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._tags)
            keys = list(cursor.iternext_dup(keys=False)) if cursor.set_key(name) else []
        count = self._delete_keys(keys)
        with self._lock, self._env.begin(write=True) as txn:
            txn.delete(name, db=self._tags)
        return count

    def used_bytes(self) -> int:
        with self._env.begin() as txn:
            return self._total(txn)

    # -- fill locks: one backend request per missing key on the whole node ---------------------------
    def lock(self, key: bytes, lease: float) -> bool:
        """Take the right to fill `key` for `lease` seconds; False while another process holds it. A
        lease, not a lock: a worker that dies holding it delays the others by `lease` at most."""
        now = time.time()
        with self._lock, self._env.begin(write=True) as txn:
            held = txn.get(key, db=self._locks)
            if held is not None and struct.unpack("<d", held)[0] > now:
                return False
            txn.put(key, struct.pack("<d", now + lease), db=self._locks)
        return True

    def unlock(self, key: bytes) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            txn.delete(key, db=self._locks)

    def locked(self, key: bytes) -> bool:
        with self._env.begin() as txn:
            held = txn.get(key, db=self._locks)
        return held is not None and struct.unpack("<d", held)[0] > time.time()


def _order_key(atime: float, key: bytes) -> bytes:
    return struct.pack(">Q", int(atime * 1000)) + key


_OPEN: dict[str, LmdbStore] = {}


def node_store(path: str, max_bytes: int) -> LmdbStore:
    """The process's one handle on the node store at `path` (LMDB forbids opening an environment twice
    in a process). Opened on first use, in the worker: never inherited across a fork."""
    store = _OPEN.get(path)
    if store is None or store._pid != os.getpid():
        store = LmdbStore(path, max_bytes)
        store._pid = os.getpid()
        _OPEN[path] = store
    return store
