"""Active health checks, run by the supervisor: once per node, whatever the number of workers.

Each checked target gets a probe loop: an HTTP GET (path, Host header, expected statuses) or a TCP
connect, bounded by `timeout`, every `interval` — or every `unhealthy_interval` while it is unhealthy, so
a dead target can be noticed back sooner without probing healthy ones more. `unhealthy_threshold`
failures in a row make a target unhealthy, `healthy_threshold` passes make it healthy again. Verdicts go
to every worker over the channel (tollway.upstream.supervisor_manager) and into the status JSON.

The verdict logic (`CheckState`) is plain methods with no I/O, so tests drive it with made-up results.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollway.protocol.client import HttpClientError, request

if TYPE_CHECKING:
    from tollway.config.schema import ActiveHealthcheck

_PROBE_HEADERS = ((b"User-Agent", b"tollway-healthcheck"), (b"Accept", b"*/*"))
Tls = tuple[ssl.SSLContext | None, str | None]  # (context, SNI name) for https upstreams


@dataclass
class CheckResult:
    ok: bool
    status: int | None = None  # the HTTP status, for HTTP probes that got one
    error: str | None = None  # why it failed, when it did
    duration: float = 0.0  # seconds
    time: float = field(default_factory=time.time)  # wall clock, for the status JSON

    def describe(self) -> str:
        if self.error:
            return self.error
        return f"status {self.status}" if self.status is not None else "connected"

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": self.status,
            "error": self.error,
            "duration_ms": round(self.duration * 1000, 3),
            "time": round(self.time, 3),
        }


@dataclass
class CheckState:
    """Consecutive results of one target's probes and the verdict they add up to."""

    healthy: bool = True  # a target is presumed healthy until probes say otherwise
    successes: int = 0
    failures: int = 0
    last: CheckResult | None = None
    probes: int = 0

    def record(self, result: CheckResult, healthy_threshold: int, unhealthy_threshold: int) -> bool | None:
        """Count a probe result; returns the new verdict when it changes, else None."""
        self.last = result
        self.probes += 1
        if result.ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= healthy_threshold:
                self.healthy = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= unhealthy_threshold:
                self.healthy = False
                return False
        return None

    def next_interval(self, settings: ActiveHealthcheck, ejected: bool = False) -> float:
        """An unhealthy (or passively ejected) target is probed at `unhealthy_interval`, if set."""
        if (ejected or not self.healthy) and settings.unhealthy_interval is not None:
            return settings.unhealthy_interval
        return settings.interval


async def probe(
    host: str, port: int, settings: ActiveHealthcheck, default_host: str, tls: Tls = (None, None)
) -> CheckResult:
    """One probe of host:port (over TLS for https upstreams); never raises, never outlives
    `settings.timeout`."""
    start = time.perf_counter()
    try:
        status = await _probe(host, port, settings, default_host, tls)
    except HttpClientError as exc:
        return CheckResult(False, None, str(exc), time.perf_counter() - start)
    duration = time.perf_counter() - start
    if status is None:
        return CheckResult(True, None, None, duration)
    if status in settings.expected_statuses:
        return CheckResult(True, status, None, duration)
    return CheckResult(False, status, f"unexpected status {status}", duration)


async def _probe(
    host: str, port: int, settings: ActiveHealthcheck, default_host: str, tls: Tls
) -> int | None:
    """The HTTP status of a GET (tollway.protocol.client: the head is read, the body is not), or None
    for a TCP probe that connected (and, for https upstreams, completed its TLS handshake)."""
    context, name = tls
    if settings.type == "tcp":
        await _connect(host, port, settings.timeout, tls)
        return None
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    response = await request(
        f"{'https' if context is not None else 'http'}://{authority}{settings.http_path}",
        host=(settings.host or default_host).encode("idna"),
        headers=_PROBE_HEADERS,
        timeout=settings.timeout,
        read_body=False,
        ssl_context=context,
        server_hostname=name,
    )
    return response.status


async def _connect(host: str, port: int, timeout: float, tls: Tls) -> None:
    context, name = tls
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=name)
    except TimeoutError:
        raise HttpClientError(f"timed out after {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise HttpClientError(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
    writer.transport.abort()  # connected is all a TCP probe asks
