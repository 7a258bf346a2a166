"""Smooth weighted round-robin, as nginx does it: each pick adds every target's weight to its current
weight, takes the largest, and subtracts the total from it. Weights 5,1,1 give a a b a c a a —
spread out, not bunched — and every window of sum(weights) picks matches the weights exactly."""

from __future__ import annotations

from typing import Any

from tollway.upstream.balancers.base import Balancer, excluded
from tollway.upstream.target import Target


class RoundRobin(Balancer):
    __slots__ = ()

    def pick(self, ctx: Any, exclude: list[Target] | None) -> Target | None:
        best: Target | None = None
        total = 0
        for target in self.targets:
            if exclude is not None and excluded(target, exclude):
                continue
            weight = target.weight
            current = target.current_weight + weight
            target.current_weight = current
            total += weight
            if best is None or current > best.current_weight:
                best = target
        if best is not None:
            best.current_weight -= total
        return best
