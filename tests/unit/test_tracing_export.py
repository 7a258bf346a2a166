"""The span export queue: bounded, never waits, leaves a failing collector alone for a while."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.support import wait_until
from tollway.config.loader import load_text
from tollway.observability.tracing import Tracer
from tollway.proxy.exchange import Exchange
from tollway.proxy.server import ClientConnection
from tollway.runtime.worker import Worker


class FakeExporter:
    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS, delay: float = 0.0) -> None:
        self.result = result
        self.delay = delay
        self.batches: list[int] = []
        self.stopped = threading.Event()

    def export(self, batch: list) -> SpanExportResult:
        self.batches.append(len(batch))
        self.stopped.wait(self.delay)  # a hanging collector, until shutdown
        return self.result

    def shutdown(self) -> None:
        self.stopped.set()


@pytest.fixture
def exchange() -> Iterator[Exchange]:
    loop = asyncio.new_event_loop()
    worker = Worker(loop, 0, None, [])  # type: ignore[arg-type]
    worker.apply_config(1, load_text("gateway: {access_log: {enabled: false}}"))
    ex = Exchange(ClientConnection(worker), worker.snapshot)
    ex.method, ex.status, ex.path = b"GET", 200, "/x"
    ex.trace_id, ex.span_id, ex.sampled = b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", True
    yield ex
    loop.close()


def tracer(exporter: FakeExporter, **settings: object) -> Tracer:
    config = load_text("gateway: {tracing: {enabled: true}}").gateway.tracing.model_copy(update=settings)
    return Tracer(config, exporter)


def test_spans_are_exported_in_batches(exchange):
    exporter = FakeExporter()
    t = tracer(exporter, max_export_batch_size=10)
    for _ in range(25):
        t.finish(exchange, 0.001, 0.0)
    assert wait_until(lambda: t.exported == 25, timeout=5)
    assert max(exporter.batches) <= 10
    t.shutdown(wait=True)


def test_full_queue_drops_and_counts(exchange):
    exporter = FakeExporter(delay=30)  # the first export hangs
    t = tracer(exporter, max_queue_size=5, max_export_batch_size=1)
    started = time.monotonic()
    for _ in range(50):
        t.finish(exchange, 0.001, 0.0)
    assert time.monotonic() - started < 5  # the loop side never waited (a bound, not a timing)
    assert t.dropped >= 40
    t.shutdown(wait=True)  # ends the hanging export: bounded
    assert exporter.stopped.is_set()


def test_failing_collector_is_left_alone_then_retried(exchange):
    exporter = FakeExporter(SpanExportResult.FAILURE)
    t = tracer(exporter)
    t.finish(exchange, 0.001, 0.0)
    t._wake.set()
    assert wait_until(lambda: t.failed == 1, timeout=5)
    assert t.down
    for _ in range(10):  # while it counts as down, spans are not even built
        t.finish(exchange, 0.001, 0.0)
    assert t.dropped == 10 and len(t.queue) == 0
    assert wait_until(lambda: exporter.batches.count(0) >= 1, timeout=5)  # an empty probe after 1 s
    assert t.down  # the probe failed too
    exporter.result = SpanExportResult.SUCCESS
    assert wait_until(lambda: not t.down, timeout=10)  # the next probe (2 s later) succeeds
    t.finish(exchange, 0.001, 0.0)
    t._wake.set()
    assert wait_until(lambda: t.exported == 1, timeout=5)
    assert t.failed == 1 and t.dropped == 10
    t.shutdown(wait=True)


def test_span_content(exchange):
    t = tracer(FakeExporter())
    exchange.parent_span_id = b"1111111111111111"
    exchange.status = 503
    span = t.span(exchange, 0.25)
    assert span.name == "GET"
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(span.parent.span_id, "016x") == "1111111111111111" and span.parent.is_remote
    assert span.end_time - span.start_time == pytest.approx(0.25e9, rel=1e-6)
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "503"
    assert span.attributes["http.response.status_code"] == 503
    t.shutdown(wait=False)
