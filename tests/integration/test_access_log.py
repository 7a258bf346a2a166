"""The access log: one JSON line per request with its time, client, method, path, route, service,
status, bytes, latencies and request id; written off the event loop, so a stuck sink never stalls
traffic.
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from tests.support import RawClient, Seen, gateway_config, request, wait_until

pytestmark = pytest.mark.integration

FIELDS = {
    "time",
    "client",
    "method",
    "path",
    "route",
    "service",
    "upstream",
    "status",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "upstream_ms",
    "request_id",
}


def entries(gw, count: int) -> list[dict]:
    assert wait_until(lambda: len(gw.access_log()) >= count), gw.output[-10:]
    return gw.access_log()


def test_one_line_per_proxied_request(gateway, backend) -> None:
    be = backend()
    gw = gateway(
        gateway_config(be.url, routes=[{"name": "users", "service": "backend", "paths": ["/users"]}])
    )
    resp = request(gw.port, "POST", "/users/7?token=secret", body=b"hello")
    (entry,) = entries(gw, 1)
    assert set(entry) == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["client"] == "127.0.0.1"
    assert entry["method"] == "POST"
    assert entry["path"] == "/users/7"  # never the query string (it may carry secrets)
    assert entry["route"] == "users" and entry["service"] == "backend"
    assert entry["upstream"] == f"127.0.0.1:{be.port}"
    assert entry["status"] == 200
    assert entry["bytes_received"] == 5
    assert entry["bytes_sent"] == len(resp.body) + resp_head_size(resp)
    assert entry["upstream_ms"] is not None and 0 <= entry["upstream_ms"] <= entry["duration_ms"]
    assert entry["request_id"] == be.seen[-1].header("x-request-id")


def resp_head_size(resp) -> int:
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}"] + [f"{k}: {v}" for k, v in resp.headers]
    return len("\r\n".join(lines)) + 4


def test_client_request_id_is_logged(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url))
    request(gw.port, headers={"X-Request-Id": "abc-123"})
    assert entries(gw, 1)[0]["request_id"] == "abc-123"


def test_gateway_answers_are_logged(gateway, backend) -> None:
    be = backend()
    gw = gateway(gateway_config(be.url, routes=[{"name": "api", "service": "backend", "paths": ["/api"]}]))
    not_found = request(gw.port, path="/nope?x=1")
    client = RawClient(gw.port)
    client.send(b"GET /api/bad?token=secret HTTP/1.1\r\nHost: gw.test\r\nX-A : b\r\n\r\n")
    bad = client.read_response()
    client.close()
    log = entries(gw, 2)
    by_status = {e["status"]: e for e in log}
    assert by_status[404]["path"] == "/nope"
    assert by_status[404]["route"] is None and by_status[404]["upstream_ms"] is None
    assert by_status[404]["request_id"] == not_found.json()["request_id"]
    assert by_status[400]["path"] == "/api/bad"
    assert by_status[400]["request_id"] == bad.json()["request_id"]
    assert "secret" not in "".join(gw.output)


def test_client_gone_before_the_response_is_499(gateway, backend) -> None:
    async def slow(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return True

    be = backend(slow)
    gw = gateway(gateway_config(be.url))
    client = RawClient(gw.port)
    client.send(b"GET /gone HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert wait_until(lambda: len(be.seen) == 1)
    client.close()
    (entry,) = entries(gw, 1)
    assert entry["status"] == 499 and entry["path"] == "/gone"


def test_access_log_to_a_file(gateway, backend, tmp_path) -> None:
    be = backend()
    path = tmp_path / "logs" / "access.log"
    gw = gateway(gateway_config(be.url, access_log={"path": str(path)}))
    for i in range(5):
        request(gw.port, path=f"/{i}")
    assert wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 5)
    assert gw.access_log() == []  # nothing on standard output


def test_a_stuck_log_sink_never_stalls_traffic(gateway, backend, tmp_path) -> None:
    """The sink is a FIFO nobody reads: the writer thread blocks opening it, traffic goes on."""
    be = backend()
    fifo = tmp_path / "stuck.log"
    os.mkfifo(fifo)
    gw = gateway(gateway_config(be.url, access_log={"path": str(fifo), "buffer_size": 0}))
    for i in range(300):
        assert request(gw.port, path=f"/{i}").status == 200
    assert len(be.seen) == 300
