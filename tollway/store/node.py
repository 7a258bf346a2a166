"""A node's side of the store: the config source the supervisor boots from and stays in sync with.

The seam with the runtime is small: `start(supervisor)` returns the first config (from the store, or
from the last-known-good file when the store is unreachable), and `run(supervisor)` keeps it current by
calling `supervisor.apply_config(config, reason)`. Everything else — watching, backoff, catching up from
the change log, the last-known-good file, the cluster view, /status and metrics — lives here.

Failure behaviour (docs/config-store.md):
- store unreachable at start: boot from the last-known-good file, say so in the log, /status and the
  `config_store_last_known_good` metric; without that file the node cannot start and says why;
- store lost while running: keep serving what was applied, retry with backoff (0.5 s doubling to 30 s),
  catch up on return (a full version check: notifications sent meanwhile are lost);
- store holds an invalid config (a row edited by hand): keep the running config, report the error
  (log, /status, `config_store_errors_total{kind="invalid"}`) and try again when the version changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tollway import __version__
from tollway.config.loader import validate
from tollway.config.schema import GatewayConfig
from tollway.errors import ConfigError
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.store import lastgood
from tollway.store.base import ConfigStore, NodeInfo
from tollway.store.factory import make_store
from tollway.store.incremental import apply_delta
from tollway.store.model import KINDS, Rows, StoreError, WriteRefused, validate_rows

log = logging.getLogger("tollway.store")
_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0
_HEARTBEAT_INTERVAL = 5.0


class Host(Protocol):
    """What the node source needs from the supervisor."""

    listening: list[str]

    def apply_config(self, config: GatewayConfig, reason: str) -> None: ...
    def add_status_section(self, name: str, section: Any) -> None: ...
    def add_collector(self, collector: Any) -> None: ...


class StoreSource:
    def __init__(
        self, file_config: GatewayConfig, config_path: Path | None, store: ConfigStore | None = None
    ) -> None:
        """`config_path` anchors relative paths (none: the current directory, `tollway run` alone)."""
        settings = file_config.gateway.store
        self.settings = settings
        self.file_config = file_config
        base = config_path.resolve().parent if config_path is not None else Path.cwd()
        self.store = store or make_store(settings, base)
        default_lkg = f"{config_path.resolve()}.last-good.json" if config_path else "tollway.last-good.json"
        self.lkg_path = Path(settings.last_known_good or default_lkg)
        if not self.lkg_path.is_absolute():
            self.lkg_path = base / self.lkg_path
        self.node_id = settings.node_id or ""
        self.started = time.time()
        self.rows: Rows | None = None  # what is applied
        self.entities: GatewayConfig | None = None
        self.source = "store"  # or "last-known-good" while the store has not been reached
        self.connected = False
        self.store_version = 0  # last version seen in the store
        self.last_sync: float | None = None  # monotonic time of the last successful version check
        self.last_error: str | None = None
        self.rejected_version: int | None = None  # a version that failed validation: not retried
        self.errors = {"unreachable": 0, "invalid": 0}
        self.cluster: list[NodeInfo] = []
        self._host: Host | None = None
        self._next_heartbeat = 0.0

    def __repr__(self) -> str:
        applied = self.rows.version if self.rows else None
        state = f"applied={applied} source={self.source} connected={self.connected}"
        return f"<StoreSource {self.store.backend} {state}>"

    @property
    def applied_version(self) -> int:
        return self.rows.version if self.rows is not None else 0

    # -- boot ----------------------------------------------------------------------------------------------
    async def start(self, host: Host) -> GatewayConfig:
        """The first config: the store's, or the last-known-good file's when the store is unreachable.
        Raises StoreError when neither is available."""
        self._host = host
        _refuse_file_entities(self.file_config)
        host.add_status_section("store", self.status)
        host.add_collector(self)
        try:
            await asyncio.wait_for(self.store.open(), self.settings.connect_timeout + 1)
            rows = await self.store.load()
            config = self._validated(rows)
        except (TimeoutError, StoreError) as exc:
            self.errors["unreachable"] += 1
            return self._boot_from_last_good(f"config store unreachable: {exc or 'timed out'}")
        except WriteRefused as exc:
            self.errors["invalid"] += 1
            return self._boot_from_last_good("the store's config is invalid: " + "; ".join(exc.issues))
        self.connected = True
        self._adopt(rows, config)
        await self._save_last_good()
        log.info("config store %s: version %d (%d entities)", self.store.backend, rows.version, rows.count())
        return self.merged()

    def _boot_from_last_good(self, why: str) -> GatewayConfig:
        self.last_error = why
        try:
            saved = lastgood.read(self.lkg_path)
            rows = Rows(saved.store_version)
            config = validate(saved.document, source=str(self.lkg_path), plugins=PLUGIN_CHECK)
        except (ValueError, ConfigError) as exc:
            issues = "; ".join(exc.issues) if isinstance(exc, ConfigError) else str(exc)
            raise StoreError(f"{why}; and {issues}") from None
        self.rows, self.entities, self.source = rows, config, "last-known-good"
        age = time.time() - saved.written_at
        log.warning(
            "%s: serving the last-known-good config (store version %d, saved "
            "%.0f s ago, %s); will catch up when the store is back",
            why,
            saved.store_version,
            age,
            self.lkg_path,
        )
        return self.merged()

    def merged(self, file_config: GatewayConfig | None = None) -> GatewayConfig:
        """The node's gateway settings and certificates (from its file) with the store's entities."""
        assert self.entities is not None
        node = file_config or self.file_config
        # certificates are not store entities: a TLS listener's come from the node's file
        return self.entities.model_copy(update={"gateway": node.gateway, "certificates": node.certificates})

    def with_entities(self, file_config: GatewayConfig) -> GatewayConfig:
        """The supervisor reloaded the file (SIGHUP): its gateway settings, the store's entities."""
        _refuse_file_entities(file_config)
        self.file_config = file_config
        return self.merged(file_config)

    # -- keeping in sync ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Watch the store until cancelled; never raises (a store outage never stops traffic)."""
        backoff = _BACKOFF_START
        while True:
            try:
                if not self.connected:
                    await asyncio.wait_for(self.store.open(), self.settings.connect_timeout + 1)
                    self.connected = True
                    log.info("config store %s reachable again: catching up", self.store.backend)
                await self.sync()
                await self._heartbeat_if_due()
                backoff = _BACKOFF_START
                await self.store.wait_for_change(self.settings.poll_interval)
            except asyncio.CancelledError:
                await self.store.close()
                raise
            except Exception as exc:  # unreachable, or anything unforeseen: never stop watching
                if not isinstance(exc, TimeoutError | StoreError):
                    log.exception("config store %s: unexpected error", self.store.backend)
                self._lost(str(exc) or type(exc).__name__)
                await self.store.close()
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # jitter: nodes do not retry in step
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _lost(self, why: str) -> None:
        self.errors["unreachable"] += 1
        if self.connected or self.last_error != why:
            log.error(
                "config store %s unreachable: %s; still serving version %d",
                self.store.backend,
                why,
                self.applied_version,
            )
        self.connected = False
        self.last_error = why

    async def sync(self) -> bool:
        """Check the version; apply what changed. Returns whether a new config was applied."""
        in_step = self.rows is not None and self.entities is not None and self.source == "store"
        if in_step:
            # One round trip: the change log since the applied version carries the current version.
            assert self.rows is not None
            version, changes = await self.store.changes_since(self.rows.version)
            in_step = changes is not None  # None: the change log no longer reaches back: load all
        else:
            version, changes = await self.store.version(), None
        self.store_version = version
        self.last_sync = time.monotonic()
        if (in_step and version == self.applied_version) or version == self.rejected_version:
            return False
        try:
            if in_step and version > self.applied_version:
                # Catch up from the change log: only the changed entities travel and are validated.
                assert self.rows is not None and self.entities is not None and changes is not None
                rows = self.rows.apply_changes(version, changes)
                reason = f"store version {version}: " + _describe_changes(changes)
                config = apply_delta(self.entities, self.rows, rows, changes)
            else:
                rows = await self.store.load()
                reason = f"store version {rows.version}"
                config = self._validated(rows)
        except WriteRefused as exc:
            self.rejected_version = rows.version
            self.errors["invalid"] += 1
            self.last_error = f"store version {rows.version} is invalid: " + "; ".join(exc.issues)
            log.error(
                "config store version %d is invalid; still serving version %d:\n  %s",
                rows.version,
                self.applied_version,
                "\n  ".join(exc.issues),
            )
            return False
        self._adopt(rows, config)
        assert self._host is not None
        self._host.apply_config(self.merged(), reason)
        await self._save_last_good()
        self._next_heartbeat = 0.0  # report the new version at once
        return True

    def _validated(self, rows: Rows) -> GatewayConfig:
        return validate_rows(rows, source=f"store version {rows.version}")

    def _adopt(self, rows: Rows, config: GatewayConfig) -> None:
        self.rows, self.entities = rows, config
        self.source, self.rejected_version, self.last_error = "store", None, None
        self.store_version = max(self.store_version, rows.version)
        self.last_sync = time.monotonic()

    async def _save_last_good(self) -> None:
        """After the workers have the config: the file write (and its fsync) runs in a thread."""
        assert self.rows is not None
        try:
            await asyncio.to_thread(lastgood.write, self.lkg_path, self.rows.version, self.rows.document())
        except OSError as exc:
            log.error("cannot write the last-known-good file %s: %s", self.lkg_path, exc)

    async def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + _HEARTBEAT_INTERVAL
        await self.store.heartbeat(self.node_info())
        self.cluster = await self.store.nodes()

    def node_info(self) -> NodeInfo:
        listening = self._host.listening if self._host is not None else []
        if not self.node_id and listening:  # known once the listeners are bound
            self.node_id = f"{socket.gethostname()}:{listening[0].rsplit(':', 1)[-1]}"
        return NodeInfo(
            self.node_id or socket.gethostname(),
            ", ".join(listening),
            __version__,
            self.applied_version,
            self.source,
            self.last_error,
            self.started,
        )

    # -- reporting ---------------------------------------------------------------------------------------
    def seconds_since_sync(self) -> float | None:
        return None if self.last_sync is None else time.monotonic() - self.last_sync

    def status(self) -> dict[str, Any]:
        """The "store" section of /status."""
        since = self.seconds_since_sync()
        now = time.time()
        return {
            "backend": self.store.backend,
            "node_id": self.node_info().node_id,
            "connected": self.connected,
            "source": self.source,
            "applied_version": self.applied_version,
            "store_version": self.store_version,
            "seconds_since_sync": None if since is None else round(since, 3),
            "last_error": self.last_error,
            "last_known_good": str(self.lkg_path),
            "nodes": [
                {
                    "node_id": n.node_id,
                    "address": n.address,
                    "version": n.software_version,
                    "config_version": n.config_version,
                    "behind": n.config_version < self.store_version,
                    "source": n.source,
                    "error": n.error,
                    "seconds_since_heartbeat": round(max(0.0, now - n.last_seen), 3),
                }
                for n in self.cluster
            ],
        }

    def collect(self) -> list[Any]:
        """Prometheus collector: the node's sync state (tollway_config_* and tollway_config_store_*)."""
        applied = GaugeMetricFamily("tollway_config_version_applied", "config store version this node serves")
        applied.add_metric([], self.applied_version)
        seen = GaugeMetricFamily("tollway_config_store_version", "latest config version seen in the store")
        seen.add_metric([], self.store_version)
        since = GaugeMetricFamily(
            "tollway_config_store_seconds_since_sync", "seconds since the store last answered a version check"
        )
        seconds = self.seconds_since_sync()
        since.add_metric([], float("inf") if seconds is None else seconds)
        up = GaugeMetricFamily("tollway_config_store_up", "1 while the config store is reachable")
        up.add_metric([], 1 if self.connected else 0)
        lkg = GaugeMetricFamily(
            "tollway_config_store_last_known_good",
            "1 while serving the last-known-good file (store not reached)",
        )
        lkg.add_metric([], 1 if self.source == "last-known-good" else 0)
        errors = CounterMetricFamily(
            "tollway_config_store_errors", "store unreachable, or holding an invalid config", labels=["kind"]
        )
        for kind, count in self.errors.items():
            errors.add_metric([kind], count)
        return [applied, seen, since, up, lkg, errors]


def _refuse_file_entities(config: GatewayConfig) -> None:
    present = [kind for kind in KINDS if getattr(config, kind)]
    if present:
        raise StoreError(
            f"gateway.store.backend is {config.gateway.store.backend!r}, so {', '.join(present)} live in the "
            "store, not in this file: move them there with `tollway config apply FILE`, then remove them here"
        )


def _describe_changes(changes: list[Any]) -> str:
    shown = [f"{c.action} {c.kind[:-1]} {c.key!r}" for c in changes[:3]]
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return ", ".join(shown) + more if shown else "no entity changed"
