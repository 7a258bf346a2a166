"""The access log: one JSON line per request with its time, client, method, path, route, service,
status, bytes, latencies and request id; written off the event loop, so a stuck sink never stalls
traffic. Configurable fields, a file rotated under load (SIGUSR1), sampling, syslog over UDP and a Unix
socket, and sinks that fail without touching traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.support import RawClient, Seen, gateway_config, request, response, wait_until

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


def log_lines(*paths: Path) -> list[dict]:
    lines = []
    for path in paths:
        text = path.read_text()
        assert text == "" or text.endswith("\n"), f"{path} ends mid-line"
        lines += [json.loads(line) for line in text.splitlines()]  # a torn line would not parse
    return lines


def metric(gw, name: str) -> float:
    text = urllib.request.urlopen(gw.status_url + "/metrics", timeout=10).read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_configured_fields_and_escaping(gateway, backend):
    async def typed(seen, writer):
        writer.write(response(201, b"{}", [("Content-Type", "application/json")]))
        return True

    be = backend(typed)
    fields = [
        "method",
        "host",
        "path",
        "query",
        "protocol",
        "route",
        "status",
        "upstream_ms",
        "gateway_ms",
        "trace_id",
        "user_agent",
        "worker",
        "request_header.x-tricky",
        "request_header.x-absent",
        "response_header.content-type",
    ]
    gw = gateway(gateway_config(be.url, access_log={"fields": fields}))
    tricky = 'a "quoted" \\ value\twith tab'
    headers = {"X-Tricky": tricky, "User-Agent": "probe/1"}
    resp = request(gw.port, "POST", "/items/1?x=y", headers=headers, body=b"")
    assert resp.status == 201
    assert wait_until(lambda: len(gw.access_log()) == 1)
    line = gw.access_log()[0]
    assert list(line) == fields  # the catalogue's order, header fields last
    assert line["method"] == "POST" and line["host"] == "gateway.test"
    assert line["path"] == "/items/1" and line["query"] == "x=y" and line["protocol"] == "HTTP/1.1"
    assert line["route"] == "all" and line["status"] == 201
    assert line["gateway_ms"] >= 0 and line["upstream_ms"] >= 0
    assert line["worker"] in gw.worker_pids()
    assert re.fullmatch("[0-9a-f]{32}", line["trace_id"])
    assert line["request_header.x-tricky"] == tricky  # escaped in the line, intact once parsed
    assert line["request_header.x-absent"] is None
    assert line["response_header.content-type"] == "application/json"
    assert line["user_agent"] == "probe/1"


def test_file_rotated_under_load_loses_and_tears_nothing(gateway, backend, tmp_path):
    be = backend()
    path = tmp_path / "logs" / "access.log"
    gw = gateway(gateway_config(be.url, access_log={"path": str(path), "buffer_size": 2048}), workers=2)
    per_thread, threads = 150, 4
    sent: list[str] = []
    lock = threading.Lock()

    def load(t: int) -> None:
        for i in range(per_thread):
            client = RawClient(gw.port)  # new connections: both workers take part
            rid = f"t{t}-{i}"
            client.send(f"GET /n HTTP/1.1\r\nHost: a\r\nX-Request-Id: {rid}\r\n\r\n".encode())
            assert client.read_response().status == 200
            client.close()
            with lock:
                sent.append(rid)

    workers = [threading.Thread(target=load, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    rotated = []
    for n in range(1, 4):  # logrotate's way: rename, then SIGUSR1
        assert wait_until(lambda n=n: len(sent) >= n * 120, timeout=60)
        target = path.with_name(f"access.log.{n}")
        os.rename(path, target)
        rotated.append(target)
        gw.signal(signal.SIGUSR1)
        assert wait_until(path.exists, timeout=10)  # reopened: a fresh file at the same path
    for w in workers:
        w.join(60)
    assert len(sent) == per_thread * threads
    gw.stop()  # draining flushes what is buffered
    ids = [line["request_id"] for line in log_lines(*rotated, path)]
    assert sorted(ids) == sorted(sent)  # every request exactly once, across the four files
    assert all(path.stat().st_size > 0 for path in (*rotated[1:], path))  # rotation really happened


def test_sampling_keeps_errors(gateway, backend):
    async def flaky(seen, writer):
        writer.write(response(503 if seen.target.startswith("/fail") else 200))
        return True

    be = backend(flaky)
    gw = gateway(gateway_config(be.url, access_log={"sample_ratio": 0.0}))
    for _ in range(20):
        request(gw.port, "GET", "/ok")
    for _ in range(3):
        request(gw.port, "GET", "/fail")
    assert wait_until(lambda: len(gw.access_log()) == 3)
    assert {line["status"] for line in gw.access_log()} == {503}


def test_sampling_ratio(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, access_log={"sample_ratio": 0.5}))
    client = RawClient(gw.port)
    for _ in range(200):
        client.send(b"GET /n HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 200
    gw.stop()
    assert 50 < len(gw.access_log()) < 150


@pytest.mark.parametrize("transport", ["udp", "unix"])
def test_syslog_rfc5424(gateway, backend, tmp_path, transport):
    if transport == "udp":
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        address = f"udp://127.0.0.1:{sink.getsockname()[1]}"
    else:
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink.bind(str(tmp_path / "log.sock"))
        address = f"unix://{tmp_path / 'log.sock'}"
    sink.settimeout(10)
    be = backend()
    settings = {"sink": "syslog", "syslog_address": address, "syslog_facility": 16, "syslog_app_name": "edge"}
    gw = gateway(gateway_config(be.url, access_log=settings))
    for i in range(3):
        request(gw.port, "GET", f"/n/{i}")
    messages = [sink.recv(65536).decode() for _ in range(3)]
    sink.close()
    pattern = re.compile(r"^<134>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \S+ edge (\d+) - - (\{.*\})$")
    paths = []
    for message in messages:
        m = pattern.match(message)
        assert m is not None, message
        assert int(m.group(1)) in gw.worker_pids()
        paths.append(json.loads(m.group(2))["path"])
    assert sorted(paths) == ["/n/0", "/n/1", "/n/2"]
    assert gw.access_log() == []  # not on stdout


def test_failing_sink_drops_and_counts_lines_without_touching_traffic(gateway, backend):
    be = backend()
    gw = gateway(gateway_config(be.url, access_log={"path": "/dev/full", "buffer_size": 0}))
    for _ in range(25):
        assert request(gw.port, "GET", "/n").status == 200  # writes fail with ENOSPC
    assert wait_until(lambda: metric(gw, "tollway_access_log_dropped_lines_total") == 25, timeout=15)
    assert metric(gw, "tollway_access_log_written_lines_total") == 0


def test_unwritable_path_is_reported_and_traffic_flows(gateway, backend, tmp_path):
    be = backend()
    blocker = tmp_path / "file"
    blocker.write_text("")
    gw = gateway(gateway_config(be.url, access_log={"path": str(blocker / "access.log")}))
    assert request(gw.port, "GET", "/n").status == 200
    gw.wait_for_output("cannot open the access log")
    assert wait_until(lambda: metric(gw, "tollway_access_log_dropped_lines_total") == 1, timeout=15)
