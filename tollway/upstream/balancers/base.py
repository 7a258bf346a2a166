"""The balancer interface, and what every strategy shares."""

from __future__ import annotations

import random
from typing import Any

from tollway.upstream.target import Target

# One generator for every balancer and the retry backoff; `seed` makes tests repeatable.
RNG = random.Random()


def seed(value: int) -> None:
    RNG.seed(value)


class Balancer:
    """Picks one target of a tier. Subclasses override `pick`, and `build`/`reset`/`release` when they
    keep more than the list of available targets."""

    __slots__ = ("targets", "wants_release")

    def __init__(self) -> None:
        self.targets: list[Target] = []  # the available targets of the tier
        self.wants_release = False  # True if `release` does anything (the cluster skips the call otherwise)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} targets={len(self.targets)}>"

    def build(self, targets: list[Target]) -> None:
        """Every target of the tier, available or not (once per config or DNS change)."""

    def reset(self, available: list[Target]) -> None:
        """The targets that may take traffic now (after any health change)."""
        self.targets = available

    def pick(self, ctx: Any, exclude: list[Target] | None) -> Target | None:
        """A target for this request, never one in `exclude` (the targets a retry already tried)."""
        raise NotImplementedError

    def release(self, target: Target, ctx: Any, outcome: int, latency: float) -> None:
        """A try on `target` ended (outcome: target.OK/FAILED/NEUTRAL; latency: seconds to the response
        head, or -1 without one)."""


def excluded(target: Target, exclude: list[Target] | None) -> bool:
    return exclude is not None and any(other is target for other in exclude)
