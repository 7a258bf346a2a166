"""OpenTelemetry spans for sampled requests, exported over OTLP/HTTP from a background thread.

Imported only when `gateway.tracing.enabled` is true, in the worker after it started (the SDK's
batch processing is not fork-safe, and an idle worker without tracing should not carry the SDK).

Trace ids, span ids and the sampling decision are made by hand on every request
(tollway.observability.tracecontext); this module only sees the sampled ones, once they end. It
builds the finished span directly as an SDK `ReadableSpan` — the gateway's span has a known start,
end and ids by then, so the Tracer/Span machinery (a sampler, an id generator, a live span object
per request) would only add cost — and queues it for a thread that exports batches with the
standard OTLP/HTTP exporter. The queue is bounded: when the collector is slow, spans are dropped and
counted (tollway_tracing_spans_total{result="dropped"}), the event loop never waits and nothing is
logged per span. When an export fails, the collector counts as down: spans are dropped before they
are even built or encoded (encoding is the expensive part, about 50 µs a span), and the thread probes
the collector with an empty export after 1 s, then after 2, 4 … up to 30 s, until one succeeds. So a
dead collector costs the workers less than a live one.

Attributes follow the OpenTelemetry HTTP semantic conventions for a server span (http.request.method,
url.path, url.scheme, server.address, client.address, http.response.status_code, …) plus
tollway.route, tollway.service, tollway.upstream.address and tollway.request_id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from tollway import __version__

if TYPE_CHECKING:
    from tollway.config.schema import Tracing
    from tollway.proxy.exchange import Exchange

log = logging.getLogger("tollway.tracing")
_SCHEDULE_DELAY = 1.0  # seconds between exports when fewer than a batch of spans wait
_WARN_EVERY = 60.0
_MAX_BACKOFF = 30.0  # seconds a failing collector is left alone, at most
_KNOWN_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"}
)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_ERROR = Status(StatusCode.ERROR)
_UNSET = Status(StatusCode.UNSET)
_SCOPE = InstrumentationScope("tollway", __version__)


class Tracer:
    def __init__(self, settings: Tracing, exporter: Any = None) -> None:
        # The SDK and exporter log every failed export and every full queue; the counters below say
        # the same without a log line per batch, and `_warn` logs a summary once a minute.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        self.endpoint = settings.otlp_endpoint
        self.exporter = exporter or OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, headers=dict(settings.headers), timeout=settings.export_timeout
        )
        self.resource = Resource.create(
            {"service.name": settings.service_name, "service.version": __version__}
        )
        self.max_queue = settings.max_queue_size
        self.batch_size = settings.max_export_batch_size
        self.queue: deque[ReadableSpan] = deque()
        self.exported = 0  # counted by the export thread
        self.failed = 0  # counted by the export thread
        self.dropped = 0  # counted by the event loop thread
        self.dropped_while_down = 0  # counted by the export thread
        self.down = False  # an export failed and no probe has succeeded since
        self._backoff = 0.0
        self._wake = threading.Event()
        self._stop = False
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (
            f"<Tracer {self.endpoint} queued={len(self.queue)} exported={self.exported} "
            f"failed={self.failed} dropped={self.dropped}>"
        )

    # -- event loop side ------------------------------------------------------------------------------------
    def finish(self, ex: Exchange, total: float, now: float) -> None:
        """Queue the span of a sampled request that just ended (`total` seconds long)."""
        if self.down or len(self.queue) >= self.max_queue:
            self.dropped += 1
            return
        self.queue.append(self.span(ex, total))
        if len(self.queue) >= self.batch_size:
            self._wake.set()

    def span(self, ex: Exchange, total: float) -> ReadableSpan:
        end = time.time_ns()
        start = end - int(total * 1e9)
        tracestate = TraceState.from_header([ex.tracestate.decode("latin-1")]) if ex.tracestate else None
        context = SpanContext(int(ex.trace_id, 16), int(ex.span_id, 16), False, _SAMPLED, tracestate)
        parent = None
        if ex.parent_span_id:
            parent = SpanContext(int(ex.trace_id, 16), int(ex.parent_span_id, 16), True, _SAMPLED, tracestate)
        route = ex.route
        method = ex.method.decode("latin-1")
        return ReadableSpan(
            name=f"{method} {route.name}" if route is not None else method,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=_attributes(ex, total),
            kind=SpanKind.SERVER,
            status=_ERROR if ex.status >= 500 else _UNSET,
            start_time=start,
            end_time=end,
            instrumentation_scope=_SCOPE,
        )

    def shutdown(self, wait: bool) -> None:
        """Stop the export thread. With `wait`, a reachable collector gets what is queued (for at most
        a second); a dead one costs no time: shutting the exporter down first ends its retries."""
        self._stop = True
        if not wait:
            self.queue.clear()
        self._wake.set()
        if wait:
            self._thread.join(1.0)
        self.queue.clear()
        self.exporter.shutdown()  # ends a retry's backoff wait at once
        self._thread.join(1.0)

    # -- export thread -----------------------------------------------------------------------------------
    @property
    def dropped_total(self) -> int:
        return self.dropped + self.dropped_while_down

    def _run(self) -> None:
        while not self._stop:
            if self.down:
                self._wake.wait(self._backoff)  # only shutdown wakes it early
                if not self._stop:
                    self._probe()
                continue
            self._wake.wait(_SCHEDULE_DELAY)
            self._wake.clear()
            self._export_queued()
        if not self.down:
            self._export_queued()

    def _send(self, batch: list[ReadableSpan]) -> bool:
        try:
            return self.exporter.export(batch) == SpanExportResult.SUCCESS
        except Exception:  # an exporter bug must not kill the thread
            return False

    def _probe(self) -> None:
        """Is the collector back? An empty export answers without building a single span."""
        if self._send([]):
            self._backoff = 0.0
            self.down = False
            log.info("span export to %s works again", self.endpoint)
        else:
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF)

    def _export_queued(self) -> None:
        queue = self.queue
        while queue:
            batch: list[ReadableSpan] = []
            while queue and len(batch) < self.batch_size:
                batch.append(queue.popleft())
            if self._send(batch):
                self.exported += len(batch)
                continue
            self.failed += len(batch)
            self._backoff = 1.0
            self.down = True  # until a probe succeeds: new spans are dropped unbuilt
            waiting = len(queue)
            queue.clear()  # spans older than the outage are not worth encoding
            self.dropped_while_down += waiting
            self._warn()
            return

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning(
                "span export to %s failing (%d spans failed, %d dropped so far); requests are unaffected",
                self.endpoint,
                self.failed,
                self.dropped_total,
            )


def _attributes(ex: Exchange, total: float) -> dict[str, Any]:
    client = ex.client
    method = ex.method
    attrs: dict[str, Any] = {
        "http.request.method": method.decode("latin-1") if method in _KNOWN_METHODS else "_OTHER",
        "url.path": ex.raw_path or ex.path,
        "url.scheme": client.scheme.decode("latin-1"),
        "client.address": client.peer_ip.decode("latin-1"),
        "network.protocol.name": "http",
        "network.protocol.version": "1.1" if ex.version == 1 else "1.0",
        "http.response.status_code": ex.status,
        "http.request.body.size": ex.body_received,
        "http.response.size": ex.bytes_sent,
        "tollway.request_id": ex.request_id.decode("latin-1"),
    }
    if method not in _KNOWN_METHODS:
        attrs["http.request.method_original"] = method.decode("latin-1")
    if ex.query:
        attrs["url.query"] = ex.query
    if ex.host:
        host, port = _split_host(ex.host.decode("latin-1"))
        attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
    agent = ex.get_header("user-agent")
    if agent is not None:
        attrs["user_agent.original"] = agent
    if ex.status >= 500:
        attrs["error.type"] = str(ex.status)
    route = ex.route
    if route is not None:
        attrs["tollway.route"] = route.name
        attrs["tollway.service"] = route.service.name
    if ex.target is not None:
        attrs["tollway.upstream.address"] = ex.target.label
    if ex.upstream_time >= 0:
        attrs["tollway.upstream.duration_ms"] = round(ex.upstream_time * 1000.0, 3)
    return attrs


def _split_host(host: str) -> tuple[str, int]:
    if host.endswith("]") or ":" not in host:
        return host.strip("[]"), 0
    name, _, port = host.rpartition(":")
    return name.strip("[]"), int(port) if port.isdigit() else 0
