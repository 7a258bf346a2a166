"""The admin listener as the supervisor runs it: bound at start beside the status listener, closed at
shutdown, its metrics on /metrics, the audit log trimmed to its retention once an hour.

It runs in the supervisor process, on the store connection the node already holds, so a write through
the API wakes the node's own watcher at once (the other nodes hear of it through the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path
from typing import Any, Protocol

from tollway.admin.app import AdminApp, metrics
from tollway.admin.common import audit_log
from tollway.admin.http import start_server
from tollway.config.admin_settings import AdminSettings
from tollway.config.settings import AccessLog as AccessLogSettings
from tollway.config.types import parse_hostport
from tollway.errors import TollwayError
from tollway.observability.log_sinks import LogWriter
from tollway.store.base import ConfigStore

log = logging.getLogger("tollway.admin")
_TRIM_EVERY = 3600.0


class Host(Protocol):
    def add_collector(self, collector: Any) -> None: ...


class _Collector:
    def __init__(self, app: AdminApp) -> None:
        self.app = app

    def collect(self) -> list[Any]:
        return metrics(self.app)


class _AuditToAccessLog(logging.Handler):
    """The audit lines (logger `tollway.audit`) also go to the access log's sink: stdout, a file or
    syslog, where log shippers already look."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__(logging.INFO)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        self.writer.submit([record.getMessage().encode() + b"\n"])


class AdminServer:
    def __init__(
        self,
        settings: AdminSettings,
        store: ConfigStore,
        base_dir: Path,
        access_log: AccessLogSettings | None = None,
    ) -> None:
        self.settings = settings
        self.access_log = access_log
        self._audit_handler: _AuditToAccessLog | None = None
        self.app = AdminApp(store, settings.auth)
        self.store = store
        self.base_dir = base_dir
        self.address: str | None = None
        self.scheme = "https" if settings.tls is not None else "http"
        self._server: asyncio.Server | None = None
        self._trimmer: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> str:
        """Bind and serve; returns "host:port" (OSError when the address cannot be bound)."""
        address, port = parse_hostport(self.settings.listen)
        self._server = await start_server(
            self.app, address, port, self.settings.max_body, self._tls_context()
        )
        bound = self._server.sockets[0].getsockname()[1]
        self.address = f"[{address}]:{bound}" if ":" in address else f"{address}:{bound}"
        host.add_collector(_Collector(self.app))
        upstreams = getattr(host, "upstreams", None)  # the supervisor's health checks (/upstreams)
        if upstreams is not None:
            self.app.upstream_health = upstreams.status_json
        self._trimmer = asyncio.get_running_loop().create_task(self._trim_periodically())
        if self.access_log is not None and self.access_log.enabled:
            self._audit_handler = _AuditToAccessLog(LogWriter(self.access_log))
            audit_log.addHandler(self._audit_handler)
            audit_log.setLevel(logging.INFO)
        return self.address

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.base_dir / tls.cert, self.base_dir / tls.key)
        return context

    async def _trim_periodically(self) -> None:
        while True:
            try:
                removed = await self.store.trim_audit(time.time() - self.settings.audit_retention)
                if removed:
                    log.info("audit log: %d entries older than the retention removed", removed)
            except TollwayError as exc:  # the store is down: the next round tries again
                log.debug("audit trim skipped: %s", exc)
            await asyncio.sleep(_TRIM_EVERY)

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
        if self._server is not None:
            self._server.close()
        if self._audit_handler is not None:
            audit_log.removeHandler(self._audit_handler)
            self._audit_handler.writer.close()
