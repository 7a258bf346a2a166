"""Balancers: one small strategy per module, each with `pick` and `release` (docs/upstreams.md).

A cluster holds one balancer per tier (primary targets, backup targets). `build` sees every target of
the tier once per config or DNS change; `reset` sees the available ones whenever health changes;
`pick` runs per request and `release` when a try ends.
"""

from __future__ import annotations

from tollway.upstream.balancers.base import Balancer, seed
from tollway.upstream.balancers.chash import ConsistentHash
from tollway.upstream.balancers.ewma_p2c import LatencyP2C
from tollway.upstream.balancers.least_conn import LeastConnections
from tollway.upstream.balancers.round_robin import RoundRobin
from tollway.upstream.balancers.weighted_random import WeightedRandom

ALGORITHMS = ("round-robin", "random", "least-connections", "consistent-hashing", "latency")


def make_balancer(algorithm: str, hash_on: str = "ip", hash_key: str | None = None) -> Balancer:
    if algorithm == "round-robin":
        return RoundRobin()
    if algorithm == "random":
        return WeightedRandom()
    if algorithm == "least-connections":
        return LeastConnections()
    if algorithm == "consistent-hashing":
        return ConsistentHash(hash_on, hash_key or "")
    if algorithm == "latency":
        return LatencyP2C()
    raise ValueError(f"unknown balancing algorithm {algorithm!r}")


__all__ = [
    "ALGORITHMS",
    "Balancer",
    "ConsistentHash",
    "LatencyP2C",
    "LeastConnections",
    "RoundRobin",
    "WeightedRandom",
    "make_balancer",
    "seed",
]
