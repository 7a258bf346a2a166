"""Per-check CPU cost of the node-shared rate-limit table (µs), and what its lock costs.

    python bench/state_local.py [--checks N] [--redis host:port]

Measures CPU time in this process (no lock contention; other load on the machine still perturbs it):
  - lock+unlock pairs: the C robust mutex, the same mutex through ctypes, an fcntl byte-range lock,
    a POSIX semaphore (multiprocessing.Lock — fast, but never released if its holder dies);
  - one `check` per algorithm on one hot key, and on 5,000 keys;
  - with --redis: the batched policy's local path (a request admitted from the node's reserve).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import mmap
import multiprocessing
import os
import time
import uuid

from tollway.state.limits import BatchedRedisPolicy
from tollway.state.local import local_limit
from tollway.state.locks import CtypesMutexes
from tollway.state.shared import SharedTable
from tollway.state.spec import Decision, LimitSpec


def per_call(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    """CPU µs per call (process time: other processes on a shared machine do not inflate it)."""
    started = time.process_time()
    fn(n)
    return (time.process_time() - started) / n * 1e6


def locks(n: int) -> dict[str, float]:
    fd = os.memfd_create("bench", 0)
    os.ftruncate(fd, 1 << 16)
    buf = mmap.mmap(fd, 1 << 16)
    results = {}
    try:
        from tollway.state._shmlock import MutexArray  # type: ignore[attr-defined]

        native = MutexArray(buf, 0, 4)
        native.initialize()

        def run_native(k: int) -> None:
            acquire, release = native.acquire, native.release
            for _ in range(k):
                acquire(1, 1.0)
                release(1)

        results["robust pthread mutex, C module"] = per_call(run_native, n)
    except ImportError:
        results["robust pthread mutex, C module"] = float("nan")
    ctypes_locks = CtypesMutexes(buf, 4096, 4)
    ctypes_locks.initialize()

    def run_ctypes(k: int) -> None:
        for _ in range(k):
            ctypes_locks.acquire(1, 1.0)
            ctypes_locks.release(1)

    def run_fcntl(k: int) -> None:
        for _ in range(k):
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1)
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 1)

    semaphore = multiprocessing.Lock()

    def run_semaphore(k: int) -> None:
        for _ in range(k):
            semaphore.acquire()
            semaphore.release()

    results["robust pthread mutex, ctypes"] = per_call(run_ctypes, n)
    results["fcntl byte-range lock"] = per_call(run_fcntl, n)
    results["POSIX semaphore (not robust)"] = per_call(run_semaphore, n)
    return results


def checks(n: int) -> dict[str, float]:
    table = SharedTable.create(1 << 17)
    now = time.time()
    results = {}
    for algorithm in ("fixed", "sliding", "gcra", "concurrency"):
        check = local_limit(LimitSpec("b", 10**12, 3600, algorithm), table).check

        def run(k: int, check=check) -> None:  # type: ignore[no-untyped-def]
            for _ in range(k):
                check("203.0.113.7", now)

        results[f"{algorithm}, one key"] = per_call(run, n)
    keys = [f"10.0.{i // 256}.{i % 256}" for i in range(5000)]
    check = local_limit(LimitSpec("b", 10**12, 3600), table).check

    def many(k: int) -> None:
        for i in range(k):
            check(keys[i % 5000], now)

    results["fixed, 5,000 keys"] = per_call(many, n)
    return results


async def batched(address: str, n: int) -> dict[str, float]:
    from tollway.state.redis_backends import Standalone
    from tollway.state.redis_client import RedisClient

    host, _, port = address.rpartition(":")
    backend = Standalone(RedisClient(host, int(port)))
    table = SharedTable.create(1 << 12)
    prefix = f"twbench:{uuid.uuid4().hex[:8]}:"
    policy = BatchedRedisPolicy(LimitSpec("b", 10**9, 3600), backend, table=table, prefix=prefix)
    for _ in range(2000):  # warm up: let the slice size adapt to this rate
        result = policy.check("alice", time.time())
        if not isinstance(result, Decision):
            await result
    before = backend.stats.commands
    requests = 0
    started = time.process_time()
    while requests < n:
        result = policy.check("alice", time.time())
        if not isinstance(result, Decision):
            await result
        requests += 1
        if requests % 1000 == 0:
            await asyncio.sleep(0)  # let background top-ups run
    elapsed = time.process_time() - started
    commands = backend.stats.commands - before
    policy.close()
    await backend.call("DEL", policy.redis_key("alice"))
    await backend.close()
    return {
        "batched: check (incl. time.time())": elapsed / n * 1e6,
        "batched: redis commands per request": commands / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checks", type=int, default=300_000)
    parser.add_argument("--redis", default="", help="host:port for the batched policy's local path")
    args = parser.parse_args()
    print("lock + unlock, µs")
    for name, value in locks(args.checks).items():
        print(f"  {name:40s} {value:7.3f}")
    print("check, µs")
    for name, value in checks(args.checks).items():
        print(f"  {name:40s} {value:7.3f}")
    if args.redis:
        for name, value in asyncio.run(batched(args.redis, args.checks)).items():
            print(f"  {name:40s} {value:7.3f}")


if __name__ == "__main__":
    main()
