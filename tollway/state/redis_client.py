"""A thin asyncio Redis client for the rate limiter's hot path: RESP2 over one multiplexed connection,
parsed by `hiredis.Reader`; standalone, Sentinel and Cluster.

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
which also caches the script again. Sentinel: the master is asked of the sentinels and checked with
ROLE; a lost connection or a READONLY reply (the master was demoted) asks again. Cluster: the slot map
comes from CLUSTER SLOTS; MOVED updates it (and refreshes the whole map in the background), ASK sends
ASKING then the command to the named node; keys of one limit share a hash tag so they live together.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import hiredis

from tollway.errors import TollwayError

log = logging.getLogger("tollway.state.redis")

Arg = bytes | str | int | float


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
    ) -> None:
        self.host = host
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

    def send_now(self, args: Sequence[Arg]) -> asyncio.Future[Any] | None:
        """Queue a command if a connection is up (no coroutine); None when one must be made first."""
        conn = self._ready_connection()
        return conn.send(args) if conn is not None else None

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
            asyncio.get_running_loop().create_task(self._connect(index, pending))
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

        _, conn = await loop.create_connection(factory, self.host, self.port)
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


# -- the interface the limiter uses, for every deployment --------------------------------------------------
class RedisBackend:
    """What `tollway.state.limits` calls: run a script on the node that owns a key."""

    stats: ClientStats

    @property
    def name(self) -> str:
        """How logs name this deployment."""
        raise NotImplementedError

    async def script(self, script: Script, key: bytes, args: Sequence[Arg]) -> Any:
        raise NotImplementedError

    async def call(self, *args: Arg) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class Standalone(RedisBackend):
    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.stats = client.stats

    def __repr__(self) -> str:
        return f"<Standalone {self.client!r}>"

    @property
    def name(self) -> str:
        client = self.client
        return client.address if not client.db else f"{client.address}/{client.db}"

    async def script(self, script: Script, key: bytes, args: Sequence[Arg]) -> Any:
        return await self.client.evalsha(script, (key,), args)

    async def call(self, *args: Arg) -> Any:
        return await self.client.call(*args)

    async def close(self) -> None:
        await self.client.close()


class Sentinel(RedisBackend):
    """The master of `service` as named by any of `sentinels`; follows failovers.

    The master is asked of the sentinels and checked with ROLE on connect. A failover is noticed three
    ways: the sentinels' `+switch-master` announcement (a subscription kept open in the background),
    a lost connection, or a READONLY reply (the old master was demoted). Between the promotion and the
    switch, counts written to the old master are lost — as are writes the old master acknowledged but
    had not replicated: asynchronous replication's price (docs/rate-limiting.md).
    """

    def __init__(
        self,
        sentinels: Sequence[tuple[str, int]],
        service: str,
        *,
        sentinel_password: str | None = None,
        timeout: float = 0.25,
        connect_timeout: float = 0.25,
        **client_options: Any,
    ) -> None:
        self.sentinels = list(sentinels)
        self.service = service
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.client_options = client_options
        self.stats = ClientStats()
        self._sentinel_clients = [
            RedisClient(h, p, password=sentinel_password, timeout=timeout, connect_timeout=connect_timeout)
            for h, p in self.sentinels
        ]
        self.sentinel_password = sentinel_password
        self.master: RedisClient | None = None
        self._discovering: asyncio.Future[RedisClient] | None = None
        self._last_master: tuple[str, int] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        self.failovers = 0  # master address changes seen

    def __repr__(self) -> str:
        return f"<Sentinel {self.service} master={self.master.address if self.master else None}>"

    @property
    def name(self) -> str:
        return f"sentinel service {self.service!r}"

    async def script(self, script: Script, key: bytes, args: Sequence[Arg]) -> Any:
        master = self.master or await self._discover()
        try:
            return await master.evalsha(script, (key,), args)
        except RedisReplyError as exc:
            if exc.kind != "READONLY":
                raise
            self._forget(master)  # demoted: ask the sentinels again, retry once
        except RedisUnavailable:
            self._forget(master)
            raise
        master = await self._discover()
        return await master.evalsha(script, (key,), args)

    async def call(self, *args: Arg) -> Any:
        master = self.master or await self._discover()
        try:
            return await master.call(*args)
        except RedisUnavailable:
            self._forget(master)
            raise

    def _forget(self, master: RedisClient) -> None:
        if self.master is master:
            self.master = None
            master.drop_connections()

    async def _discover(self) -> RedisClient:
        if self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        if self._discovering is None:
            self._discovering = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._ask_sentinels(self._discovering))
        return await asyncio.shield(self._discovering)

    async def _ask_sentinels(self, result: asyncio.Future[RedisClient]) -> None:
        errors = []
        try:
            for sentinel in self._sentinel_clients:
                try:
                    reply = await sentinel.call(b"SENTINEL", b"get-master-addr-by-name", self.service)
                except RedisError as exc:
                    errors.append(f"{sentinel.address}: {exc.message}")
                    continue
                if not reply:
                    errors.append(f"{sentinel.address}: no master named {self.service!r}")
                    continue
                host, port = reply[0].decode(), int(reply[1])
                previous = self.master
                if previous is not None and (previous.host, previous.port) == (host, port):
                    result.set_result(previous)
                    return
                master = RedisClient(
                    host,
                    port,
                    timeout=self.timeout,
                    connect_timeout=self.connect_timeout,
                    stats=self.stats,
                    require_master=True,
                    **self.client_options,
                )
                if self._last_master is not None and self._last_master != (host, port):
                    self.failovers += 1
                    log.warning("redis sentinel %s: master is now %s:%d", self.service, host, port)
                self._last_master = (host, port)
                self.master = master
                result.set_result(master)
                return
            error = RedisUnavailable(f"no sentinel named a master for {self.service!r}: {'; '.join(errors)}")
            result.set_exception(error)
            result.exception()
        finally:
            self._discovering = None

    async def _watch(self) -> None:
        """Listen for `+switch-master` on any sentinel; on one for our service, drop the old master."""
        backoff = 0.1
        while not self._closed:
            for host, port in self.sentinels:
                try:
                    await self._listen(host, port)
                    backoff = 0.1
                except (TimeoutError, OSError, hiredis.ProtocolError):
                    continue
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def _listen(self, host: str, port: int) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
        try:
            if self.sentinel_password is not None:
                writer.write(encode((b"AUTH", self.sentinel_password)))
            writer.write(encode((b"SUBSCRIBE", b"+switch-master")))
            parser = hiredis.Reader()
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed(data)
                while (message := parser.gets()) is not False:
                    if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                        # "<service> <old ip> <old port> <new ip> <new port>"
                        fields = message[2].decode(errors="replace").split()
                        if fields and fields[0] == self.service and self.master is not None:
                            log.warning(
                                "redis sentinel %s: failover announced (%s)", self.service, message[2]
                            )
                            self._forget(self.master)
        finally:
            writer.close()

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        for client in [*self._sentinel_clients, *([self.master] if self.master else [])]:
            await client.close()


# -- Redis Cluster ----------------------------------------------------------------------------------------
SLOTS = 16384


def key_slot(key: bytes) -> int:
    """The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part in the first {...})."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


class Cluster(RedisBackend):
    """A Redis Cluster: routes each script call to the master owning its key's slot."""

    MAX_REDIRECTS = 5

    def __init__(
        self,
        startup_nodes: Sequence[tuple[str, int]],
        *,
        timeout: float = 0.25,
        connect_timeout: float = 0.25,
        **client_options: Any,
    ) -> None:
        self.startup_nodes = list(startup_nodes)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.client_options = client_options
        self.stats = ClientStats()
        self.nodes: dict[tuple[str, int], RedisClient] = {}
        self.slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._refreshing: asyncio.Future[None] | None = None
        self.refreshes = 0

    def __repr__(self) -> str:
        owners = {a for a in self.slots if a is not None}
        return f"<Cluster nodes={len(owners)} refreshes={self.refreshes}>"

    @property
    def name(self) -> str:
        return "cluster " + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    def node(self, address: tuple[str, int]) -> RedisClient:
        client = self.nodes.get(address)
        if client is None:
            client = RedisClient(
                address[0],
                address[1],
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                stats=self.stats,
                **self.client_options,
            )
            self.nodes[address] = client
        return client

    async def script(self, script: Script, key: bytes, args: Sequence[Arg]) -> Any:
        slot = key_slot(key)
        address = self.slots[slot]
        if address is None:
            await self.refresh()
            address = self.slots[slot]
            if address is None:
                raise RedisUnavailable(f"no cluster node serves slot {slot}")
        asking = False
        for _ in range(self.MAX_REDIRECTS):
            client = self.node(address)
            try:
                if asking:
                    replies = await client.pipeline([(b"ASKING",), _evalsha(script, key, args)])
                    if isinstance(replies[1], RedisReplyError) and replies[1].kind == "NOSCRIPT":
                        replies = await client.pipeline([(b"ASKING",), _eval(script, key, args)])
                    if isinstance(replies[1], BaseException):
                        raise replies[1]
                    return replies[1]
                return await client.evalsha(script, (key,), args)
            except RedisReplyError as exc:
                kind = exc.kind
                if kind not in ("MOVED", "ASK"):
                    raise
                self.stats.redirects += 1
                _, _, target = exc.message.split(" ")
                host, _, port = target.rpartition(":")
                address = (host or client.host, int(port))
                asking = kind == "ASK"
                if kind == "MOVED":
                    self.slots[slot] = address
                    self._refresh_soon()
            except RedisUnavailable:
                self._refresh_soon()  # a failover may have moved the slot; the caller falls back now
                raise
        raise RedisUnavailable(f"too many cluster redirects for slot {slot}")

    async def call(self, *args: Arg) -> Any:
        for address in self._known_addresses():
            try:
                return await self.node(address).call(*args)
            except RedisUnavailable:
                continue
        raise RedisUnavailable("no cluster node reachable")

    def _known_addresses(self) -> list[tuple[str, int]]:
        seen = dict.fromkeys(a for a in self.slots if a is not None)
        for address in self.startup_nodes:
            seen.setdefault(address, None)
        return list(seen)

    def _refresh_soon(self) -> None:
        if self._refreshing is None:
            asyncio.get_running_loop().create_task(self._quiet_refresh())

    async def _quiet_refresh(self) -> None:
        with contextlib.suppress(RedisError):
            await self.refresh()

    async def refresh(self) -> None:
        """Load the slot map (CLUSTER SLOTS) from the first node that answers."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshing = done
        try:
            errors = []
            for address in self._known_addresses():
                try:
                    reply = await self.node(address).call(b"CLUSTER", b"SLOTS")
                except RedisError as exc:
                    errors.append(f"{address[0]}:{address[1]}: {exc.message}")
                    continue
                slots: list[tuple[str, int] | None] = [None] * SLOTS
                for entry in reply:
                    first, last, master = int(entry[0]), int(entry[1]), entry[2]
                    host = master[0].decode() or address[0]
                    owner = (host, int(master[1]))
                    for slot in range(first, last + 1):
                        slots[slot] = owner
                self.slots = slots
                self.refreshes += 1
                done.set_result(None)
                return
            error = RedisUnavailable("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))
            done.set_exception(error)
            done.exception()
            raise error
        finally:
            self._refreshing = None

    async def close(self) -> None:
        for client in self.nodes.values():
            await client.close()


def _evalsha(script: Script, key: bytes, args: Sequence[Arg]) -> tuple[Arg, ...]:
    return (b"EVALSHA", script.sha, 1, key, *args)


def _eval(script: Script, key: bytes, args: Sequence[Arg]) -> tuple[Arg, ...]:
    return (b"EVAL", script.source, 1, key, *args)


# -- configuration ------------------------------------------------------------------------------------------
def backend_from_url(url: str, **options: Any) -> RedisBackend:
    """A backend from a URL:

    - ``redis://[[user]:password@]host[:port][/db]``                      standalone
    - ``redis+sentinel://[[user]:password@]h1:p1,h2:p2/service[/db]``     Sentinel
    - ``redis+cluster://[[user]:password@]h1:p1,h2:p2``                   Cluster (startup nodes)

    `options` go to the clients (timeout, connect_timeout, connections, sentinel_password).
    """
    from urllib.parse import unquote

    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a redis URL: {url!r}")
    userinfo, at, hostpart = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else unquote(user)
        if not colon:
            username = None
    hosts, _, path = hostpart.partition("/")
    addresses = [_hostport(h) for h in hosts.split(",") if h]
    if not addresses:
        raise ValueError(f"no host in redis URL {url!r}")
    parts = [p for p in path.split("/") if p]
    if scheme == "redis":
        db = int(parts[0]) if parts else 0
        host, port = addresses[0]
        return Standalone(RedisClient(host, port, db=db, password=password, username=username, **options))
    if scheme == "redis+sentinel":
        if not parts:
            raise ValueError("a sentinel URL names the service: redis+sentinel://h:26379/mymaster")
        db = int(parts[1]) if len(parts) > 1 else 0
        return Sentinel(addresses, parts[0], db=db, password=password, username=username, **options)
    if scheme == "redis+cluster":
        return Cluster(addresses, password=password, username=username, **options)
    raise ValueError(f"unknown redis URL scheme {scheme!r} (redis, redis+sentinel, redis+cluster)")


_BACKENDS: dict[str, RedisBackend] = {}


def backend_for(url: str, **options: Any) -> RedisBackend:
    """The backend for `url` in this process, made once and shared by every policy that names it —
    across config reloads too, so connections and outage state carry over."""
    key = url + " " + repr(sorted(options.items()))
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = backend_from_url(url, **options)
    return backend


def cached_backends() -> list[RedisBackend]:
    return list(_BACKENDS.values())


def _hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port or 6379)
    host, _, port = text.rpartition(":")
    if not host:
        return text, 6379
    return host, int(port)
