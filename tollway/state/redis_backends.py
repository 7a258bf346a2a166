"""Redis deployments the rate limiter runs its scripts on: standalone, Sentinel and Cluster, each a
`RedisBackend` built on `RedisClient` (tollway.state.redis_client), and the URLs that name them.

Sentinel: the master is asked of the sentinels and checked with ROLE; a lost connection or a READONLY
reply (the master was demoted) asks again. Cluster: the slot map comes from CLUSTER SLOTS; MOVED updates
it (and refreshes the whole map in the background), ASK sends ASKING then the command to the named node;
keys of one limit share a hash tag so they live together.

Why the discovery is ours and not redis-py's: redis-py's Sentinel and Cluster discovery is built into its
own connection classes (`SentinelConnectionPool`, the cluster `NodesManager`), so taking it would mean
running redis-py's clients beside this one, with the cancellation bugs the client module describes, and
making redis-py a run-time dependency of every worker with a Redis limit. Only the sentinel question
(`get-master-addr-by-name`, about twenty lines here) could be lifted alone; the failover watch
(`+switch-master`), READONLY handling and MOVED/ASK redirects have to be ours either way, because they
act on our connections. The tests in tests/integration/state/test_sentinel_cluster.py run these paths
against real sentinels and cluster nodes.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any

import hiredis

from tollway.state.redis_client import (
    Arg,
    ClientStats,
    RedisClient,
    RedisError,
    RedisReplyError,
    RedisUnavailable,
    Script,
    encode,
    spawn,
)
from tollway.state.redis_health import RedisHealth

log = logging.getLogger("tollway.state.redis")


# -- the interface the limiter uses, for every deployment --------------------------------------------------
class RedisBackend:
    """What the policies (tollway.state.limits) call: run a script on the node that owns a key.

    `health` is this process's view of whether the deployment answers, shared by every policy using
    it (made by `backend_from_url`, or on first read for a backend built by hand)."""

    stats: ClientStats
    _health: RedisHealth | None = None

    @property
    def health(self) -> RedisHealth:
        health = self._health
        if health is None:
            health = self._health = RedisHealth(self.name, ping=self.ping)
        return health

    async def ping(self) -> Any:
        return await self.call(b"PING")

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
            self._watcher = spawn(self._watch())
        if self._discovering is None:
            self._discovering = asyncio.get_running_loop().create_future()
            spawn(self._ask_sentinels(self._discovering))
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
            spawn(self._quiet_refresh())

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
    - ``rediss://`` and ``rediss+cluster://``: the same over TLS, the server's certificate checked
      against the system's CAs (or the `ssl` option: an `ssl.SSLContext`, say for a private CA)

    `options` go to the clients (timeout, connect_timeout, connections, sentinel_password, ssl).
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
    if scheme in ("rediss", "rediss+cluster"):
        options.setdefault("ssl", ssl.create_default_context())
        scheme = scheme.replace("rediss", "redis", 1)
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
    raise ValueError(
        f"unknown redis URL scheme {scheme!r} (redis, rediss, redis+sentinel, redis+cluster, rediss+cluster)"
    )


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
