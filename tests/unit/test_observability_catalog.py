"""The metric catalogue, the Grafana dashboard and docs/monitoring.md stay in step; log sink details."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from tollway.config.loader import load_text
from tollway.config.log_fields import DEFAULT_FIELDS, FIELDS
from tollway.counters.catalog import CATALOG, REQUEST_METRICS
from tollway.errors import ConfigError
from tollway.observability.log_sinks import FdSink, LogWriter, _pipe_pieces

ROOT = Path(__file__).resolve().parents[2]
KNOWN = set(CATALOG) | set(REQUEST_METRICS)


def _base(name: str) -> str:
    name = name.removeprefix("tollway_")
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in KNOWN:
            return name[: -len(suffix)]
    return name


def test_dashboard_uses_only_metrics_that_exist():
    dashboard = json.loads((ROOT / "docs/grafana/tollway-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {_base(name) for expr in exprs for name in re.findall(r"tollway_\w+", expr)}
    assert used and used <= KNOWN, used - KNOWN
    assert {"http_requests_total", "http_upstream_duration_seconds", "upstream_target_health"} <= used


def test_every_metric_and_field_is_documented():
    doc = (ROOT / "docs/monitoring.md").read_text()
    missing = [name for name in KNOWN if f"`{name}`" not in doc]
    assert not missing
    assert [f for f in FIELDS if f"`{f}`" not in doc] == []


def test_access_log_config_validation():
    ok = load_text("gateway: {access_log: {fields: [time, request_header.X-Api-Key, status]}}")
    assert ok.gateway.access_log.fields == ["time", "request_header.x-api-key", "status"]
    assert load_text("").gateway.access_log.fields == DEFAULT_FIELDS
    with pytest.raises(ConfigError, match="unknown access log field 'bogus'"):
        load_text("gateway: {access_log: {fields: [time, bogus]}}")
    with pytest.raises(ConfigError, match="syslog_address"):
        load_text("gateway: {access_log: {sink: syslog, syslog_address: 'tcp://x:1'}}")
    with pytest.raises(ConfigError, match="needs a path"):
        load_text("gateway: {access_log: {sink: file}}")
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_text("gateway: {metrics: {latency_buckets: [0.1, 0.1]}}")
    with pytest.raises(ConfigError, match="sample_ratio"):
        load_text("gateway: {tracing: {sample_ratio: 2}}")


def test_pipe_pieces_are_cut_between_lines_only():
    lines = [b"a" * 1000 + b"\n" for _ in range(10)] + [b"b" * 5000 + b"\n"]
    pieces = _pipe_pieces(lines, 4096)
    assert b"".join(pieces) == b"".join(lines)
    assert all(p.endswith(b"\n") for p in pieces)
    assert all(len(p) <= 4096 for p in pieces[:-1])  # only a line longer than the limit exceeds it


def test_file_sink_reopens_after_rename(tmp_path):
    path = tmp_path / "a.log"
    sink = FdSink(str(path))
    sink.write([b"one\n"])
    os.rename(path, tmp_path / "a.log.1")
    sink.write([b"two\n"])  # still the renamed file until reopened
    sink.reopen()
    sink.write([b"three\n"])
    sink.close()
    assert (tmp_path / "a.log.1").read_bytes() == b"one\ntwo\n"
    assert path.read_bytes() == b"three\n"


def test_writer_counts_what_a_dead_syslog_drops(tmp_path):
    settings = load_text(
        f"gateway: {{access_log: {{sink: syslog, syslog_address: 'unix://{tmp_path}/nobody.sock'}}}}"
    ).gateway.access_log
    writer = LogWriter(settings)
    assert writer.submit([b'{"a":1}\n', b'{"a":2}\n'])
    writer.close()
    assert (writer.written_lines, writer.dropped_lines) == (0, 2)


def test_syslog_sink_frames_rfc5424(tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "log.sock"))
    settings = load_text(
        f"gateway: {{access_log: {{sink: syslog, syslog_address: 'unix://{tmp_path}/log.sock', "
        "syslog_facility: 23, syslog_app_name: 'my app'}}"
    ).gateway.access_log
    writer = LogWriter(settings)
    writer.submit([b'{"a":1}\n'])
    writer.close()
    receiver.settimeout(5)
    message = receiver.recv(4096).decode()
    receiver.close()
    assert re.fullmatch(rf'<190>1 \S+Z \S+ myapp {os.getpid()} - - \{{"a":1\}}', message), message
