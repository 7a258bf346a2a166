"""What one change costs on a node holding 10,000 routes and 10,000 consumers: a full rebuild versus the
delta path, phase by phase (not a timed test; figures in docs/config-store.md).

Run: PYTHONPATH=. python bench/store_apply.py [--routes 10000] [--dsn postgresql://…]

Phases, each the best of --rounds:
- write: one route changed through the store (the whole config is validated in the transaction);
- node, full: load every row, validate everything (what a node does on a full resync);
- node, delta: read the change log since the applied version, patch the rows, validate the changed
  entity (tollway.store.incremental);
- to workers: pickling the config for the channel, unpickling it in a worker, and the worker's snapshot
  build (router, plugin chains), which is a full rebuild either way.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tollway.proxy.snapshot import build_snapshot
from tollway.runtime import config_delta
from tollway.store.base import ConfigStore
from tollway.store.incremental import apply_delta
from tollway.store.model import Put, validate_rows
from tollway.store.sqlite import SQLiteStore


def entities(routes: int) -> list[Put]:
    ops = [Put("services", {"name": "svc", "url": "http://127.0.0.1:9"})]
    ops += [Put("routes", {"name": f"r{i}", "service": "svc", "paths": [f"/r{i}"]}) for i in range(routes)]
    ops += [
        Put("consumers", {"username": f"c{i}", "credentials": {"key-auth": [{"key": f"key-{i}"}]}})
        for i in range(routes)
    ]
    ops += [Put("plugins", {"name": "key-auth", "route": "r1"})]
    return ops


async def best(rounds: int, fn: Callable[[int], Awaitable[Any]]) -> tuple[float, Any]:
    times, result = [], None
    for i in range(rounds):
        started = time.perf_counter()
        result = await fn(i)
        times.append(time.perf_counter() - started)
    return min(times), result


async def measure(store: ConfigStore, routes: int, rounds: int) -> dict[str, float]:
    await store.write(entities(routes))
    out: dict[str, float] = {}
    counter = [0]

    async def write(_: int) -> Any:
        counter[0] += 1
        route = {"name": "r5", "service": "svc", "paths": [f"/v{counter[0]}"]}
        return await store.write([Put("routes", route)])

    out["write one route (validated whole)"], _ = await best(rounds, write)

    async def full(_: int) -> Any:
        store._cache = None  # type: ignore[attr-defined]  # a node's full resync reads every row
        return validate_rows(await store.load())

    out["node, full: load + validate all"], new_config = await best(rounds, full)
    deltas, sends, receives = [], [], []
    for _ in range(rounds):
        base = await store.load()
        base_config = validate_rows(base)
        await write(0)
        started = time.perf_counter()
        current, changes = await store.changes_since(base.version)
        patched = apply_delta(base_config, base, base.apply_changes(current, changes), changes)
        deltas.append(time.perf_counter() - started)
        started = time.perf_counter()
        payload = pickle.dumps(config_delta.encode(base_config, patched), protocol=pickle.HIGHEST_PROTOCOL)
        sends.append(time.perf_counter() - started)
        started = time.perf_counter()
        config_delta.decode(base_config, pickle.loads(payload))
        receives.append(time.perf_counter() - started)
    out["node, delta: change log + validate one"] = min(deltas)
    out[f"to workers, delta: encode + pickle ({len(payload) / 1e3:.0f} kB)"] = min(sends)
    out["in a worker, delta: unpickle + decode"] = min(receives)

    data = pickle.dumps(new_config, protocol=pickle.HIGHEST_PROTOCOL)
    out[f"to workers, whole: pickle ({len(data) / 1e6:.1f} MB)"], _ = await best(
        rounds, lambda _: _sync(pickle.dumps, new_config, protocol=pickle.HIGHEST_PROTOCOL)
    )
    out["in a worker, whole: unpickle"], _ = await best(rounds, lambda _: _sync(pickle.loads, data))
    out["in a worker: build_snapshot (full)"], _ = await best(
        rounds, lambda _: _sync(build_snapshot, new_config, 1, lambda *a, **k: None)
    )
    return out


async def _sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", help="also measure PostgreSQL (a fresh, migrated, empty database)")
    args = parser.parse_args()
    stores: list[ConfigStore] = []
    with tempfile.TemporaryDirectory() as tmp:
        stores.append(SQLiteStore(Path(tmp) / "bench.db"))
        if args.dsn:
            from tollway.store.postgres import PostgresStore

            stores.append(PostgresStore(args.dsn, listen=False))
        for store in stores:
            if store.backend == "postgres":
                await store.migrate()
            await store.open()
            try:
                results = await measure(store, args.routes, args.rounds)
            finally:
                await store.close()
            print(f"\n{store.backend}: {args.routes} routes + {args.routes} consumers, best of {args.rounds}")
            for name, seconds in results.items():
                print(f"  {name:45s} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
