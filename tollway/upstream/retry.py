"""Retry policy: which failed tries are tried again, how long to wait, and the budget that keeps
retries from multiplying an outage.

The budget is rate-based (Finagle's and Linkerd's), not concurrency-based (Envoy's): over a sliding
window, retries may be at most `ratio` * requests plus a reserve of `min_per_second` * window. A
failover is a burst — every request in flight on a killed backend fails at the same instant — and a
reserve absorbs the burst, where a cap of three concurrent retries would fail the rest; in a total
outage the ratio still bounds the extra load at `ratio` (20% by default).

Compiled with mypyc (setup.py): `deposit` runs per request.
"""

from __future__ import annotations

from typing import Final

from tollway.upstream.balancers.base import RNG

ON_ERROR: Final = 1  # connect failure, reset, invalid response — before a response head
ON_TIMEOUT: Final = 2  # connect or read timeout — before a response head
_NO_STATUS: Final = 1000


class RetryBudget:
    """Counts requests and retries per second in a ring of `window` one-second buckets. `tick` (once a
    second, from the worker) moves the current second into the ring."""

    __slots__ = (
        "_index",
        "_requests",
        "_retries",
        "_sum_requests",
        "_sum_retries",
        "ratio",
        "requests",
        "reserve",
        "retries",
        "window",
    )

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, window: int = 10) -> None:
        self.ratio = ratio
        self.reserve = min_per_second * window
        self.window = window
        self.requests = 0  # this second
        self.retries = 0  # this second
        self._requests = [0] * max(1, window - 1)  # the previous seconds of the window
        self._retries = [0] * max(1, window - 1)
        self._sum_requests = 0
        self._sum_retries = 0
        self._index = 0

    def __repr__(self) -> str:
        return (
            f"<RetryBudget requests={self.total_requests()} retries={self.total_retries()} "
            f"allowed={self.allowed()}>"
        )

    def configure(self, ratio: float, min_per_second: float, window: int) -> None:
        """New settings from a config reload; the counts so far are kept (a shorter window starts over)."""
        self.ratio = ratio
        self.reserve = min_per_second * window
        if window != self.window:
            self.window = window
            self._requests = [0] * max(1, window - 1)
            self._retries = [0] * max(1, window - 1)
            self._sum_requests = self._sum_retries = self._index = 0

    def tick(self) -> None:
        i = self._index
        self._sum_requests += self.requests - self._requests[i]
        self._sum_retries += self.retries - self._retries[i]
        self._requests[i] = self.requests
        self._retries[i] = self.retries
        self.requests = 0
        self.retries = 0
        self._index = (i + 1) % len(self._requests)

    def total_requests(self) -> int:
        return self._sum_requests + self.requests

    def total_retries(self) -> int:
        return self._sum_retries + self.retries

    def allowed(self) -> int:
        """Retries still allowed in the window now."""
        limit = self.ratio * self.total_requests() + self.reserve
        return max(0, int(limit) - self.total_retries())

    def withdraw(self) -> bool:
        """Take one retry from the budget, or refuse."""
        if self.total_retries() + 1 > self.ratio * self.total_requests() + self.reserve:
            return False
        self.retries += 1
        return True


class RetryPolicy:
    """An upstream's retry settings, compiled from its config (see config.schema.Retries)."""

    __slots__ = ("attempts", "backoff_base", "backoff_max", "on", "replay_limit", "status_min", "statuses")

    def __init__(
        self,
        attempts: int = 3,
        on: int = ON_ERROR | ON_TIMEOUT,
        statuses: frozenset[int] = frozenset(),
        backoff_base: float = 0.025,
        backoff_max: float = 0.25,
        replay_limit: int = 65536,
    ) -> None:
        self.attempts = attempts
        self.on = on
        self.statuses = statuses
        self.status_min = min(statuses) if statuses else _NO_STATUS  # most statuses fail one comparison
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.replay_limit = replay_limit

    def __repr__(self) -> str:
        return f"<RetryPolicy attempts={self.attempts} on={self.on} statuses={sorted(self.statuses)}>"

    def retries_status(self, status: int) -> bool:
        return status >= self.status_min and status in self.statuses

    def backoff(self, retry: int) -> float:
        """Delay before retry number `retry` (1, 2, ...): full jitter up to min(max, base * 2^(retry-1))."""
        cap = self.backoff_base * (1 << min(retry - 1, 20))
        if cap > self.backoff_max:
            cap = self.backoff_max
        return RNG.random() * cap
