"""A thin asyncio Redis client for the rate limiter's hot path: RESP2 over one multiplexed connection,
parsed by `hiredis.Reader`. The deployments built on it (standalone, Sentinel, Cluster) and the URLs
that name them are in tollway.state.redis_backends.

Why not redis-py: per EVALSHA at 50 concurrent callers it spends 5-6x the CPU of this client
(bench/redis_client.py; python-ecosystem.md §2.3 measured 43.5 µs vs 7.3 µs), and cancelling one of
its calls mid-reply has left connections answering the wrong caller (redis/redis-py#2624, #2665).
Here nothing is ever cancelled mid-reply:

- Requests are written in order on one connection and replies resolve futures in the same order;
  writes made in one event-loop turn go out in one `write` (pipelining for free).
- A caller that stops waiting (its task cancelled) only abandons its future; the reply is still read
  and dropped, so the next caller gets the next reply.
- Every request has a deadline (`timeout`). When the oldest pending request passes it, all pending
  requests fail with `RedisTimeout` and the connection is dropped — never reused in an unknown state.
- A failed connect marks the backend down for a backoff (50 ms doubling to 2 s); calls made while it
  is down fail at once with `RedisUnavailable` instead of waiting, so a dead Redis costs a request
  nothing but the fallback.

Scripts run with EVALSHA; a NOSCRIPT reply (a restarted or failed-over server) retries once with EVAL,
which also caches the script again. `ssl` (a `ssl.SSLContext`) speaks TLS: `rediss://` URLs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import ssl
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import hiredis

from tollway.errors import TollwayError

log = logging.getLogger("tollway.state.redis")

Arg = bytes | str | int | float
_tasks: set[asyncio.Task[Any]] = set()  # strong references to background tasks, until they end


def spawn(coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run `coroutine` in the background, referenced until it ends (the loop only keeps weak ones)."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


# -- errors -----------------------------------------------------------------------------------------------
class RedisError(TollwayError):
    """Redis could not answer: the caller falls back (fail-open) or answers 503 (fail-closed)."""

    status = 503
    message = "redis unavailable"


class RedisUnavailable(RedisError):
    """Not connected (refused, reset, closed, or backing off after a failure)."""


class RedisClosed(RedisUnavailable):
    """The client was closed by its owner (a config change, shutdown): not an outage."""


class RedisTimeout(RedisError):
    """No reply in time; the connection was dropped."""

    message = "redis timed out"


class RedisReplyError(RedisError):
    """Redis answered with an error reply (a script error, WRONGTYPE, MOVED...)."""

    status = 500

    @property
    def kind(self) -> str:
        return self.message.split(" ", 1)[0]


# -- RESP -------------------------------------------------------------------------------------------------
def encode(args: Sequence[Arg]) -> bytes:
    """One command in RESP2 (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(float(arg)).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Script:
    """A Lua script, run by SHA1 (EVALSHA) and loaded on demand."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, source: str, name: str = "") -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        self.name = name

    def __repr__(self) -> str:
        return f"<Script {self.name or '?'} {self.sha[:8].decode()}>"


class ClientStats:
    """Counters for metrics (summed over workers by the metrics layer)."""

    __slots__ = ("commands", "connects", "errors", "failed_connects", "noscript", "redirects", "timeouts")

    def __init__(self) -> None:
        self.commands = 0  # commands written (EVALSHA, EVAL, ...)
        self.connects = 0  # connections established
        self.failed_connects = 0
        self.timeouts = 0  # requests failed by a deadline (their connection was dropped)
        self.errors = 0  # requests failed for any reason (incl. timeouts)
        self.noscript = 0  # EVALSHA answered NOSCRIPT (script reloaded with EVAL)
        self.redirects = 0  # MOVED/ASK followed (cluster)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ClientStats.__slots__}

    def __repr__(self) -> str:
        return "<ClientStats " + " ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ">"


# -- one connection ---------------------------------------------------------------------------------------
class RedisConnection(asyncio.Protocol):
    """One TCP connection: writes requests, resolves futures with replies in order (asyncio protocol)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, stats: ClientStats) -> None:
        self.loop = loop
        self.timeout = timeout
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self.address = ""
        self._reader = hiredis.Reader()
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._error: RedisError | None = None

    # asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not pending:
                    raise hiredis.ProtocolError("reply with no request")
                future = pending.popleft()[0]
                if future.done():
                    continue  # its caller gave up; the reply is consumed all the same
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(RedisReplyError(str(reply)))
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.abort(RedisUnavailable(f"redis protocol error from {self.address}: {exc}"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_all(self._error or RedisUnavailable(f"redis connection to {self.address} lost"))
        self.closed.set()

    def pause_writing(self) -> None:  # pragma: no cover - requests are small; the deadline covers a stall
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # requests
    @property
    def usable(self) -> bool:
        return self.transport is not None and self._error is None

    def send(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queue one command; the future resolves with its reply (or a RedisError)."""
        future: asyncio.Future[Any] = self.loop.create_future()
        if not self.usable:
            future.set_exception(self._error or RedisUnavailable(f"not connected to {self.address}"))
            return future
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(encode(args))
        self._pending.append((future, self.loop.time() + self.timeout))
        self.stats.commands += 1
        if self._timer is None:
            self._timer = self.loop.call_at(self._pending[0][1], self._check_deadline)
        return future

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        if self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending:
            return
        deadline = self._pending[0][1]
        if deadline <= self.loop.time():
            self.stats.timeouts += 1
            self.abort(RedisTimeout(f"no reply from redis {self.address} within {self.timeout}s"))
            return
        self._timer = self.loop.call_at(deadline, self._check_deadline)

    def abort(self, error: RedisError) -> None:
        """Fail everything pending with `error` and drop the connection (it is never reused)."""
        if self._error is None:
            self._error = error
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, error: RedisError) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out = []
        pending = self._pending
        while pending:
            future = pending.popleft()[0]
            if not future.done():
                self.stats.errors += 1
                future.set_exception(error)

    def close(self) -> None:
        self.abort(RedisClosed("connection closed by the client"))


# -- a client for one server ------------------------------------------------------------------------------
class RedisClient:
    """One Redis server (standalone, or a node of a Sentinel or Cluster deployment).

    Connects lazily, keeps `connections` multiplexed connections (round-robin), reconnects with
    backoff. `call` and `evalsha` are the whole interface the limiter needs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        timeout: float = 0.25,
        connect_timeout: float = 0.25,
        connections: int = 1,
        stats: ClientStats | None = None,
        require_master: bool = False,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.ssl = ssl
        self.port = port
        self.password = password
        self.username = username
        self.db = db
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.require_master = require_master
        self.stats = stats or ClientStats()
        self.size = max(1, connections)
        self._conns: list[RedisConnection | None] = [None] * self.size
        self._connecting: list[asyncio.Future[RedisConnection] | None] = [None] * self.size
        self._next = 0
        self._down_until = 0.0
        self._backoff = 0.0
        self._closed = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        live = sum(1 for c in self._conns if c is not None and c.usable)
        return f"<RedisClient {self.address} db={self.db} connections={live}/{self.size}>"

    # requests
    async def call(self, *args: Arg) -> Any:
        """Run one command; raises RedisError subclasses only."""
        conn = self._ready_connection() or await self._connection()
        return await conn.send(args)

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands back to back on one connection (ASKING + command); replies or errors."""
        conn = self._ready_connection() or await self._connection()
        futures = [conn.send(c) for c in commands]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        head: list[Arg] = [b"EVALSHA", script.sha, len(keys), *keys, *args]
        try:
            return await self.call(*head)
        except RedisReplyError as exc:
            if exc.kind != "NOSCRIPT":
                raise
        self.stats.noscript += 1
        return await self.call(b"EVAL", script.source, len(keys), *keys, *args)

    # connections
    def _ready_connection(self) -> RedisConnection | None:
        index = self._next
        if self.size > 1:
            self._next = (index + 1) % self.size
        conn = self._conns[index]
        return conn if conn is not None and conn.usable else None

    async def _connection(self) -> RedisConnection:
        if self._closed:
            raise RedisClosed("client closed")
        index = self._next
        conn = self._conns[index]
        if conn is not None and conn.usable:
            return conn
        pending = self._connecting[index]
        if pending is None:
            if time.monotonic() < self._down_until:
                raise RedisUnavailable(f"redis {self.address} unreachable (retrying shortly)")
            pending = asyncio.get_running_loop().create_future()
            self._connecting[index] = pending
            spawn(self._connect(index, pending))
        return await asyncio.shield(pending)

    async def _connect(self, index: int, result: asyncio.Future[RedisConnection]) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn = await asyncio.wait_for(self._open(loop), self.connect_timeout)
        except Exception as exc:  # refused, timed out, AUTH failed, not a master: all mean "down"
            self.stats.failed_connects += 1
            self._backoff = min(2.0, max(0.05, self._backoff * 2))
            self._down_until = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)
            error = exc if isinstance(exc, RedisError) else RedisUnavailable(_describe(self.address, exc))
            if not result.done():
                result.set_exception(error)
                result.exception()  # retrieved here too: nobody may be waiting any more
        else:
            self.stats.connects += 1
            self._backoff = 0.0
            self._down_until = 0.0
            self._conns[index] = conn
            if not result.done():
                result.set_result(conn)
        finally:
            self._connecting[index] = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> RedisConnection:
        stats = self.stats

        def factory() -> RedisConnection:
            return RedisConnection(loop, self.timeout, stats)

        _, conn = await loop.create_connection(factory, self.host, self.port, ssl=self.ssl)
        conn.address = self.address
        try:
            for command in self._handshake():
                await conn.send(command)
            if self.require_master:
                role = await conn.send((b"ROLE",))
                if not role or role[0] != b"master":
                    raise RedisUnavailable(f"redis {self.address} is not a master")
        except BaseException:
            conn.close()
            raise
        return conn

    def _handshake(self) -> list[tuple[Arg, ...]]:
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            if self.username:
                commands.append((b"AUTH", self.username, self.password))
            else:
                commands.append((b"AUTH", self.password))
        if self.db:
            commands.append((b"SELECT", self.db))
        return commands

    def drop_connections(self) -> None:
        """Drop every connection (a failover was seen); the next call reconnects."""
        for index, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
                self._conns[index] = None

    async def close(self) -> None:
        self._closed = True
        conns = [c for c in self._conns if c is not None]
        self.drop_connections()
        for conn in conns:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(conn.closed.wait(), 1.0)


def _describe(address: str, exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"redis {address}: connect timed out"
    return f"redis {address}: {getattr(exc, 'strerror', None) or exc}"
