"""Active health checks, run by the supervisor: once per node, whatever the number of workers.

Each checked target gets a probe loop: an HTTP GET (path, Host header, expected statuses) or a TCP
connect, bounded by `timeout`, every `interval` — or every `unhealthy_interval` while it is unhealthy, so
a dead target can be noticed back sooner without probing healthy ones more. `unhealthy_threshold`
failures in a row make a target unhealthy, `healthy_threshold` passes make it healthy again. Verdicts go
to every worker over the channel (tollway.upstream.manager) and into the status JSON.

The verdict logic (`CheckState`) is plain methods with no I/O, so tests drive it with made-up results.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

Tls = tuple[ssl.SSLContext | None, str | None]  # (context, SNI name) for https upstreams

if TYPE_CHECKING:
    from tollway.config.schema import ActiveHealthcheck

_USER_AGENT = b"tollway-healthcheck"
_MAX_STATUS_LINE = 4096


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
        async with asyncio.timeout(settings.timeout):
            status = await _probe(host, port, settings, default_host, tls)
    except TimeoutError:
        return CheckResult(False, None, f"timed out after {settings.timeout:g}s", time.perf_counter() - start)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return CheckResult(False, None, reason, time.perf_counter() - start)
    except ValueError as exc:
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
    context, name = tls
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=name)
    try:
        if settings.type == "tcp":
            return None
        host_header = (settings.host or default_host).encode("idna")
        writer.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            % (settings.http_path.encode("latin-1"), host_header, _USER_AGENT)
        )
        line = await reader.readuntil(b"\n")
        return parse_status_line(line[:_MAX_STATUS_LINE])
    except asyncio.IncompleteReadError:
        raise ValueError("connection closed before a response") from None
    except asyncio.LimitOverrunError:
        raise ValueError("invalid response") from None
    finally:
        writer.transport.abort()  # nothing more to read; a close handshake would only wait


def parse_status_line(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ValueError("invalid response")
    return int(parts[1])
