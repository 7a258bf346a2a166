"""Time from `POST /routes` returning on one node's admin API to the new route being served by every
node of a PostgreSQL cluster (not a timed test).

Run: PYTHONPATH=. python bench/admin_propagation.py [--nodes 3] [--workers 2] [--changes 200]

Starts N gateway nodes (W workers each) on a fresh PostgreSQL database at 127.0.0.1:5432 (dropped at
the end), the first with the admin API on. Each change creates the route "probe-<i>" at "/probe-<i>/"
through `POST /routes`; after the answer, every node is polled on that path (fresh connections, so the
kernel spreads them over workers) until each answered 200 three times in a row. Prints the POST's own
latency and the propagation's p50, p90, p99 and max.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_propagation import _admin, served_everywhere

from tests.admin.support import AdminClient, admin_port
from tests.store.nodes import node_config, start_node, store_cli
from tests.support import Backend, LoopThread


def _quantiles(seconds: list[float]) -> str:
    ms = sorted(t * 1000 for t in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return f"p50 {q[49]:.1f} ms, p90 {q[89]:.1f} ms, p99 {q[98]:.1f} ms, max {ms[-1]:.1f} ms"


async def run(args: argparse.Namespace, tmp: Path) -> tuple[list[float], list[float]]:
    db = f"tollway_bench_{secrets.token_hex(5)}"
    await _admin(f'CREATE DATABASE "{db}"')
    dsn = f"postgresql://postgres@127.0.0.1:5432/{db}"
    loop_thread = LoopThread()
    backend = Backend().start(loop_thread)
    nodes = []
    try:
        store_cli("db", "migrate", "--store", dsn)
        settings = {"backend": "postgres", "dsn": dsn, "poll_interval": 2.0}
        for i in range(args.nodes):
            extra = {"admin": {"enabled": True, "listen": "127.0.0.1:0"}} if i == 0 else {}
            config = node_config(settings, access_log={"enabled": False}, **extra)
            nodes.append(start_node(tmp / f"node{i}.yaml", config, workers=args.workers))
        admin = AdminClient(admin_port(nodes[0]))
        assert admin.post("/services", {"name": "backend", "url": backend.url}).status == 201
        ports = [gw.port for gw in nodes]
        posts, times = [], []
        for i in range(args.changes):
            path = f"/probe-{i}/"
            sent = time.perf_counter()
            answer = await asyncio.to_thread(
                admin.post, "/routes", {"name": f"probe-{i}", "service": "backend", "paths": [path]}
            )
            started = time.perf_counter()  # the POST has returned
            assert answer.status == 201, answer.raw
            posts.append(started - sent)
            times.append(await asyncio.to_thread(served_everywhere, ports, path, started))
        return posts, times
    finally:
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        posts, times = asyncio.run(run(args, Path(tmp)))
    print(f"{args.nodes} nodes x {args.workers} workers, {len(times)} POST /routes")
    print(f"  POST answered:            {_quantiles(posts)}")
    print(f"  served by every node:     {_quantiles(times)}")


if __name__ == "__main__":
    main()
