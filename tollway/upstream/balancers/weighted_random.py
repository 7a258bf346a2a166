"""Weighted random: a target with twice the weight is picked twice as often, with no shared state
between picks (nginx's `random`)."""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from tollway.upstream.balancers.base import RNG, Balancer, excluded
from tollway.upstream.target import Target


class WeightedRandom(Balancer):
    __slots__ = ("_cumulative", "_total")

    def __init__(self) -> None:
        super().__init__()
        self._cumulative: list[float] = []
        self._total = 0.0

    def reset(self, available: list[Target]) -> None:
        self.targets = available
        running = 0.0
        cumulative = []
        for target in available:
            running += target.weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running

    def pick(self, ctx: Any, exclude: list[Target] | None) -> Target | None:
        targets = self.targets
        if not targets:
            return None
        if exclude is None:
            index = bisect_right(self._cumulative, RNG.random() * self._total)
            return targets[min(index, len(targets) - 1)]
        return weighted_choice([t for t in targets if not excluded(t, exclude)])


def weighted_choice(targets: list[Target]) -> Target | None:
    total = 0
    for target in targets:
        total += target.weight
    if not targets or total <= 0:
        return None
    point = RNG.random() * total
    for target in targets:
        point -= target.weight
        if point < 0:
            return target
    return targets[-1]
