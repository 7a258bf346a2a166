"""Weighted least-connections, as nginx does it: the target with the fewest requests in flight per unit
of weight (in-flight / weight, compared by cross-multiplying); ties go round-robin (smooth, weighted), so
an idle upstream still spreads requests by weight. (APISIX compares (in-flight + 1) / weight, which
sends every request of an idle upstream to its heaviest target.) In-flight counts live in the worker's
target states, so they survive config rebuilds."""

from __future__ import annotations

from typing import Any

from tollway.upstream.balancers.base import Balancer, excluded
from tollway.upstream.target import Target


class LeastConnections(Balancer):
    __slots__ = ()

    def pick(self, ctx: Any, exclude: list[Target] | None) -> Target | None:
        best: Target | None = None
        best_load = 0  # in-flight of best; loads are compared by cross-multiplying with weights
        best_weight = 1
        ties = 0
        for target in self.targets:
            if exclude is not None and excluded(target, exclude):
                continue
            load = target.state.inflight
            if best is None:
                best, best_load, best_weight, ties = target, load, target.weight, 1
                continue
            a = load * best_weight
            b = best_load * target.weight
            if a < b:
                best, best_load, best_weight, ties = target, load, target.weight, 1
            elif a == b:
                ties += 1
        if ties <= 1:
            return best
        # Several equally loaded: smooth weighted round-robin among them.
        chosen: Target | None = None
        total = 0
        for target in self.targets:
            if exclude is not None and excluded(target, exclude):
                continue
            if target.state.inflight * best_weight != best_load * target.weight:
                continue
            current = target.current_weight + target.weight
            target.current_weight = current
            total += target.weight
            if chosen is None or current > chosen.current_weight:
                chosen = target
        if chosen is not None:
            chosen.current_weight -= total
        return chosen
