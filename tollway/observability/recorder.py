"""What a worker does when a request ends: count it, log it, and hand a sampled one to the tracer.

`Recorder.finished` is called once per request: the client connection calls `Snapshot.request_finished`,
which the worker sets to it, or to None when metrics, access log and tracing are all off (then a request
runs none of their code). It reads the clock once and derives every duration from it:

- total    — from the request head (the Exchange's creation) to now, the last response byte;
- upstream — `Exchange.upstream_time`: from handing the request to a backend (connect included) to
             its response head; absent when the gateway answered itself;
- gateway  — the gateway's own share: from the request head to handing it upstream (routing,
             plugins, waiting behind a pipelined request), or the whole request when nothing was
             proxied.

Request metrics are kept per (service, route) in a `RouteMetrics` that the compiled route points at
(looked up once per route and config version, then one attribute read per request).

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from tollway.counters.metrics import KEY_STRIDE, METHOD_INDEX, OTHER_METHOD, Registry, RouteMetrics

_perf_counter: Final = time.perf_counter  # bound once: no module attribute lookup per request

if TYPE_CHECKING:
    from tollway.observability.access_log import AccessLog
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.snapshot import CompiledRoute


class Recorder:
    __slots__ = ("access_log", "metrics_on", "registry", "status_codes", "trace_ids", "tracer")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.metrics_on = True
        self.status_codes = False
        self.access_log: AccessLog | None = None
        self.tracer: Any = None  # tollway.observability.tracing.Tracer, once tracing is enabled
        self.trace_ids = False  # something below reads trace ids: make sure they exist

    def __repr__(self) -> str:
        return (
            f"<Recorder metrics={'on' if self.metrics_on else 'off'} "
            f"log={'on' if self.access_log is not None else 'off'} "
            f"tracing={'on' if self.tracer is not None else 'off'}>"
        )

    def configure(
        self, metrics_on: bool, status_codes: bool, access_log: AccessLog | None, tracer: Any
    ) -> None:
        self.metrics_on = metrics_on
        self.status_codes = status_codes
        self.access_log = access_log
        self.tracer = tracer
        self.trace_ids = tracer is not None or (access_log is not None and access_log.needs_trace_ids)

    def records(self) -> bool:
        """Whether a finished request has anything to do here (`finished` is not called otherwise)."""
        return self.metrics_on or self.access_log is not None or self.tracer is not None

    def finished(self, ex: Exchange) -> None:
        now = _perf_counter()
        total = now - ex.start_time
        started = ex.upstream_start
        gateway = started - ex.start_time if started > 0.0 else total
        if self.metrics_on:
            route = ex.route
            if route is None:
                metrics = self.registry.unrouted_metrics()
            else:
                found = route.metrics
                metrics = found if found is not None else self._bind(route)
            status = ex.status
            if self.status_codes:
                code = status if 100 <= status <= 999 else 0
            else:
                code = status // 100 if 100 <= status <= 599 else 0
            key = METHOD_INDEX.get(ex.method, OTHER_METHOD) * KEY_STRIDE + code
            metrics.record(key, total, ex.upstream_time, gateway, ex.body_received, ex.bytes_sent)
        if self.trace_ids and not ex.trace_id:
            ex.snapshot.trace.start(ex)  # answered by the gateway: no upstream head chose the ids
        log = self.access_log
        if log is not None:
            log.log(ex, total, gateway, now)
        tracer = self.tracer
        if tracer is not None and ex.sampled:
            tracer.finish(ex, total, now)

    def _bind(self, route: CompiledRoute) -> RouteMetrics:
        metrics = self.registry.route(route.service.name, route.name)
        route.metrics = metrics
        return metrics
