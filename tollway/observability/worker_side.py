"""A worker's observability: the access log, the tracer and the metrics it reports when collected.

The worker (tollway.runtime.worker) owns one `WorkerObservability`: `apply` follows each config,
`recorder.finished` runs per request, `collect` answers the supervisor's ("collect", token), and
`reopen_logs` answers ("reopen_logs",) — the supervisor's relay of SIGUSR1.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping, Sized
from typing import TYPE_CHECKING, Any, Protocol

from tollway.counters.metrics import REGISTRY, Counter, Registry
from tollway.observability.access_log import AccessLog
from tollway.observability.recorder import Recorder

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig, Tracing
    from tollway.errors import UpstreamError
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.snapshot import Snapshot
    from tollway.upstream.pool import Pool
    from tollway.upstream.worker_registry import UpstreamRegistry

log = logging.getLogger("tollway.worker")

# Upstream error classes (tollway.errors) -> the `error` label of tollway_upstream_errors_total.
_ERROR_LABELS = {
    "UpstreamConnectError": "connect",
    "UpstreamTlsError": "tls",
    "UpstreamTimeout": "timeout",
    "UpstreamResetError": "reset",
    "UpstreamProtocolError": "protocol",
    "NoHealthyTarget": "no_target",
    "CircuitBreakerOpen": "circuit_open",
}
_BREAKER = "upstream_circuit_breaker_rejections_total"


class Collected(Protocol):
    """What `collect` reads of the worker (tollway.runtime.worker hands itself in): observability sits
    below the runtime and knows it only through this shape."""

    @property
    def connections(self) -> Sized: ...
    @property
    def connections_accepted(self) -> int: ...
    @property
    def pools(self) -> Mapping[Any, Pool]: ...
    @property
    def snapshot(self) -> Snapshot | None: ...
    @property
    def upstreams(self) -> UpstreamRegistry: ...


class WorkerObservability:
    def __init__(self, loop: asyncio.AbstractEventLoop, registry: Registry = REGISTRY) -> None:
        self.loop = loop
        self.registry = registry
        self.recorder = Recorder(registry)
        self.access_log: AccessLog | None = None
        self.tracer: Any = None
        self._tracing: Tracing | None = None
        self._log_base = (0, 0)  # lines written, dropped by access logs already closed
        self._tracer_base = (0, 0, 0)
        self._error_counters: dict[tuple[str, str, str], Counter] = {}
        self._pools_seen: dict[Any, int] = {}
        self._upstream_seen: dict[tuple[str, ...], int] = {}

    def __repr__(self) -> str:
        return f"<WorkerObservability {self.recorder!r}>"

    # -- config -------------------------------------------------------------------------------------------
    def apply(self, config: GatewayConfig) -> None:
        gateway = config.gateway
        metrics = gateway.metrics
        registry = self.registry
        registry.configure(metrics.latency_buckets, metrics.gateway_latency_buckets, metrics.max_series)
        self._apply_access_log(config)
        self._apply_tracing(gateway.tracing)
        self.recorder.configure(metrics.enabled, metrics.status_codes, self.access_log, self.tracer)

    def _apply_access_log(self, config: GatewayConfig) -> None:
        settings = config.gateway.access_log
        current = self.access_log
        if current is not None and settings.enabled and current.same_sink(settings):
            current.update(settings)
            return
        if current is not None:
            current.close()
            self._retire_access_log(current)
        self.access_log = AccessLog(self.loop, settings) if settings.enabled else None

    def _retire_access_log(self, old: AccessLog) -> None:
        written, dropped = self._log_base
        self._log_base = (written + old.written_total, dropped + old.dropped_total)

    def _apply_tracing(self, tracing: Tracing) -> None:
        if tracing == self._tracing:
            return
        self._tracing = tracing
        old = self.tracer
        if old is not None:
            exported, failed, dropped = self._tracer_base
            self._tracer_base = (exported + old.exported, failed + old.failed, dropped + old.dropped_total)
            old.shutdown(wait=False)
            self.tracer = None
        if tracing.enabled:
            # Imported here: the OpenTelemetry SDK and exporter cost ~15 MB that an idle worker
            # without tracing should not pay. Set up in the worker, after it started (not fork-safe).
            from tollway.observability.tracing import Tracer

            self.tracer = Tracer(tracing)

    # -- per event -------------------------------------------------------------------------------------------
    def upstream_error(self, ex: Exchange, error: UpstreamError) -> None:
        service = ex.service.name if ex.service is not None else ""
        target = ex.target.label if ex.target is not None else ""
        kind = _ERROR_LABELS.get(type(error).__name__, "other")
        key = (service, target, kind)
        handle = self._error_counters.get(key)
        if handle is None:
            handle = self.registry.counter(
                "upstream_errors_total", service=service, target=target, error=kind
            )
            self._error_counters[key] = handle
        handle.inc()

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    # -- collection ----------------------------------------------------------------------------------------
    def collect(self, worker: Collected) -> dict[str, Any]:
        """Refresh the gauges and counters kept elsewhere, then snapshot the registry."""
        registry = self.registry
        registry.gauge("connections_active").set(len(worker.connections))
        registry.counter("connections_accepted_total").value = worker.connections_accepted
        opened: dict[Any, int] = {}
        for pool in worker.pools.values():
            registry.gauge("upstream_connections", target=pool.label, state="active").set(pool.active)
            registry.gauge("upstream_connections", target=pool.label, state="idle").set(len(pool.idle))
            # Pools come and go with the config: add what each opened since the last collect.
            registry.counter("upstream_connections_opened_total", target=pool.label).inc(
                pool.opened - self._pools_seen.get(pool, 0)
            )
            opened[pool] = pool.opened
        self._pools_seen = opened
        self._collect_upstreams(worker)
        written, dropped = self._log_base
        current = self.access_log
        if current is not None:
            written += current.written_total
            dropped += current.dropped_total
        registry.counter("access_log_written_lines_total").value = written
        registry.counter("access_log_dropped_lines_total").value = dropped
        exported, failed, dropped_spans = self._tracer_base
        tracer = self.tracer
        if tracer is not None:
            exported += tracer.exported
            failed += tracer.failed
            dropped_spans += tracer.dropped_total
        if tracer is not None or exported or failed or dropped_spans:
            registry.counter("tracing_spans_total", result="exported").value = exported
            registry.counter("tracing_spans_total", result="failed").value = failed
            registry.counter("tracing_spans_total", result="dropped").value = dropped_spans
        self._collect_limits()
        self._collect_cache()
        data = registry.snapshot()
        data["connections"] = len(worker.connections)
        data["config_version"] = worker.snapshot.version if worker.snapshot is not None else 0
        return data

    def _collect_upstreams(self, worker: Collected) -> None:
        """Retries and circuit-breaker refusals, from the upstream registry's per-worker counters
        (tollway.upstream.worker_registry). Those restart when an upstream is removed and added again, so the
        metrics add what changed since the last collect and never go backwards."""
        upstreams = getattr(worker, "upstreams", None)
        if upstreams is None:
            return
        seen: dict[tuple[str, ...], int] = {}
        for name, stats in upstreams.stats().items():
            for (target, address), counts in stats.get("targets", {}).items():
                for metric, field in (
                    ("upstream_target_requests_total", "requests"),
                    ("upstream_target_failures_total", "failed"),
                ):
                    value = counts.get(field, 0)
                    target_key: tuple[str, ...] = (metric, name, target, address)
                    self.registry.counter(metric, upstream=name, target=target, address=address).inc(
                        self._delta(target_key, value)
                    )
                    seen[target_key] = value
            breaker = stats.get("circuit_breaker_rejections", {})
            for metric, label, value in (
                ("upstream_retries_total", "retried", stats.get("retries", 0)),
                ("upstream_retries_total", "refused_by_budget", stats.get("retries_refused_by_budget", 0)),
                (_BREAKER, "max_connections", breaker.get("max_connections", 0)),
                (_BREAKER, "max_pending_requests", breaker.get("max_pending_requests", 0)),
            ):
                key: tuple[str, ...] = (metric, name, label)
                labels = {"result": label} if metric == "upstream_retries_total" else {"limit": label}
                self.registry.counter(metric, upstream=name, **labels).inc(self._delta(key, value))
                seen[key] = value
        self._upstream_seen = seen

    def _collect_limits(self) -> None:
        """The rate limiter's Redis backends and node table (tollway.state; its counters are cumulative
        per process and survive config reloads). Nothing is reported until a limit uses them; the module
        is not imported for it (an idle worker's memory)."""
        limits = sys.modules.get("tollway.state.policy_stats")
        if limits is None:
            return
        snapshot = limits.stats_snapshot()
        registry = self.registry
        for backend, stats in snapshot["redis"].items():
            registry.gauge("rate_limit_redis_up", backend=backend).set(0.0 if stats["down"] else 1.0)
            for metric, field in (
                ("rate_limit_redis_outages_total", "outages"),
                ("rate_limit_redis_fallbacks_total", "fallbacks"),
                ("rate_limit_redis_commands_total", "commands"),
                ("rate_limit_redis_errors_total", "errors"),
            ):
                registry.counter(metric, backend=backend).value = stats.get(field, 0)
        table = snapshot["table"]
        if table:
            registry.counter("rate_limit_table_evictions_total").value = table.get("evicted_live", 0)

    def _collect_cache(self) -> None:
        """proxy-cache counters (tollway.cache.stats), once a cache has been used in this process."""
        stats = sys.modules.get("tollway.cache.stats")
        if stats is None:
            return
        counts = stats.STATS.as_dict()
        registry = self.registry
        for result, field in (
            ("hit", "hits"),
            ("stale", "stale"),
            ("miss", "misses"),
            ("revalidated", "revalidated"),
            ("coalesced", "coalesced"),
            ("bypass", "store_errors"),
        ):
            registry.counter("proxy_cache_requests_total", result=result).value = counts[field]
        registry.counter("proxy_cache_stored_bytes_total").value = counts["bytes_stored"]
        registry.counter("proxy_cache_evictions_total").value = counts["evictions"]
        registry.counter("proxy_cache_invalidations_total").value = counts["invalidations"]

    def _delta(self, key: tuple[str, ...], value: int) -> int:
        previous = self._upstream_seen.get(key, 0)
        return value - previous if value >= previous else value  # a reset: count from zero

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
        if self.tracer is not None:
            self.tracer.shutdown(wait=True)
