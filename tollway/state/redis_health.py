"""Whether a Redis backend answers, as seen by this process: the outage state every policy using the
backend shares (`RedisBackend.health`).

The first failed call starts an outage (logged once, counted in `outages`); while it lasts one call per
`probe_interval` tries Redis and the others fall back without waiting, and a background PING ends the
outage even when no request asks Redis. The first success ends it (logged once, with its length).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from tollway.state.redis_client import RedisClosed, RedisError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger("tollway.state.redis_health")


class RedisHealth:
    """Whether one Redis backend answers, as seen by this process; shared by every policy using it.

    Metrics: `down` (gauge), `outages` (outages begun), `fallbacks` (decisions taken without Redis),
    `errors` (failed Redis calls), `last_error`.
    """

    def __init__(
        self, name: str, probe_interval: float = 0.5, ping: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self.name = name
        self.probe_interval = probe_interval
        # While down, a background PING every probe_interval ends the outage even when no request asks
        # Redis (a batched node spending a reserve another worker fetched never would).
        self.ping = ping
        self._prober: asyncio.Task[None] | None = None
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.outages = 0
        self.fallbacks = 0
        self.errors = 0
        self.last_error = ""
        self._fallbacks_at_outage = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def skip(self) -> bool:
        """True when this call should not try Redis (down, and not yet time for the next probe)."""
        if self.down_since is None:
            return False
        now = time.monotonic()
        if now >= self.retry_at:
            self.retry_at = now + self.probe_interval  # this caller is the probe
            return False
        return True

    def failed(self, error: BaseException) -> None:
        if isinstance(error, RedisClosed):
            return  # closed on purpose (shutdown, reload): not an outage
        self.errors += 1
        now = time.monotonic()
        self.retry_at = now + self.probe_interval
        self.last_error = getattr(error, "message", None) or str(error)
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            self._fallbacks_at_outage = self.fallbacks
            self._start_prober()
            log.error(
                "redis %s unreachable (%s): rate limits fall back (fail-open: node-local limits; "
                "fail-closed: 503) until it answers again",
                self.name,
                self.last_error,
            )

    def _start_prober(self) -> None:
        if self.ping is None or self._prober is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a synchronous caller): requests still probe, one per interval
        self._prober = loop.create_task(self._probe())

    async def _probe(self) -> None:
        ping = self.ping
        assert ping is not None
        while self.down_since is not None:
            await asyncio.sleep(self.probe_interval)
            if self.down_since is None:
                break
            try:
                await ping()
            except RedisClosed:
                break  # closed on purpose: nobody needs it any more
            except RedisError:
                continue
            self.recovered()
        self._prober = None

    def recovered(self) -> None:
        if self.down_since is not None:
            log.warning(
                "redis %s reachable again after %.1fs; %d decisions were taken without it",
                self.name,
                time.monotonic() - self.down_since,
                self.fallbacks - self._fallbacks_at_outage,
            )
            self.down_since = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "down": self.down,
            "outages": self.outages,
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        state = "down" if self.down else "up"
        return f"<RedisHealth {self.name} {state} outages={self.outages} fallbacks={self.fallbacks}>"
