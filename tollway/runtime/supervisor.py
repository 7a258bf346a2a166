"""The supervisor: owns the config, the listening sockets and the worker processes; never touches
request bytes.

- It creates one SO_REUSEPORT listening socket per worker and listen address and keeps its own copy
  open (the kernel spreads new connections over the sockets; a restarted worker takes its socket
  back). While a worker restarts, connections arriving on its socket are passed to the live workers
  (tollway.runtime.handoff) instead of waiting for the replacement.
- It validates config files, sends whole snapshots to workers, and reloads on SIGHUP or when the file
  changes, once two reads of the file agree (an in-place write is not read half-way). A bad file, an
  empty one, or one without routes (unless `gateway.allow_empty_routes`) keeps the running config and
  logs exactly why.
- It restarts a worker that dies (backing off if one keeps dying), and on SIGTERM drains: /ready turns
  503, listeners close after `drain_delay`, in-flight requests get `drain_timeout` to finish.
- It serves the status listener (/live, /ready, /status, /metrics): metrics are collected from every
  worker over its channel and merged (tollway.observability.supervisor_side).
- SIGUSR1 (logrotate) is relayed to the workers, which reopen their access log files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tollway import __version__
from tollway.config.schema import GatewayConfig
from tollway.config.tls import tls_warnings
from tollway.config.types import parse_hostport, parse_listen
from tollway.errors import ConfigError, TollwayError
from tollway.observability.supervisor_side import CONTENT_TYPE, MetricsHub
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.protocol.tickets import KEY_BYTES as TICKET_KEY_BYTES
from tollway.runtime import config_delta
from tollway.runtime.channel import ChannelProtocol, Message, open_channel
from tollway.runtime.config_file import hold_for_reload, load_for_reload, read_stable, stat
from tollway.runtime.config_hold import HeldConfig, release_freed_memory
from tollway.runtime.handoff import ENV_FD as HANDOFF_ENV_FD
from tollway.runtime.handoff import Orphans
from tollway.runtime.processes import kill, listen_socket, reap
from tollway.runtime.supervisor_status import start_status_server, status_document
from tollway.runtime.worker import ENV_FDS, ENV_LISTEN_KINDS
from tollway.state.shared import ENV_FD as STATE_ENV_FD
from tollway.state.shared import SharedTable, create_for_workers
from tollway.upstream.supervisor_manager import UpstreamManager

log = logging.getLogger("tollway.supervisor")
_RESTART_BACKOFF_MAX = 5.0
_STARTUP_TIMEOUT = 60.0
_COLLECT_INTERVAL = 15.0  # background collects bound what a crashed worker's counters can lose


@dataclass
class WorkerHandle:
    slot: int
    process: subprocess.Popen[bytes]
    channel: ChannelProtocol | None = None
    started: float = field(default_factory=time.monotonic)
    ready_version: int = 0
    restarts: int = 0
    handoff: socket.socket | None = None  # passes it connections accepted for a restarting worker


class Supervisor:
    def __init__(
        self,
        config_path: str | Path | None,
        config: GatewayConfig | HeldConfig,
        workers: int | None = None,
        listen: list[str] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        source: Any = None,
        admin: Any = None,
    ) -> None:
        self.config_path = Path(config_path) if config_path is not None else None
        self.overrides = {"listen": listen} if listen else {}
        self.source = source  # a config store (tollway.store.node.StoreSource): entities come from it
        if isinstance(config, HeldConfig) and (
            self.overrides or (config.wire is None) != (source is not None)
        ):
            config = config.whole()  # --listen, or a store: held again below
        if isinstance(config, HeldConfig):
            self.held, self.config = config, config.config
        else:
            self._hold(self._with_overrides(config))
        self.version = 1
        self.nworkers = workers or _default_workers(self.config)
        self.sockets: list[list[socket.socket]] = []
        self.listening: list[str] = []
        self.listen_kinds: list[str] = []  # per listen address: "" (clear), "tls" or "mtls"
        self._ticket_keys: bytes | None = None  # session-ticket keys shared by the workers (docs/tls.md)
        self.status_address: str | None = None
        self.workers: dict[int, WorkerHandle] = {}
        self.draining = False
        self.started = time.time()
        self.last_reload: dict[str, Any] = {"time": self.started, "result": "initial", "version": 1}
        self.on_event = on_event or (lambda kind, data: None)
        self._stopping = False
        self._done: asyncio.Event | None = None
        self._status_server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget tasks, referenced until done
        # The file as it was when the running config was read: the watcher reloads when it differs.
        self._watch_stat = stat(self.config_path) if self.config_path is not None else None
        self._failed_restarts: dict[int, int] = {}
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again: str | None = None  # a reload asked for while one was reading the file
        self.orphans: Orphans | None = None  # accepts for restarting workers (set when running)
        # upstreams: DNS, active health checks, shared ejections, /upstreams
        # (tollway.upstream.supervisor_manager)
        self.upstreams = UpstreamManager(self._broadcast, self._live_channels)
        # Node-shared rate-limit counters (tollway.state.shared): one table for every worker, kept
        # by the supervisor so counts survive a worker restart.
        self.state_table: SharedTable | None = None
        # Observability: merged worker metrics, and hooks for other features (docs/monitoring.md).
        self.metrics = MetricsHub(self)
        self.status_sections: dict[str, Callable[[], Any]] = {}
        # The admin API listener (tollway.admin.server.AdminServer), started beside the status listener.
        self.admin = admin
        self.admin_address: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def run(self) -> int:
        """Start everything, serve until drained; returns the process exit code."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        if self.source is not None and not await self._start_source():
            return 1
        try:
            self._bind_all()
        except OSError as exc:
            addresses = ", ".join(self.config.gateway.listen)
            log.error("cannot listen on %s: %s", addresses, exc.strerror or exc)
            self.on_event("error", {"message": f"cannot listen on {addresses}: {exc.strerror or exc}"})
            return 1
        await self._start_status_listener()
        if self.admin is not None and not await self._start_admin():
            return 1
        self.orphans = Orphans(loop, self._handoff_receivers)
        _log_warnings(self.config)
        if any(self.listen_kinds):
            self._ticket_keys = os.urandom(TICKET_KEY_BYTES)
        await self.upstreams.start(self.config)
        self.state_table = create_for_workers()
        for slot in range(self.nworkers):
            await self._spawn(slot)
        if not await self._wait_ready():
            await self.shutdown(fast=True)
            return 1
        for sig, handler in (
            (signal.SIGTERM, self._on_stop_signal),
            (signal.SIGINT, self._on_stop_signal),
            (signal.SIGHUP, lambda: self.request_reload("SIGHUP")),
            (signal.SIGUSR1, self.reopen_logs),
        ):
            loop.add_signal_handler(sig, handler)
        self.on_event("started", self.describe())
        watcher = loop.create_task(self._watch_file())
        collector = loop.create_task(self._collect_periodically())
        syncer = loop.create_task(self.source.run()) if self.source is not None else None
        rotator = loop.create_task(self._rotate_ticket_keys())
        await self._done.wait()
        for task in (watcher, collector, syncer, rotator):
            if task is not None:
                task.cancel()
        return 0

    async def _start_source(self) -> bool:
        """The first config from the store (or its last-known-good file); False if neither answers."""
        try:
            self._hold(self._with_overrides(await self.source.start(self)))
        except TollwayError as exc:
            log.error("%s", exc)
            self.on_event("error", {"message": str(exc)})
            return False
        return True

    async def _start_admin(self) -> bool:
        try:
            self.admin_address = await self.admin.start(self)
        except OSError as exc:
            message = f"cannot serve the admin API on {self.admin.settings.listen}: {exc.strerror or exc}"
            log.error("%s", message)
            self.on_event("error", {"message": message})
            self._close_sockets()
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "listen": self.listening,
            "schemes": ["https" if kind else "http" for kind in self.listen_kinds],
            "status_listen": self.status_address,
            "admin_listen": f"{self.admin.scheme}://{self.admin_address}" if self.admin_address else None,
            "workers": self.nworkers,
            "config_version": self.version,
            "config_path": str(self.config_path) if self.config_path else None,
            "routes": self.held.routes,
            "services": self.held.services,
        }

    async def shutdown(self, fast: bool = False) -> None:
        if self._stopping and not fast:
            return
        self._stopping = True
        self.draining = True
        gateway = self.config.gateway
        self.on_event("draining", {"timeout": gateway.drain_timeout})
        if not fast and gateway.drain_delay:
            await asyncio.sleep(gateway.drain_delay)  # /ready says 503 while the balancer notices
        if self.orphans is not None:
            self.orphans.close()
        self._close_sockets()
        timeout = 0.0 if fast else gateway.drain_timeout
        for handle in self.workers.values():
            if handle.channel is not None:
                handle.channel.send(("drain", timeout))
        await self._wait_workers_exit(timeout + 5.0)
        await self.upstreams.stop()
        if self._status_server is not None:
            self._status_server.close()
        if self.admin is not None:
            await self.admin.close()
        if self._done is not None:
            self._done.set()

    def _on_stop_signal(self) -> None:
        if self._stopping:
            log.warning("second stop signal: stopping now")
            for handle in self.workers.values():
                kill(handle.process)
            if self._done is not None:
                self._done.set()
            return
        self._in_background(self.shutdown())

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- config ---------------------------------------------------------------------------------------
    def request_reload(self, reason: str) -> None:
        """Reload once the file is stable (SIGHUP, file watcher); reloads asked for meanwhile make one
        more pass after the current one, never two readers at once."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = reason
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_when_stable(reason))

    async def _reload_when_stable(self, reason: str | None) -> None:
        assert self.config_path is not None
        while reason is not None and not self._stopping:
            try:
                data, self._watch_stat = await read_stable(self.config_path)  # later changes: next poll
            except ConfigError as exc:  # still changing after a few seconds
                self._reload_failed(reason, exc)
            else:
                self.reload(reason, data)
            reason, self._reload_again = self._reload_again, None

    def reload(self, reason: str, data: bytes | None = None) -> bool:
        """Apply the config file (`data`: its bytes, as read once stable); keep the running config if
        the file is invalid, empty, or has no routes without `gateway.allow_empty_routes`."""
        if self.config_path is None or self._stopping:
            return False
        if data is None:
            self._watch_stat = stat(self.config_path)  # before reading: a later change is seen next poll
        try:
            if self.source is not None:
                entities = self.source.with_entities
                config: GatewayConfig | HeldConfig = self._with_overrides(
                    load_for_reload(self.config_path, data, PLUGIN_CHECK, entities)
                )
            else:  # parsed, checked and held in a forked child (config_hold: memory)
                config = hold_for_reload(self.config_path, data, PLUGIN_CHECK, self._held_file_config)
        except TollwayError as exc:
            self._reload_failed(reason, exc)
            return False
        self.apply_config(config, reason)
        return True

    def apply_config(self, config: GatewayConfig | HeldConfig, reason: str) -> None:
        """Send a validated config to every worker (a file reload, or a config store change)."""
        held = config if isinstance(config, HeldConfig) else HeldConfig.hold(config, self.source is not None)
        self._warn_restart_only(held.config)
        _log_warnings(held.config)
        previous = self.config
        self.held, self.config = held, held.config
        self.upstreams.apply(self.config)
        self.version += 1
        self.last_reload = {"time": time.time(), "result": "ok", "version": self.version}
        self.metrics.registry.count("config_reloads_total", result="ok")
        delta = config_delta.encode(previous, self.config) if held.wire is None else None
        message = self.held.message(self.version) if delta is None else ("config_delta", self.version, delta)
        for handle in self.workers.values():
            if handle.channel is not None:
                handle.channel.send(message)
        release_freed_memory()
        log.info("config version %d applied (%s)", self.version, reason)
        self.on_event("reloaded", {"reason": reason, "version": self.version})

    def _reload_failed(self, reason: str, exc: TollwayError) -> None:
        """The running config stays; the failure is logged, counted and shown on /status."""
        issues = exc.issues if isinstance(exc, ConfigError) else [str(exc)]
        self.last_reload = {
            "time": time.time(),
            "result": "failed",
            "version": self.version,
            "reason": reason,
            "errors": issues[:20],  # on /status beside the result, as the log has them
        }
        self.metrics.registry.count("config_reloads_total", result="failed")
        log.error(
            "config reload (%s) failed; still serving version %d:\n  %s",
            reason,
            self.version,
            "\n  ".join(issues),
        )
        self.on_event("reload_failed", {"reason": reason, "issues": issues})

    def _hold(self, config: GatewayConfig) -> None:
        """Keep the config (routes and consumers only pickled, without a store: config_hold)."""
        self.held = HeldConfig.hold(config, whole=self.source is not None)
        self.config = self.held.config

    def _held_file_config(self, config: GatewayConfig) -> HeldConfig:
        return HeldConfig.hold(self._with_overrides(config), whole=False)

    def _with_overrides(self, config: GatewayConfig) -> GatewayConfig:
        if not self.overrides:
            return config
        gateway = config.gateway.model_copy(update=self.overrides)
        return config.model_copy(update={"gateway": gateway})

    def _warn_restart_only(self, new: GatewayConfig) -> None:
        old = self.config.gateway
        for name in ("listen", "status_listen", "workers", "backlog"):
            if getattr(new.gateway, name) != getattr(old, name):
                log.warning("gateway.%s changed: it applies at the next restart only", name)
        for name in ("latency_buckets", "gateway_latency_buckets"):
            if getattr(new.gateway.metrics, name) != getattr(old.metrics, name):
                log.warning("gateway.metrics.%s changed: it applies at the next restart only", name)

    async def _rotate_ticket_keys(self) -> None:
        while self._ticket_keys is not None:
            await asyncio.sleep(self.config.gateway.tls.ticket_key_rotation)
            self._ticket_keys = os.urandom(TICKET_KEY_BYTES)
            self._broadcast(("tls_ticket_keys", self._ticket_keys))

    async def _watch_file(self) -> None:
        if self.config_path is None:
            return
        interval = self.config.gateway.watch_interval
        if not interval:
            return
        while True:
            await asyncio.sleep(interval)
            current = stat(self.config_path)
            if current is None or current == self._watch_stat:
                continue
            if self._reload_task is not None and not self._reload_task.done():
                continue  # a reload is reading the file now
            self.request_reload("file changed")

    # -- workers ----------------------------------------------------------------------------------------
    def _bind_all(self) -> None:
        """One socket per worker and address. Port 0 picks a free port once; the other workers'
        sockets join the same port."""
        gateway = self.config.gateway
        self.sockets = [[] for _ in range(self.nworkers)]
        bound = []
        self.listen_kinds = []
        for address in gateway.listen:
            host, port, flags = parse_listen(address)
            self.listen_kinds.append("mtls" if "mtls" in flags else "tls" if "tls" in flags else "")
            for slot in range(self.nworkers):
                sock = listen_socket(host, port, gateway.backlog)
                port = sock.getsockname()[1]
                self.sockets[slot].append(sock)
            bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.listening = bound

    def _close_sockets(self) -> None:
        for socks in self.sockets:
            for sock in socks:
                sock.close()
        self.sockets = []

    async def _spawn(self, slot: int) -> None:
        parent, child = socket.socketpair()
        handoff, handoff_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handoff.setblocking(False)
        fds = [child.fileno(), *(s.fileno() for s in self.sockets[slot])]
        env = dict(os.environ)
        env[ENV_FDS] = ",".join(str(x) for x in (slot, *fds))
        env[HANDOFF_ENV_FD] = str(handoff_child.fileno())
        env[ENV_LISTEN_KINDS] = ",".join(self.listen_kinds)
        pass_fds = [*fds, handoff_child.fileno()]
        if self.state_table is not None:  # tollway.state: the node-shared table, by fd
            env[STATE_ENV_FD] = str(self.state_table.fileno())
            pass_fds.append(self.state_table.fileno())
        process = subprocess.Popen(
            [sys.executable, "-m", "tollway.runtime.worker"], pass_fds=pass_fds, env=env, close_fds=True
        )
        child.close()
        handoff_child.close()
        handle = WorkerHandle(slot, process, restarts=self._failed_restarts.get(slot, 0), handoff=handoff)
        self.workers[slot] = handle
        handle.channel = await open_channel(
            parent,
            lambda message: self._on_worker_message(handle, message),
            lambda: self._in_background(self._on_worker_gone(handle)),
        )
        handle.channel.send(self.upstreams.state_message())
        handle.channel.send(self.held.message(self.version))
        if self._ticket_keys is not None:  # TLS listeners: one set of session-ticket keys per node
            handle.channel.send(("tls_ticket_keys", self._ticket_keys))
        log.debug("worker %d started (pid %d)", slot, process.pid)

    def _on_worker_message(self, handle: WorkerHandle, message: Message) -> None:
        kind = message[0]
        if kind == "ready":
            handle.ready_version = message[1]
            if self.orphans is not None:
                self.orphans.release(handle.slot)  # it accepts on its own socket now
        elif kind == "config_failed":
            log.error("worker %d could not apply config version %d: %s", handle.slot, message[1], message[2])
        elif kind.startswith("upstream_"):
            self.upstreams.on_worker_message(handle.slot, message)
        else:
            handler = getattr(self, f"on_worker_{kind}", None)
            if handler is not None:
                handler(handle, *message[1:])

    async def _on_worker_gone(self, handle: WorkerHandle) -> None:
        if handle.handoff is not None:
            handle.handoff.close()
            handle.handoff = None
        current = self.workers.get(handle.slot) is handle
        if current and not self._stopping and self.sockets and self.orphans is not None and self.nworkers > 1:
            # Connections the kernel hashes to its socket go to the live workers until the new one is up.
            self.orphans.watch(handle.slot, self.sockets[handle.slot])
        self.metrics.worker_gone(handle.process.pid)  # its counters carry on in the merged totals
        code = await reap(handle.process)
        if self.workers.get(handle.slot) is not handle:
            return
        handle.channel = None
        if self._stopping:
            return
        lived = time.monotonic() - handle.started
        log.error("worker %d (pid %d) exited with %s; restarting", handle.slot, handle.process.pid, code)
        self.metrics.registry.count("worker_restarts_total", worker=str(handle.slot))
        self.on_event("worker_exited", {"slot": handle.slot, "pid": handle.process.pid, "code": code})
        # Back off when a worker keeps dying young, so a crash loop does not spin the CPU.
        restarts = handle.restarts + 1 if lived < 10 else 0
        self._failed_restarts[handle.slot] = restarts
        if restarts:
            await asyncio.sleep(min(_RESTART_BACKOFF_MAX, 0.1 * 2**restarts))
        if not self._stopping:
            await self._spawn(handle.slot)

    async def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if all(h.ready_version for h in self.workers.values()):
                return True
            dead = [h for h in self.workers.values() if h.process.poll() is not None]
            if dead:
                message = f"worker {dead[0].slot} exited during startup (code {dead[0].process.returncode})"
                log.error(message)
                self.on_event("error", {"message": message})
                return False
            await asyncio.sleep(0.02)
        self.on_event("error", {"message": "workers did not become ready in time"})
        return False

    async def _wait_workers_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for handle in list(self.workers.values()):
            while handle.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if handle.process.poll() is None:
                log.warning("worker %d did not stop in time; killing it", handle.slot)
                kill(handle.process)
                await reap(handle.process)

    def ready(self) -> bool:
        return (
            not self.draining
            and bool(self.workers)
            and all(h.ready_version == self.version and h.channel is not None for h in self.workers.values())
        )

    # -- status listener ----------------------------------------------------------------------------------
    async def _start_status_listener(self) -> None:
        address = self.config.gateway.status_listen
        if address is None:
            return
        host, port = parse_hostport(address)
        self._status_server = await start_status_server(host, port, self.status_routes())
        bound_port = self._status_server.sockets[0].getsockname()[1]
        self.status_address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"

    def status_routes(self) -> dict[str, Any]:
        return {
            "/live": lambda: (200, {"status": "live"}),
            "/ready": lambda: (200, {"status": "ready"}) if self.ready() else (503, self._not_ready()),
            "/status": self._status_page,
            "/upstreams": self._upstreams_status,
            "/metrics": self._metrics_page,
        }

    async def _upstreams_status(self) -> tuple[int, dict[str, Any]]:
        return 200, await self.upstreams.status_json()

    def _broadcast(self, message: Message, skip_slot: int | None = None) -> None:
        for handle in self.workers.values():
            if handle.channel is not None and handle.slot != skip_slot:
                handle.channel.send(message)

    def _handoff_receivers(self) -> list[socket.socket]:
        return [
            h.handoff
            for h in self.workers.values()
            if h.handoff is not None and h.channel is not None and h.ready_version
        ]

    def _live_channels(self) -> list[ChannelProtocol]:
        return [h.channel for h in self.workers.values() if h.channel is not None]

    def _not_ready(self) -> dict[str, Any]:
        return {"status": "draining" if self.draining else "starting", "config_version": self.version}

    def status(self) -> dict[str, Any]:
        """The /status document (tollway.runtime.supervisor_status)."""
        return status_document(self)

    async def _status_page(self) -> tuple[int, dict[str, Any]]:
        await self.metrics.collect(self.config.gateway.metrics.collect_timeout)
        return 200, self.status()

    async def _metrics_page(self) -> tuple[Any, ...]:
        if not self.config.gateway.metrics.enabled:
            return 404, {"message": "metrics are disabled (gateway.metrics.enabled)"}
        await self.metrics.collect(self.config.gateway.metrics.collect_timeout)
        return 200, self.metrics.render(), CONTENT_TYPE

    # -- observability hooks (docs/monitoring.md) ----------------------------------------------------------
    def add_collector(self, collector: Any) -> None:
        """Expose more metrics on /metrics: any prometheus_client collector (an object whose
        `collect()` yields metric families), called at each scrape in the supervisor."""
        self.metrics.extra_collectors.append(collector)

    def add_status_section(self, name: str, section: Callable[[], Any]) -> None:
        """Add a key to /status (e.g. "upstreams": a health summary); `section()` returns JSON-able data."""
        self.status_sections[name] = section

    def reopen_logs(self) -> None:
        """SIGUSR1: every worker reopens its access log file (after logrotate renamed it)."""
        log.info("SIGUSR1: reopening access logs")
        for handle in self.workers.values():
            if handle.channel is not None:
                handle.channel.send(("reopen_logs",))

    def on_worker_config_needed(self, handle: WorkerHandle) -> None:
        """A worker got a config delta against a version it does not hold: send the whole config."""
        if handle.channel is not None:
            handle.channel.send(self.held.message(self.version))

    def on_worker_collected(self, handle: WorkerHandle, token: int, data: dict[str, Any]) -> None:
        self.metrics.received(handle.slot, handle.process.pid, token, data)

    async def _collect_periodically(self) -> None:
        while True:
            await asyncio.sleep(_COLLECT_INTERVAL)
            if self.config.gateway.metrics.enabled:
                await self.metrics.collect(self.config.gateway.metrics.collect_timeout)


def _log_warnings(config: GatewayConfig) -> None:
    for warning in tls_warnings(config):  # expiring certificates, unverified backends (docs/tls.md)
        log.warning("%s", warning)


def _default_workers(config: GatewayConfig) -> int:
    workers = config.gateway.workers
    return os.cpu_count() or 1 if workers == "auto" else int(workers)
