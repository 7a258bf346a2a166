"""A feature that is off costs nothing: with metrics, the access log and tracing all off, a request that
ends runs none of their code (the client connection finds no `request_finished` to call); turning one
on by a reload brings the recording back. Drives a real ClientConnection and UpstreamConnection over
in-memory transports (no sockets), like bench/hotpath.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.memory_transport import MemoryTransport
from tollway.config.loader import load_text
from tollway.proxy.server import ClientConnection
from tollway.runtime.worker import Worker
from tollway.upstream.connection import UpstreamConnection

ROUTES = """
services: [{name: backend, url: "http://127.0.0.1:9001"}]
routes: [{name: all, service: backend, paths: ["/"]}]
"""
ALL_OFF = "gateway: {access_log: {enabled: false}, metrics: {enabled: false}}" + ROUTES
METRICS_ON = "gateway: {access_log: {enabled: false}}" + ROUTES
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def worker() -> Iterator[Worker]:
    loop = asyncio.new_event_loop()
    yield Worker(loop, 0, None, [])  # type: ignore[arg-type]
    loop.close()


def serve_one(worker: Worker) -> bytes:
    """One GET through the gateway, answered by an in-memory backend; returns what the client got."""
    client = ClientConnection(worker)
    client_side = MemoryTransport()
    client.connection_made(client_side)  # type: ignore[arg-type]
    pool = next(iter(worker.snapshot.services.values())).cluster.pools[0]
    upstream = UpstreamConnection(pool)
    upstream_side = MemoryTransport((pool.host, pool.port))
    upstream.connection_made(upstream_side)  # type: ignore[arg-type]
    pool.active += 1
    pool.release(upstream)
    client.data_received(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
    assert upstream_side.take().startswith(b"GET /x HTTP/1.1\r\n")
    upstream.data_received(RESPONSE)
    assert client.active is None, "the request did not end"
    return client_side.take()


def requests_counted(worker: Worker) -> int:
    metrics = worker.snapshot.routes[0].metrics
    return 0 if metrics is None else sum(metrics.counts().values())


def test_with_metrics_access_log_and_tracing_off_an_ending_request_calls_none_of_them(worker: Worker) -> None:
    worker.apply_config(1, load_text(ALL_OFF))
    assert worker.snapshot.request_finished is None
    answer = serve_one(worker)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert requests_counted(worker) == 0


def test_a_reload_that_turns_metrics_on_records_again(worker: Worker) -> None:
    worker.apply_config(1, load_text(ALL_OFF))
    worker.apply_config(2, load_text(METRICS_ON))
    assert worker.snapshot.request_finished is not None
    # The route's counters are bound on its first request and live per process, keyed by route and
    # service name: other tests in this process may have counted on the same names. Count from here.
    serve_one(worker)
    before = requests_counted(worker)
    assert before >= 1
    serve_one(worker)
    serve_one(worker)
    assert requests_counted(worker) - before == 2
    worker.apply_config(3, load_text(ALL_OFF))
    assert worker.snapshot.request_finished is None
