"""Benchmark `Router.match` from 10 to 10,000 routes: the cost per match must stay flat.

Run: .venv/bin/python bench/route_match.py [--quick]

The route mix, per 10 routes: 7 prefixes "/svcN/", 1 template "/svcN/users/{id}" (GET, POST), 1 exact
"=/svcN/status", 1 host route "svcN.example.com" + "/". Every size also has a wildcard-host route, a
header-constrained route and a regex route, so all code paths exist at every size. Requests hit routes
early, in the middle and late in the config, with a Host no host route matches (the usual case), so
host resolution is on the path of every match. Sizes take turns in each round; the best round counts.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tollway.config.schema import Route
from tollway.router import RouteMatch, Router

SIZES = (10, 100, 1_000, 10_000)
HOST = "gateway.example.com"
KINDS = ("prefix", "template", "exact")  # the three requests made at each position


def build_routes(size: int) -> list[tuple[Route, str]]:
    routes = [
        _route("wild", hosts=["*.internal.example.com"], paths=["/"]),
        _route("hdr", paths=["/svc0/"], headers={"x-canary": "1"}),
        _route("rx", paths=["~^/legacy/(?P<rest>.*)"]),
    ]
    for i in range(size - len(routes)):
        kind = i % 10
        if kind == 1:
            routes.append(_route(f"t{i}", paths=[f"/svc{i}/users/{{id}}"], methods=["GET", "POST"]))
        elif kind == 2:
            routes.append(_route(f"e{i}", paths=[f"=/svc{i}/status"]))
        elif kind == 3:
            routes.append(_route(f"h{i}", hosts=[f"svc{i}.example.com"], paths=["/"]))
        else:
            routes.append(_route(f"p{i}", paths=[f"/svc{i}/"], strip_path=True))
    return [(route, route.name) for route in routes]


def _route(name: str, **fields: object) -> Route:
    return Route.model_validate({"name": name, "service": "svc", **fields})


def requests_for(size: int) -> dict[str, list[tuple[str, str]]]:
    """(path, expected route name) per position; indexes are chosen to hit each kind of route."""
    last = size - 3 - 1
    positions = {"early": 0, "middle": last // 2, "late": last}
    out = {}
    for label, at in positions.items():
        base = at - at % 10  # the start of this block of 10: kind 0 is a prefix route
        prefix = base + 4 if base + 4 <= last else base
        out[label] = [
            (f"/svc{prefix}/orders/42", f"p{prefix}"),
            (f"/svc{base + 1}/users/42", f"t{base + 1}"),
            (f"/svc{base + 2}/status", f"e{base + 2}"),
        ]
    return out


def time_match(router: Router[str], path: str, iterations: int) -> float:
    """Nanoseconds per match for one request, over `iterations` calls."""
    match = router.match
    headers = [(b"host", HOST.encode()), (b"user-agent", b"bench"), (b"accept", b"*/*")]
    start = time.perf_counter_ns()
    for _ in range(iterations):
        match("GET", HOST, path, "", headers)
    return (time.perf_counter_ns() - start) / iterations


def prepare(size: int) -> tuple[Router[str], dict[str, list[str]]]:
    router = Router(build_routes(size))
    paths = {}
    for label, requests in requests_for(size).items():
        for path, expected in requests:
            found = router.match("GET", HOST, path, "", [])
            assert isinstance(found, RouteMatch) and found.route == expected, (path, found, expected)
        paths[label] = [path for path, _ in requests]
    return router, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best of them is kept")
    args = parser.parse_args()
    iterations = 10_000 if args.quick else 100_000
    prepared = {size: prepare(size) for size in SIZES}
    best: dict[tuple[int, str, str], float] = {}
    gc.disable()  # a collection landing in one size's timing would skew the ratio
    # Sizes take turns within each round, so a noisy moment on the machine hits them all alike.
    for _ in range(args.rounds):
        for size, (router, paths) in prepared.items():
            for label, requests in paths.items():
                for kind, path in zip(KINDS, requests, strict=True):
                    ns = time_match(router, path, iterations)
                    best[size, label, kind] = min(ns, best.get((size, label, kind), ns))
    gc.enable()
    report(best)


def report(best: dict[tuple[int, str, str], float]) -> None:
    columns = ("early", "middle", "late", *KINDS)
    print("ns per match" + "".join(f"{column:>10}" for column in columns) + f"{'mean':>10}")
    means = {}
    for size in SIZES:
        cells = [
            _mean(ns for (s, label, kind), ns in best.items() if s == size and column in (label, kind))
            for column in columns
        ]
        means[size] = _mean(ns for (s, _, _), ns in best.items() if s == size)
        print(f"{size:>6} routes" + "".join(f"{cell:10.0f}" for cell in cells) + f"{means[size]:10.0f}")
    print(f"ratio {SIZES[-1]:,}/{SIZES[0]} routes: {means[SIZES[-1]] / means[SIZES[0]]:.3f}")


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items)


if __name__ == "__main__":
    main()
