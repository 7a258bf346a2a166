"""Latency-aware: the power of two choices over a peak-sensitive moving average of response time
(Finagle's "peak EWMA", what Linkerd and APISIX's `ewma` use).

Two targets are drawn at random in proportion to weight, and the one with the lower cost wins, where
cost = average response time * (in-flight + 1). Drawing two instead of scanning all keeps a slow target
from being starved of the traffic that would show it recovered, and stops every worker from herding
onto the same fastest target. The average decays with time (`DECAY` seconds), jumps up at once on a
slow response (so a target that turns slow loses traffic in one request), and a failed try counts as
`FAILURE_PENALTY` seconds.
"""

from __future__ import annotations

import math
import time
from typing import Any, Final

from tollway.upstream.balancers.base import RNG, Balancer, excluded
from tollway.upstream.target import FAILED, Target

DECAY: Final = 10.0
FAILURE_PENALTY: Final = 1.0


class LatencyP2C(Balancer):
    __slots__ = ("_total",)

    def __init__(self) -> None:
        super().__init__()
        self.wants_release = True
        self._total = 0

    def reset(self, available: list[Target]) -> None:
        self.targets = available
        total = 0
        for target in available:
            total += target.weight
        self._total = total

    def pick(self, ctx: Any, exclude: list[Target] | None) -> Target | None:
        targets = self.targets
        if exclude is not None:
            targets = [t for t in targets if not excluded(t, exclude)]
            total = 0
            for target in targets:
                total += target.weight
        else:
            total = self._total
        n = len(targets)
        if n == 0 or total <= 0:
            return None
        if n == 1:
            return targets[0]
        first = _draw(targets, RNG.random() * total, None)
        second = _draw(targets, RNG.random() * (total - first.weight), first)
        if cost(second) < cost(first):
            return second
        return first

    def release(self, target: Target, ctx: Any, outcome: int, latency: float) -> None:
        if outcome == FAILED:
            latency = max(latency, FAILURE_PENALTY)
        elif latency < 0:
            return
        observe(target, latency, time.perf_counter())


def cost(target: Target) -> float:
    state = target.state
    return state.ewma * (state.inflight + 1)


def observe(target: Target, latency: float, now: float) -> None:
    state = target.state
    if state.ewma_stamp == 0.0 or latency > state.ewma:
        state.ewma = latency
    else:
        weight = math.exp(-(now - state.ewma_stamp) / DECAY)
        state.ewma = state.ewma * weight + latency * (1.0 - weight)
    state.ewma_stamp = now


def _draw(targets: list[Target], point: float, skip: Target | None) -> Target:
    for target in targets:
        if target is skip:
            continue
        point -= target.weight
        if point < 0:
            return target
    for target in reversed(targets):  # rounding left a sliver: the last candidate
        if target is not skip:
            return target
    return targets[0]


__all__ = ["LatencyP2C", "cost", "observe"]
