"""Locks for the node-shared table (tollway.state.shared): robust process-shared pthread mutexes in the
table's own memory — through the C module `_shmlock` when built, else through ctypes on the same mutexes —
or fcntl byte-range locks where robust mutexes do not exist.

Every lock array has the same two methods: ``acquire(index, timeout) -> bool`` (True when the previous
holder died holding it; raises TimeoutError after `timeout` seconds) and ``release(index)``.

Not compiled with mypyc (ctypes); only the hot path's `acquire`/`release` matter, and with the C module
those are C functions.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import threading
from typing import Any

# ctypes is imported only where it is used (creating a table, or no C module): a worker attaching a
# table through the C module never loads it (a few hundred KB per worker).

HEADER_SIZE = 4096
MUTEX_STRIDE = 64
LOCK_PTHREAD = 1
LOCK_FCNTL = 2


def choose_lock(lock: str) -> int:
    if lock == "fcntl":
        return LOCK_FCNTL
    if lock not in ("auto", "pthread"):
        raise ValueError(f"unknown lock kind {lock!r} (auto, pthread or fcntl)")
    if _pthread_robust_available():
        return LOCK_PTHREAD
    if lock == "pthread":
        raise RuntimeError("robust process-shared pthread mutexes are not available on this platform")
    return LOCK_FCNTL


def _pthread_robust_available() -> bool:
    return sys.platform.startswith("linux") and _libc() is not None


def open_locks(buf: mmap.mmap, fd: int, stripes: int, kind: int) -> Any:
    """The lock array of a table whose header says `kind`."""
    if kind == LOCK_FCNTL:
        return FcntlLocks(fd, stripes)
    if kind != LOCK_PTHREAD:
        raise ValueError(f"unknown lock kind {kind} in the table header")
    if os.environ.get("TOLLWAY_STATE_LOCK") != "ctypes":
        native = _native_mutexes(buf, HEADER_SIZE, stripes)
        if native is not None:
            return native
    return CtypesMutexes(buf, HEADER_SIZE, stripes)


def _native_mutexes(buf: mmap.mmap, offset: int, count: int) -> Any:
    try:
        from tollway.state import _shmlock  # type: ignore[attr-defined]
    except ImportError:
        return None
    if getattr(_shmlock, "ABI", None) != 1 or _shmlock.MUTEX_STRIDE != MUTEX_STRIDE:
        return None  # a stale build: the ctypes path drives the same mutexes
    return _shmlock.MutexArray(buf, offset, count)


def init_mutexes(buf: mmap.mmap, count: int) -> None:
    native = _native_mutexes(buf, HEADER_SIZE, count)
    if native is not None:
        native.initialize()
        del native  # releases its export of `buf`
        return
    CtypesMutexes(buf, HEADER_SIZE, count).initialize()


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.pthread_mutexattr_setrobust  # noqa: B018  (present on glibc ≥ 2.12)
            libc.pthread_mutex_consistent  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
        else:
            _LIBC = libc
    return _LIBC or None


_EBUSY, _EOWNERDEAD, _ETIMEDOUT = 16, 130, 110


class CtypesMutexes:
    """The same robust mutexes as `_shmlock.MutexArray`, driven through ctypes (pure-Python installs)."""

    def __init__(self, buf: mmap.mmap, offset: int, count: int) -> None:
        import ctypes

        libc = _libc()
        if libc is None:
            raise RuntimeError("libc with robust pthread mutexes not found")
        self._ctypes = ctypes
        self._libc = libc
        self._holder = (ctypes.c_char * (count * MUTEX_STRIDE)).from_buffer(buf, offset)
        base = ctypes.addressof(self._holder)
        self._ptrs = [ctypes.c_void_p(base + i * MUTEX_STRIDE) for i in range(count)]
        self._trylock = libc.pthread_mutex_trylock
        self._unlock = libc.pthread_mutex_unlock
        self.recovered = 0

    def initialize(self) -> None:
        libc = self._libc
        attr = self._ctypes.create_string_buffer(64)
        libc.pthread_mutexattr_init(attr)
        libc.pthread_mutexattr_setpshared(attr, 1)  # PTHREAD_PROCESS_SHARED
        libc.pthread_mutexattr_setrobust(attr, 1)  # PTHREAD_MUTEX_ROBUST
        for ptr in self._ptrs:
            err = libc.pthread_mutex_init(ptr, attr)
            if err:
                raise OSError(err, os.strerror(err))
        libc.pthread_mutexattr_destroy(attr)

    def acquire(self, index: int, timeout: float) -> bool:
        ptr = self._ptrs[index]
        err = self._trylock(ptr)
        if err == _EBUSY:
            import struct
            import time

            deadline = time.time() + timeout  # struct timespec {long tv_sec; long tv_nsec;}
            spec = self._ctypes.create_string_buffer(
                struct.pack("ll", int(deadline), int(deadline % 1 * 1e9))
            )
            err = self._libc.pthread_mutex_timedlock(ptr, spec)
        if err == 0:
            return False
        if err == _EOWNERDEAD:
            self._libc.pthread_mutex_consistent(ptr)
            self.recovered += 1
            return True
        if err == _ETIMEDOUT:
            raise TimeoutError("shared table lock not acquired in time")
        raise OSError(err, os.strerror(err))

    def release(self, index: int) -> None:
        self._unlock(self._ptrs[index])


class FcntlLocks:
    """POSIX record locks on one byte per stripe: portable, released by the kernel when a holder dies,
    but two syscalls per check (3.4 µs measured). POSIX locks belong to the process, so threads of one
    process are serialised by a threading lock per stripe."""

    def __init__(self, fd: int, count: int) -> None:
        self.fd = fd
        self._threads = [threading.Lock() for _ in range(count)]
        self.recovered = 0

    def acquire(self, index: int, timeout: float) -> bool:
        if not self._threads[index].acquire(timeout=timeout):
            raise TimeoutError("shared table lock not acquired in time")
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, index)
        except BaseException:
            self._threads[index].release()
            raise
        return False

    def release(self, index: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, index)
        self._threads[index].release()
