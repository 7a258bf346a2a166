"""Time from a config store commit to the change being served by every node (not a timed test).

Run: PYTHONPATH=. python bench/store_propagation.py [--nodes 3] [--workers 2] [--changes 200]
     [--routes 0] [--consumers 0]   (extra entities, to see how size changes the answer)

Starts N gateway nodes (W workers each) on a fresh PostgreSQL database at 127.0.0.1:5432 (dropped at
the end), then makes single-route changes one after another: each moves the route "probe" to a new
path "/probe-<i>/". After the commit returns, every node is polled with that path on fresh connections
(so the kernel spreads them over the node's workers) until each node answered it 3 times in a row;
the time of the slowest node is the change's propagation time. Prints p50, p90, p99 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from tests.store.nodes import node_config, start_node, store_cli
from tests.support import Backend, LoopThread, request
from tollway.store.model import Put
from tollway.store.postgres import PostgresStore

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def served_everywhere(ports: list[int], path: str, started: float, timeout: float = 30.0) -> float:
    streak = dict.fromkeys(ports, 0)
    while time.perf_counter() - started < timeout:
        for port in ports:
            if streak[port] < 3:
                streak[port] = streak[port] + 1 if request(port, path=path).status == 200 else 0
        if all(v >= 3 for v in streak.values()):
            return time.perf_counter() - started
        time.sleep(0.002)  # leave the CPU to the gateways between rounds (2 shared cores)
    raise TimeoutError(f"{path} not served by every node within {timeout} s")


async def run(args: argparse.Namespace, tmp: Path) -> list[float]:
    db = f"tollway_bench_{secrets.token_hex(5)}"
    await _admin(f'CREATE DATABASE "{db}"')
    dsn = f"postgresql://postgres@127.0.0.1:5432/{db}"
    loop_thread = LoopThread()
    backend = Backend().start(loop_thread)
    nodes = []
    store = PostgresStore(dsn, listen=False)
    try:
        store_cli("db", "migrate", "--store", dsn)
        await store.open()
        ops = [Put("services", {"name": "backend", "url": backend.url})]
        ops += [
            Put("routes", {"name": f"r{i}", "service": "backend", "paths": [f"/r{i}/"]})
            for i in range(args.routes)
        ]
        ops += [
            Put("consumers", {"username": f"c{i}", "credentials": {"key-auth": [{"key": f"key-{i}"}]}})
            for i in range(args.consumers)
        ]
        ops.append(Put("routes", {"name": "probe", "service": "backend", "paths": ["/probe-start/"]}))
        await store.write(ops)
        settings = {"backend": "postgres", "dsn": dsn, "poll_interval": 2.0}
        for i in range(args.nodes):
            nodes.append(
                start_node(
                    tmp / f"node{i}.yaml",
                    node_config(settings, access_log={"enabled": False}),
                    workers=args.workers,
                )
            )
        ports = [gw.port for gw in nodes]
        served_everywhere(ports, "/probe-start/", time.perf_counter(), 120.0)
        times = []
        for i in range(args.changes):
            path = f"/probe-{i}/"
            await store.write([Put("routes", {"name": "probe", "service": "backend", "paths": [path]})])
            started = time.perf_counter()  # the commit has returned
            times.append(await asyncio.to_thread(served_everywhere, ports, path, started))
        return times
    finally:
        await store.close()
        for gw in nodes:
            gw.stop()
        backend.stop()
        loop_thread.close()
        await _admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--routes", type=int, default=0)
    parser.add_argument("--consumers", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = asyncio.run(run(args, Path(tmp)))
    ms = sorted(t * 1000 for t in times)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    print(
        f"{args.nodes} nodes x {args.workers} workers, {args.routes + 1} routes, {args.consumers} consumers, "
        f"{len(ms)} changes: "
        f"p50 {q[49]:.1f} ms, p90 {q[89]:.1f} ms, p99 {q[98]:.1f} ms, max {ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
