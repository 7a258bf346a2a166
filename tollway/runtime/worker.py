"""A worker process: one full data plane on uvloop, serving the listening sockets it was handed.

The supervisor starts workers as fresh interpreters (``python -m tollway.runtime.worker``), passing a
channel socket and one SO_REUSEPORT listening socket per listen address. The listening sockets are
created — and kept open — by the supervisor, so connections that arrive while a worker restarts wait
in the socket's backlog instead of being refused. Config arrives over the channel; a new snapshot
replaces the old with one assignment, and requests in flight finish on the snapshot they started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from tollway.config.schema import GatewayConfig
from tollway.observability.tracecontext import TraceSettings
from tollway.observability.worker_side import WorkerObservability
from tollway.protocol.tls import ServerTls, server_tls_options, update_server_tls
from tollway.proxy.request_ids import RequestIds
from tollway.proxy.server import ClientConnection
from tollway.proxy.snapshot import Snapshot, build_snapshot
from tollway.runtime import config_delta
from tollway.runtime.channel import ChannelProtocol, Message, open_channel
from tollway.runtime.config_hold import (
    freeze_config_objects,
    release_freed_memory,
    thaw_config_objects,
    unwire,
)
from tollway.runtime.handoff import ENV_FD as HANDOFF_ENV_FD
from tollway.runtime.handoff import adopt
from tollway.state.batched import settle_slices
from tollway.state.shared import ENV_FD as STATE_ENV_FD
from tollway.state.shared import SharedTable, set_node_table
from tollway.upstream.pool import Pool, PoolSettings
from tollway.upstream.worker_registry import UpstreamRegistry

if TYPE_CHECKING:
    from tollway.errors import TollwayError, UpstreamError
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.snapshot import CompiledRoute

log = logging.getLogger("tollway.worker")
_ERROR_LOG_INTERVAL = 10.0  # seconds between log lines for the same backend failure
ENV_FDS = "TOLLWAY_WORKER_FDS"
ENV_LISTEN_KINDS = "TOLLWAY_WORKER_LISTEN_KINDS"  # per listening socket: "", "tls" or "mtls"


class Worker:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        channel_sock: socket.socket,
        listen_socks: list[socket.socket],
        handoff_sock: socket.socket | None = None,
        listen_kinds: list[str] | None = None,
    ) -> None:
        self.loop = loop
        self.index = index
        self.channel_sock = channel_sock
        self.listen_socks = listen_socks
        self.handoff_sock = handoff_sock  # connections the supervisor accepted for a restarting worker
        self.listen_kinds = listen_kinds or [""] * len(listen_socks)
        self.tls: ServerTls | None = None  # certificates of TLS listeners (tollway.protocol.tls)
        self._ticket_keys: bytes | None = None
        self.channel: ChannelProtocol | None = None
        self.snapshot: Snapshot = None  # type: ignore[assignment]  # set by the first config
        # The base of the next config delta: only a config sent whole ("config", a config store's
        # supervisor) may be followed by deltas; one sent pickled ("config_wire") is not kept (~16 MB).
        self.config: GatewayConfig | None = None
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self.pools: dict[tuple[object, ...], Pool] = {}
        self.pool_settings = PoolSettings()
        self.upstreams = UpstreamRegistry(loop, self._send, self._upstream_targets_changed)
        self.connections_accepted = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget tasks, referenced until done
        self.observability = WorkerObservability(loop)  # metrics, access log, tracing
        self.recorder = self.observability.recorder
        self.servers: list[asyncio.AbstractServer] = []
        self._error_log: dict[tuple[str, str], tuple[float, int]] = {}
        self.request_ids = RequestIds(os.urandom(8).hex().encode())
        self._configured = asyncio.Event()
        self._stopped = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------
    async def run(self) -> None:
        self.channel = await open_channel(self.channel_sock, self.on_message, self._supervisor_gone)
        await self._configured.wait()
        if self.draining:
            return
        for sock, kind in zip(self.listen_socks, self.listen_kinds, strict=True):
            server = await self.loop.create_server(
                lambda: ClientConnection(self),  # type: ignore[arg-type,return-value]
                sock=sock,
                backlog=self.snapshot.settings.backlog,
                **server_tls_options(self.tls, kind),
            )
            self.servers.append(server)
        if self.handoff_sock is not None:
            adopt(self.loop, self.handoff_sock, self._serve_passed)
        self.channel.send(("ready", self.snapshot.version))
        await self._stopped.wait()

    def on_message(self, message: Message) -> None:
        kind = message[0]
        if kind == "config":
            self.apply_config(message[1], message[2])
        elif kind == "drain":
            self.spawn(self.drain(message[1]))
        elif kind.startswith("upstream_"):
            self.upstreams.on_message(message)
        else:
            handler = getattr(self, f"on_{kind}", None)
            if handler is not None:
                handler(*message[1:])

    def apply_config(self, version: int, config: GatewayConfig, delta_base: bool = True) -> None:
        """`delta_base`: keep `config` as the base of the next delta (tollway.runtime.config_delta)."""
        self._apply_pool_limits(config)
        try:
            trace = TraceSettings.from_config(config.gateway.tracing)
            snapshot = build_snapshot(
                config,
                version,
                self.pool_for,
                self.upstreams,
                trace=trace,
                attach_pipelines=_attach_pipelines,
            )
        except Exception as exc:  # the supervisor validated it; a failure here is a bug worth a trace
            log.exception("worker %d could not apply config version %d", self.index, version)
            if self.channel is not None:
                self.channel.send(("config_failed", version, f"{type(exc).__name__}: {exc}"))
            return
        first = self.snapshot is None
        self.tls = update_server_tls(self.tls, config, any(self.listen_kinds))
        if first and self.tls is not None and self._ticket_keys is not None:
            self.tls.share_ticket_keys(self._ticket_keys)
        self.snapshot, self.config = snapshot, config if delta_base else None
        self.upstreams.activate(snapshot.clusters)
        self.observability.apply(config)
        # metrics, access log, span: called straight from the client connection, and not at all when off
        snapshot.request_finished = self.recorder.finished if self.recorder.records() else None
        self._close_unused_pools(snapshot)
        if first:  # not serving yet: the collection stalls no request
            freeze_config_objects()
            release_freed_memory()
            self._configured.set()
            return
        if self.channel is not None:
            self.channel.send(("ready", version))
        # After a reload, once "ready" is out: one full collection (what the garbage collector would
        # run soon anyway), then the new config leaves its scans (config_hold.freeze_config_objects).
        thaw_config_objects()
        self.loop.call_soon(_settle_memory)

    def _serve_passed(self, sock: socket.socket) -> None:
        """A connection the supervisor accepted on a restarting worker's socket (tollway.runtime.handoff)."""
        if self.draining:
            sock.close()
            return
        tls = server_tls_options(self.tls, self._listener_kind(sock))  # a TLS listener's: handshake here
        task = self.loop.create_task(
            self.loop.connect_accepted_socket(lambda: ClientConnection(self), sock=sock, **tls)  # type: ignore[type-var]
        )
        task.add_done_callback(_ignore_failure)

    def _listener_kind(self, sock: socket.socket) -> str:
        """The kind ("", "tls", "mtls") of the listener a passed connection arrived on, by its port."""
        port = sock.getsockname()[1]
        for listener, kind in zip(self.listen_socks, self.listen_kinds, strict=False):
            if listener.getsockname()[1] == port:
                return kind
        return ""

    def on_config_wire(self, version: int, data: bytes) -> None:
        """A whole config, pickled once by the supervisor (tollway.runtime.config_hold)."""
        self.apply_config(version, unwire(data), delta_base=False)  # no delta follows a wire config

    def on_config_delta(self, version: int, delta: dict[str, Any]) -> None:
        """What changed since the version this worker holds (tollway.runtime.config_delta)."""
        if self.config is None or self.snapshot.version != version - 1:
            self._send(("config_needed",))
            return
        self.apply_config(version, config_delta.decode(self.config, delta))

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish within `timeout`, then close everything."""
        if self.draining:
            return
        self.draining = True
        self._configured.set()
        if self.handoff_sock is not None:  # the supervisor passes nothing more to a draining worker
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.handoff_sock.fileno())
            self.handoff_sock.close()
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.drain()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        # Slices of batched limits still in flight: Redis has counted them; landed in the node table,
        # the node's other workers spend them instead of the units being lost for the window.
        await settle_slices(max(0.1, min(1.0, deadline - self.loop.time())))
        for pool in self.pools.values():
            pool.close()
        self.upstreams.close()
        if self.channel is not None:  # final numbers, so a drained worker's counts are not lost
            self.channel.send(("collected", 0, self.observability.collect(self)))
        self.observability.close()
        self._stopped.set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _supervisor_gone(self) -> None:
        if not self.draining:
            log.warning("worker %d lost its supervisor; draining", self.index)
            timeout = self.snapshot.settings.drain_timeout if self.snapshot is not None else 0.0
            self.spawn(self.drain(timeout))

    # -- used by connections and exchanges --------------------------------------------------------------
    def pool_for(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
        settings: PoolSettings | None = None,
        owner: str | None = None,
    ) -> Pool:
        """The pool for a backend address. An upstream's targets get pools of their own (`owner`, with the
        upstream's pool settings), so its connection count is its own; service URLs share by address."""
        key = (host, port, tls, server_hostname, settings, owner)  # tls: one context per TLS setting
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(self.loop, host, port, settings or self.pool_settings, tls, server_hostname)
            self.pools[key] = pool
        return pool

    def _send(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def _upstream_targets_changed(self) -> None:
        """DNS changed an upstream's addresses: pools no target uses any more are closed."""
        if self.snapshot is not None:
            self._close_unused_pools(self.snapshot)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.connections_accepted += 1

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    def upstream_error(self, ex: Exchange, error: UpstreamError) -> None:
        """Count a backend failure (metrics), and log it; during an outage each distinct failure is logged
        once per interval with the number of repeats, not once per request (metrics count every one)."""
        self.observability.upstream_error(ex, error)
        target = ex.target.label if ex.target is not None else "-"
        key = (target, error.message)
        now = self.loop.time()
        last, repeats = self._error_log.get(key, (0.0, 0))
        if last and now - last < _ERROR_LOG_INTERVAL:
            self._error_log[key] = (last, repeats + 1)
            return
        if len(self._error_log) > 1024:
            self._error_log.clear()
        self._error_log[key] = (now, 0)
        suffix = f" ({repeats} more like it in the last {_ERROR_LOG_INTERVAL:g}s)" if repeats else ""
        log.warning(
            "request %s: %s (upstream %s)%s", ex.request_id.decode("latin-1"), error.message, target, suffix
        )

    def bad_request(self, conn: ClientConnection, error: TollwayError) -> None:
        log.info("rejected a request from %s: %s", conn.peer_ip.decode(), error.message)

    def log_exception(self, message: str, error: BaseException, ex: Exchange | None) -> None:
        request_id = ex.request_id.decode("latin-1") if ex is not None and ex.request_id else "-"
        log.error("%s (request %s)", message, request_id, exc_info=error)

    # -- observability (tollway.observability.worker_side) -------------------------------------------------
    def on_collect(self, token: int) -> None:
        """The supervisor is answering a scrape or /status: send this worker's numbers."""
        if self.channel is not None:
            self.channel.send(("collected", token, self.observability.collect(self)))

    def on_tls_ticket_keys(self, keys: bytes) -> None:
        """The node's session-ticket keys (new ones at each rotation): resumption across workers."""
        self._ticket_keys = keys
        if self.tls is not None:
            self.tls.share_ticket_keys(keys)

    def on_reopen_logs(self) -> None:
        """SIGUSR1 reached the supervisor (logrotate): reopen the access log file."""
        self.observability.reopen_logs()

    # -- internals ------------------------------------------------------------------------------------
    def _apply_pool_limits(self, config: GatewayConfig) -> None:
        """Pools outlive snapshots: a changed response-head limit is applied to the existing ones too."""
        limit = config.gateway.limits.max_response_header_size
        if limit == self.pool_settings.max_head_size:
            return
        self.pool_settings = dataclasses.replace(self.pool_settings, max_head_size=limit)
        for pool in self.pools.values():
            pool.settings = self.pool_settings
            pool.max_head_size = limit

    def _close_unused_pools(self, snapshot: Snapshot) -> None:
        used = {id(t.pool) for c in snapshot.clusters for t in c.targets}
        for key, pool in list(self.pools.items()):
            if id(pool) not in used:
                pool.close()
                del self.pools[key]


def main() -> int:
    """Entry point of a worker process started by the supervisor."""
    index_text, channel_fd, *listen_fds = os.environ.pop(ENV_FDS).split(",")
    state_fd = os.environ.pop(STATE_ENV_FD, None)  # tollway.state: the node-shared counter table
    if state_fd is not None:
        set_node_table(SharedTable.attach(int(state_fd)))
    logging.basicConfig(
        level=os.environ.get("TOLLWAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    # The supervisor coordinates shutdown and reloads; a terminal's Ctrl-C reaches the whole process
    # group, so workers leave SIGINT and SIGHUP to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    channel = socket.socket(fileno=int(channel_fd))
    listeners = [socket.socket(fileno=int(fd)) for fd in listen_fds]
    handoff_fd = os.environ.pop(HANDOFF_ENV_FD, None)
    handoff = socket.socket(fileno=int(handoff_fd)) if handoff_fd is not None else None
    kinds = os.environ.pop(ENV_LISTEN_KINDS, "").split(",") if listen_fds else []
    worker = Worker(loop, int(index_text), channel, listeners, handoff, kinds)
    loop.add_signal_handler(signal.SIGTERM, _drain_on_signal, worker)
    loop.add_signal_handler(signal.SIGUSR1, worker.on_reopen_logs)  # logrotate may signal workers too
    try:
        loop.run_until_complete(worker.run())
    finally:
        loop.close()
    return 0


def _attach_pipelines(config: GatewayConfig, routes: list[CompiledRoute]) -> None:
    """The routes' plugin pipelines; the plugins are imported only once a config uses them."""
    from tollway.plugins.build import attach_pipelines

    attach_pipelines(config, routes)


def _settle_memory() -> None:
    freeze_config_objects()
    release_freed_memory()


def _ignore_failure(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("a passed connection could not be served: %s", task.exception())


def _drain_on_signal(worker: Worker) -> None:
    timeout = worker.snapshot.settings.drain_timeout if worker.snapshot is not None else 0.0
    worker.spawn(worker.drain(timeout))


if __name__ == "__main__":
    sys.exit(main())
