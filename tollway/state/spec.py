"""What a limit is (`LimitSpec`) and what a check answers (`Decision`): shared by every policy."""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("fixed", "sliding", "gcra", "concurrency")


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit: `limit` units per `window` seconds, counted with `algorithm`.

    - ``fixed``: a counter per calendar window (windows aligned to multiples of `window` since the
      epoch, so a minute window resets at :00 on every node). At most `limit` per window; a client can
      get up to 2 x limit across a window boundary.
    - ``sliding``: the two-window approximation of a sliding window: the current window's count plus
      the previous window's count weighted by how much of it still overlaps the last `window` seconds.
      Smooths the boundary burst; never more than `limit` per calendar window; assumes the previous
      window's requests were evenly spread (see docs/rate-limiting.md for its accuracy).
    - ``gcra``: a token bucket of `burst` units (default `limit`) refilled at limit/window per second,
      kept as one theoretical arrival time per key (GCRA). Exact; no boundaries.
    - ``concurrency``: at most `limit` requests in flight at once; `window` is the lease after which
      the in-flight count of a process that died stops counting (live processes renew theirs).

    `name` names the policy in the RateLimit headers ("minute"). `scope` separates the counters of
    different plugin instances with the same name; the counter identity is scope, name, algorithm and
    window — not `limit`, so raising a limit in a config reload keeps the counts.
    """

    name: str
    limit: int
    window: float
    algorithm: str = "fixed"
    burst: int = 0
    scope: str = ""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}: one of {', '.join(ALGORITHMS)}")
        if self.limit < 0:
            raise ValueError("limit must be >= 0")
        if not self.window > 0 or math.isinf(self.window):
            raise ValueError("window must be a positive number of seconds")
        if self.burst < 0:
            raise ValueError("burst must be >= 0")

    @property
    def ident(self) -> str:
        """The counter identity (also the Redis key's stem)."""
        return f"{self.scope}|{self.name}|{self.algorithm}|{self.window:g}"

    @property
    def capacity(self) -> int:
        """Units a client can spend at once: `burst` for GCRA, `limit` otherwise."""
        if self.algorithm == "gcra" and self.burst:
            return self.burst
        return self.limit

    @property
    def emission_interval(self) -> float:
        """GCRA: seconds per unit (window / limit)."""
        return self.window / self.limit if self.limit else math.inf


class Decision:
    """The answer of one limit for one request.

    allowed      the request may pass (its units were counted)
    limit        the policy's quota (for RateLimit-Policy `q`)
    remaining    units left now (RateLimit `r`), never negative
    reset_after  seconds until the quota is whole again / the window resets (RateLimit `t`)
    retry_after  when denied: seconds until a retry can pass (Retry-After); 0 when allowed
    spec         the LimitSpec that decided
    degraded     "" normally; "fail-open" or "fail-closed" when decided without its backend (Redis
                 unreachable); a fail-closed denial is a 503, not a 429
    """

    __slots__ = ("allowed", "degraded", "limit", "remaining", "reset_after", "retry_after", "spec")

    def __init__(
        self,
        allowed: bool,
        limit: int,
        remaining: int,
        reset_after: float,
        retry_after: float,
        spec: LimitSpec,
        degraded: str = "",
    ) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_after = reset_after
        self.retry_after = retry_after
        self.spec = spec
        self.degraded = degraded

    @property
    def unavailable(self) -> bool:
        """Denied because the backend is unreachable and the policy fails closed (answer 503)."""
        return not self.allowed and self.degraded == "fail-closed"

    def __repr__(self) -> str:
        verdict = "allowed" if self.allowed else "denied"
        extra = f" {self.degraded}" if self.degraded else ""
        return (
            f"<Decision {self.spec.name} {verdict} remaining={self.remaining}/{self.limit} "
            f"reset_after={self.reset_after:.3f} retry_after={self.retry_after:.3f}{extra}>"
        )


def most_restrictive(decisions: list[Decision]) -> Decision:
    """The decision a client should heed: a denial with the longest wait, else the least remaining
    (relative to its limit), then the soonest reset."""
    denied = [d for d in decisions if not d.allowed]
    if denied:
        return max(denied, key=lambda d: d.retry_after)
    return min(decisions, key=lambda d: (d.remaining / d.limit if d.limit else 0.0, d.reset_after))
