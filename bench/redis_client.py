"""Client CPU per Redis script call (EVALSHA), with N concurrent callers: the thin RESP client
(tollway.state.redis_client) against redis-py's asyncio client with hiredis.

    python bench/redis_client.py [--calls N] [--concurrency 50] [--redis host:port]

CPU is this process's (time.process_time), so the Redis server's own work is excluded; the figure is
what a gateway worker spends per rate-limit round trip. Runs on uvloop, like a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import uvloop

from tollway.state.redis_client import RedisClient
from tollway.state.scripts import FIXED_TAKE


async def thin(host: str, port: int, calls: int, concurrency: int, key: bytes) -> float:
    client = RedisClient(host, port, timeout=5.0)
    await client.evalsha(FIXED_TAKE, [key], [10**9, 3600, 1, 0, ""])

    async def worker(n: int) -> None:
        for _ in range(n):
            await client.evalsha(FIXED_TAKE, [key], [10**9, 3600, 1, 0, ""])

    started = time.process_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    cpu = time.process_time() - started
    await client.close()
    return cpu / calls * 1e6


async def redis_py(host: str, port: int, calls: int, concurrency: int, key: bytes) -> float:
    import redis.asyncio

    client = redis.asyncio.Redis(host=host, port=port, max_connections=concurrency)
    script = client.register_script(FIXED_TAKE.source)
    await script(keys=[key], args=[10**9, 3600, 1, 0, ""])

    async def worker(n: int) -> None:
        for _ in range(n):
            await script(keys=[key], args=[10**9, 3600, 1, 0, ""])

    started = time.process_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    cpu = time.process_time() - started
    await client.aclose()
    return cpu / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--redis", default="127.0.0.1:6379")
    args = parser.parse_args()
    host, _, port = args.redis.rpartition(":")
    key = f"twbench:{{{uuid.uuid4().hex[:8]}}}".encode()
    thin_us = await thin(host, int(port), args.calls, args.concurrency, key)
    py_us = await redis_py(host, int(port), args.calls, args.concurrency, key)
    cleanup = RedisClient(host, int(port))
    await cleanup.call("DEL", key)
    await cleanup.close()
    print(f"client CPU per EVALSHA, {args.concurrency} concurrent callers, {args.calls} calls")
    print(f"  thin RESP client (1 connection)       {thin_us:7.1f} µs")
    print(f"  redis-py asyncio + hiredis (pool)     {py_us:7.1f} µs   ({py_us / thin_us:.1f}x)")


if __name__ == "__main__":
    uvloop.run(main())
