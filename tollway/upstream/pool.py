"""Keep-alive connection pools, one per backend address, shared by every request of a worker.

Pools are keyed by (host, port, TLS name) and live in the worker, not in a config snapshot, so a
reload keeps its warm connections. Bookkeeping is plain method calls with no awaits (httpcore's
habit); only opening a connection is a coroutine.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from tollway.errors import UpstreamConnectError, UpstreamTimeout, UpstreamTlsError
from tollway.protocol.deadline import loop_clock
from tollway.upstream.connection import UpstreamConnection
from tollway.upstream.tls import describe_failure


@dataclass(frozen=True, slots=True)
class PoolSettings:
    max_idle: int = 256  # idle connections kept per backend address
    idle_timeout: float = 60.0  # an idle connection older than this is closed
    max_requests: int = 10000  # requests per connection before it is retired (0 = unlimited)
    max_head_size: int = 65536  # largest response head accepted


class Pool:
    __slots__ = (
        "_clock",
        "_sweeper",
        "active",
        "host",
        "idle",
        "label",
        "loop",
        "max_head_size",
        "opened",
        "port",
        "server_hostname",
        "settings",
        "ssl",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        settings: PoolSettings,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.loop = loop
        self._clock = loop_clock(loop)  # idle stamps, on every release
        self.host = host
        self.port = port
        self.ssl = tls
        self.server_hostname = server_hostname
        self.settings = settings
        self.max_head_size = settings.max_head_size
        self.label = f"{host}:{port}"
        # LIFO: the warmest connection last; each knows since when it is idle (`idle_since`), so a
        # release allocates no (time, connection) pair
        self.idle: list[UpstreamConnection] = []
        self.active = 0
        self.opened = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Pool {self.label} [active={self.active} idle={len(self.idle)} opened={self.opened}]>"

    def acquire(self) -> UpstreamConnection | None:
        """An idle connection ready for a request, or None (then `open` one)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                self.active += 1
                return conn
        return None

    async def open(self, timeout: float) -> UpstreamConnection:
        """A new connection (counted active), or UpstreamConnectError / UpstreamTimeout."""
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(  # type: ignore[type-var]
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname if self.ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connecting to {self.label} timed out") from exc
        except ssl.SSLError as exc:
            raise UpstreamTlsError(describe_failure(exc, self.label, self.server_hostname)) from exc
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UpstreamConnectError(f"connecting to {self.label} failed: {reason}") from exc
        self.opened += 1
        self.active += 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give a connection back after a complete exchange; it is kept if it can carry another."""
        self.active -= 1
        settings = self.settings
        transport = conn.transport
        if (
            not conn.keep_alive
            or transport is None
            or transport.is_closing()
            or (settings.max_requests and conn.requests >= settings.max_requests)
            or len(self.idle) >= settings.max_idle
        ):
            conn.close()
            return
        if conn.reading_paused:  # paused for a slow client; idle, it must notice the backend closing
            conn.resume_reading()
        conn.idle_since = self._clock()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(settings.idle_timeout, self._sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        """An active connection that failed or can't be reused."""
        self.active -= 1
        conn.abort()

    def detach(self, conn: UpstreamConnection) -> None:
        """An active connection that leaves the pool for good without being closed by it: one that
        failed (it closes itself) or one handed to a tunnel (it belongs to the client connection now)."""
        self.active -= 1

    def forget(self, conn: UpstreamConnection) -> None:
        """Called when a connection closes: drop it from the idle list if it is there."""
        idle = self.idle
        for i in range(len(idle)):
            if idle[i] is conn:
                del idle[i]
                return

    def evict_one(self) -> bool:
        """Close the longest-idle connection (to make room under a connection limit); False if none."""
        if not self.idle:
            return False
        conn = self.idle.pop(0)
        conn.close()
        return True

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        """Close connections idle longer than idle_timeout (the oldest sit at the front)."""
        self._sweeper = None
        cutoff = self._clock() - self.settings.idle_timeout
        idle = self.idle
        expired = 0
        while expired < len(idle) and idle[expired].idle_since <= cutoff:
            expired += 1
        for conn in idle[:expired]:
            conn.close()
        del idle[:expired]
        if idle:
            delay = idle[0].idle_since + self.settings.idle_timeout - self._clock()
            self._sweeper = self.loop.call_later(max(delay, 0.05), self._sweep)
