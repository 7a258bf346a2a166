"""Tracing through a real gateway: traceparent always reaches the backend, sampled requests become
OTLP spans at a collector on 127.0.0.1, and a dead collector changes nothing for requests."""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support import RawClient, gateway_config, request, wait_until

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")


class Collector:
    """An OTLP/HTTP trace receiver: decodes ExportTraceServiceRequest bodies into plain dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.receive(self.path, self.headers.get("Content-Type", ""), body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def receive(self, path: str, ctype: str, body: bytes) -> None:
        assert path == "/v1/traces" and ctype == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(body)
        for resource_spans in message.resource_spans:
            resource = _attrs(resource_spans.resource.attributes)
            self.resources.append(resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "status": span.status.code,
                            "duration_ns": span.end_time_unix_nano - span.start_time_unix_nano,
                            "attributes": _attrs(span.attributes),
                            "scope": scope_spans.scope.name,
                        }
                    )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attrs(items: Any) -> dict[str, Any]:
    out = {}
    for kv in items:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def traced(backend_url: str, endpoint: str, ratio: float = 1.0, **tracing: Any) -> dict[str, Any]:
    return gateway_config(
        backend_url,
        tracing={"enabled": True, "otlp_endpoint": endpoint, "sample_ratio": ratio, **tracing},
        access_log={"fields": ["method", "status", "request_id", "trace_id", "span_id"]},
    )


def backend_traceparent(be) -> re.Match[str]:
    value = be.seen[-1].header("traceparent")
    assert value is not None, be.seen[-1].headers
    m = TRACEPARENT.match(value)
    assert m is not None, value
    return m


def test_client_trace_is_continued_and_the_span_exported(gateway, backend, collector):
    be = backend()
    gw = gateway(traced(be.url, collector.url, ratio=0.0, service_name="edge"))
    sent = f"00-{TRACE}-{CLIENT_SPAN}-01"
    resp = request(gw.port, "GET", "/users/7?full=1", headers={"traceparent": sent, "tracestate": "k=v"})
    assert resp.status == 200
    m = backend_traceparent(be)
    assert m.group(1) == TRACE  # the client's trace continues at the backend
    assert m.group(2) != CLIENT_SPAN  # with the gateway's hop as its parent
    assert m.group(3) == "01"  # the client's sampled flag wins over ratio 0
    assert be.seen[-1].header("tracestate") == "k=v"
    assert be.seen[-1].header_all("traceparent") == [m.group(0)]  # replaced, not duplicated

    assert wait_until(lambda: len(collector.spans) == 1, timeout=15)
    span = collector.spans[0]
    assert span["trace_id"] == TRACE
    assert span["span_id"] == m.group(2)  # the id the backend saw as its parent
    assert span["parent_span_id"] == CLIENT_SPAN
    assert span["name"] == "GET all" and span["kind"] == 2  # SPAN_KIND_SERVER
    assert span["scope"] == "tollway"
    attrs = span["attributes"]
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/users/7" and attrs["url.query"] == "full=1"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "gateway.test"
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["tollway.route"] == "all" and attrs["tollway.service"] == "backend"
    assert attrs["tollway.upstream.address"] == f"127.0.0.1:{be.port}"
    request_id = be.seen[-1].header("x-request-id")
    assert attrs["tollway.request_id"] == request_id
    assert span["duration_ns"] > 0
    assert collector.resources[0]["service.name"] == "edge"

    # The access log names the same trace and span.
    line = next(entry for entry in gw.access_log() if entry["request_id"] == request_id)
    assert line["trace_id"] == TRACE and line["span_id"] == m.group(2)


def test_new_traces_follow_the_sampling_ratio(gateway, backend, collector):
    be = backend()
    gw = gateway(traced(be.url, collector.url, ratio=1.0))
    request(gw.port, "GET", "/a")
    m = backend_traceparent(be)
    assert m.group(3) == "01"
    assert wait_until(lambda: len(collector.spans) == 1, timeout=15)
    span = collector.spans[0]
    assert span["trace_id"] == m.group(1) and span["span_id"] == m.group(2)
    assert span["parent_span_id"] == ""  # the gateway started this trace


def test_unsampled_requests_export_nothing_but_still_propagate(gateway, backend, collector):
    be = backend()
    gw = gateway(traced(be.url, collector.url, ratio=0.0))
    for _ in range(5):
        request(gw.port, "GET", "/a")
        assert backend_traceparent(be).group(3) == "00"
    request(gw.port, "GET", "/a", headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-00"})
    m = backend_traceparent(be)
    assert m.group(1) == TRACE and m.group(3) == "00"
    time.sleep(1.5)  # longer than the export interval
    assert collector.spans == []


def test_gateway_answers_are_spans_too(gateway, backend, collector):
    be = backend()
    cfg = traced(be.url, collector.url, ratio=1.0)
    cfg["routes"] = [{"name": "api", "service": "backend", "paths": ["/api"]}]
    gw = gateway(cfg)
    sent = f"00-{TRACE}-{CLIENT_SPAN}-01"
    assert request(gw.port, "GET", "/elsewhere", headers={"traceparent": sent}).status == 404
    assert wait_until(lambda: len(collector.spans) == 1, timeout=15)
    span = collector.spans[0]
    assert span["trace_id"] == TRACE and span["parent_span_id"] == CLIENT_SPAN
    assert span["name"] == "GET"
    assert span["attributes"]["http.response.status_code"] == 404


def test_dead_collector_leaves_requests_unaffected(gateway, backend):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"
    be = backend()
    gw = gateway(traced(be.url, dead, ratio=1.0, export_timeout=0.5, max_queue_size=10))
    started = time.monotonic()
    for _ in range(60):
        assert request(gw.port, "GET", "/a").status == 200
    assert time.monotonic() - started < 30  # nothing waited on the collector (bound, not a timing)

    def spans(result: str) -> float:
        import urllib.request

        text = urllib.request.urlopen(gw.status_url + "/metrics", timeout=10).read().decode()
        found = re.search(rf'^tollway_tracing_spans_total\{{result="{result}"\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    assert wait_until(lambda: spans("failed") + spans("dropped") == 60, timeout=20)
    assert spans("exported") == 0
    assert spans("dropped") > 0  # the queue holds 10: the rest were dropped, never waited for


def test_tracing_disabled_passes_client_headers_and_starts_traces(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url))
    sent = f"00-{TRACE}-{CLIENT_SPAN}-00"
    request(gw.port, "GET", "/a", headers={"traceparent": sent, "tracestate": "a=1"})
    assert be.seen[-1].header("traceparent") == sent  # not a hop: unchanged
    assert be.seen[-1].header("tracestate") == "a=1"
    request(gw.port, "GET", "/a")
    m = backend_traceparent(be)
    assert m.group(1) != TRACE and m.group(3) == "01"  # started, and left to the backend to record
    request(gw.port, "GET", "/a", headers={"traceparent": "garbage", "tracestate": "a=1"})
    assert backend_traceparent(be).group(1) != TRACE
    assert be.seen[-1].header("tracestate") is None  # dropped with the invalid traceparent


def test_propagation_can_be_turned_off(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, tracing={"propagate": False}))
    request(gw.port, "GET", "/a")
    assert be.seen[-1].header("traceparent") is None
    request(gw.port, "GET", "/a", headers={"traceparent": "whatever"})
    assert be.seen[-1].header("traceparent") == "whatever"


def test_upstream_head_bytes(gateway, backend):
    """The head a backend receives, byte for byte: the X-Request-Id line and the traceparent line are
    each one piece of the head, and the ids in the access log are the ones in that line."""
    be = backend()
    gw = gateway(gateway_config(be.url, access_log={"fields": ["request_id", "trace_id", "span_id"]}))
    before = len(be.raw)
    client = RawClient(gw.port)
    try:
        client.send(b"GET /h?q=1 HTTP/1.1\r\nHost: gateway.test\r\nAccept: */*\r\n\r\n")
        assert client.read_response().status == 200
        client.send(b"GET /h HTTP/1.1\r\nHost: gateway.test\r\nX-Request-Id: mine\r\n\r\n")
        assert client.read_response().status == 200
    finally:
        client.close()
    first, second = bytes(be.raw[before:]).split(b"\r\n\r\n")[:2]
    forwarded = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: gateway.test\r\n"
    m = re.fullmatch(
        rb"GET /h\?q=1 HTTP/1\.1\r\nHost: 127\.0\.0\.1:%d\r\nAccept: \*/\*\r\n%s"
        rb"X-Request-Id: ([0-9a-f]{32})\r\ntraceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-01"
        % (be.port, forwarded),
        first,
    )
    assert m is not None, first
    assert re.fullmatch(
        rb"GET /h HTTP/1\.1\r\nHost: 127\.0\.0\.1:%d\r\n%sX-Request-Id: mine\r\n"
        rb"traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-01" % (be.port, forwarded),
        second,
    ), second
    rid = m.group(1).decode()
    assert wait_until(lambda: any(e["request_id"] == rid for e in gw.access_log()), timeout=10)
    line = next(e for e in gw.access_log() if e["request_id"] == rid)
    assert line["trace_id"] == m.group(2).decode() and line["span_id"] == m.group(3).decode()
