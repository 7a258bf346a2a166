"""The `cache` scenario of bench/bench.py: proxy-cache hits beside nginx's proxy_cache.

Per round, all hits on BENCH_PATH=/cached/user/1 (the harness's backend answers /cached/ paths with
`Cache-Control: public, max-age=3600`), one worker each:
  nginx-cache + tollway with the node store (bench/cache-node.yaml)   bar: ≤ 1.3× nginx-cache CPU/req
  tollway pass-through, same path (bench/passthrough.yaml)            bar: cached ≤ 0.8× uncached
  tollway with the Redis store (bench/cache-redis.yaml)               recorded (a Redis round trip/hit)

    python bench/bench.py --scenario cache [--seconds 8 --connections 64 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PATH = "/cached/user/1"


def cache(args: argparse.Namespace, run_harness: Callable[..., dict[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "### Response cache: all hits on /cached/user/1 (Cache-Control: public, max-age=3600)",
        "",
        "| round | nginx-cache CPU µs/req | tollway node cache | tollway pass-through | tollway Redis cache "
        "| node ÷ nginx-cache | node ÷ pass-through | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    vs_nginx: list[float] = []
    vs_uncached: list[float] = []
    for i in range(1, args.rounds + 1):
        node = run_harness(
            ["nginx-cache", "gateway"], args.seconds, args.connections, HERE / "cache-node.yaml", path=PATH
        )
        plain = run_harness(["gateway"], args.seconds, args.connections, HERE / "passthrough.yaml", path=PATH)
        redis = run_harness(["gateway"], args.seconds, args.connections, HERE / "cache-redis.yaml", path=PATH)
        if "gateway" not in node or "nginx-cache" not in node or "gateway" not in plain:
            lines.append(f"| {i} | — | — | — | — | — | — | a target did not report |")
            continue
        reference = float(node["nginx-cache"]["cpu_us"])
        cached = float(node["gateway"]["cpu_us"])
        uncached = float(plain["gateway"]["cpu_us"])
        on_redis = float(redis["gateway"]["cpu_us"]) if "gateway" in redis else float("nan")
        vs_nginx.append(cached / reference)
        vs_uncached.append(cached / uncached)
        errors = "; ".join(
            r["gateway"]["errors"] for r in (node, plain, redis) if "gateway" in r and r["gateway"]["errors"]
        )
        lines.append(
            f"| {i} | {reference:.1f} | {cached:.1f} | {uncached:.1f} | {on_redis:.1f} "
            f"| {cached / reference:.2f} | {cached / uncached:.2f} | {errors or 'none'} |"
        )
    if vs_nginx:
        lines += [
            "",
            f"Bar: node cache ≤ 1.3× nginx-cache CPU/req (median {statistics.median(vs_nginx):.2f}), "
            f"≤ 0.8× tollway's own pass-through (median {statistics.median(vs_uncached):.2f}).",
        ]
    return lines
