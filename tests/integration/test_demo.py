"""`tollway demo` end to end: README's main job, run as a newcomer would (with --exit so it stops)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import yaml

from tests.support import ROOT

pytestmark = pytest.mark.integration


def test_demo_balances_both_instances_and_limits_a_client_to_five_a_minute() -> None:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    done = subprocess.run(
        [sys.executable, "-m", "tollway", "demo", "--port", "0", "--exit", "--requests", "14"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    rows = re.findall(r"^\s*(\d+) │ (\S+)\s+│ (\w+) (\S+)\s+│ (\d+)\s+│ (\S+)", out, re.MULTILINE)
    assert len(rows) == 14, out
    first_client = [r for r in rows if r[1] == "127.0.0.2"]
    assert [r[4] for r in first_client] == ["200"] * 5 + ["429"] * 2, out
    assert {r[5] for r in first_client if r[4] == "429"} == {"gateway"}  # never reached a backend
    served = {r[5] for r in rows if r[4] == "200"}
    assert served == {"users-a", "users-b"}, out  # balanced over both instances
    assert all(r[4] == "200" for r in rows if r[1] != "127.0.0.2"), out  # other clients have their own limit
    put = [r for r in rows if r[2] == "PUT"]
    assert put and put[0][4] == "200"
    assert "2 × 429" in out
    # HTTPS with the certificate made at start, verified by the demo's own request and shown for curl
    assert re.search(r"HTTPS on https://127\.0\.0\.1:\d+ .*over TLSv1\.[23]: 200", out), out
    assert re.search(r"curl --cacert \S+demo-cert\.pem https://localhost:\d+/users/1", out), out
    # a route added live through the admin API: unknown before, served by an instance right after
    assert re.search(
        r"GET http://127\.0\.0\.1:\d+/hello before: 404 · POST /routes .*: 201 .* "
        r"GET /hello after: 200 from users-[ab]",
        out,
    ), out
    json_header = "-H 'Content-Type: application/json'"
    assert re.search(r"curl -s http://127\.0\.0\.1:\d+/routes ", out), out
    assert re.search(rf"curl -s -X POST http://127\.0\.0\.1:\d+/routes {json_header} -d '{{", out), out
    assert re.search(r"curl -s -X DELETE http://127\.0\.0\.1:\d+/routes/hi ", out), out
    assert "docs/admin-api.md" in out


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (children re-parented to PID 1 would escape a
    parent-based search later, so this is taken while the demo still runs)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_demo_stops_every_process_it_started_on_a_signal(signum: int) -> None:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    demo = subprocess.Popen(
        [sys.executable, "-m", "tollway", "demo", "--port", "0", "--requests", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        out = _read_until(demo, "Press Ctrl-C", 90)
        gateway_pid = int(re.search(r"gateway pid (\d+)", out).group(1))
        access_log = re.search(r"access log \(one JSON line per request\): (\S+)", out).group(1)
        started = _descendants(demo.pid)
        # two user services, the supervisor and its two workers (more if a helper process runs)
        assert gateway_pid in started and len(started) >= 5, out
        workdir = os.path.dirname(access_log)
        with open(os.path.join(workdir, "demo.yaml")) as config:
            node = yaml.safe_load(config)
        assert node["gateway"]["store"]["backend"] == "sqlite" and node["gateway"]["admin"]["enabled"]
        assert "routes" not in node  # the entities live in the store
        with open(os.path.join(workdir, "entities.yaml")) as entities:
            assert "- PUT" in entities.read()  # the README's methods: [GET, PUT]
        _follow_the_admin_curl_lines(out)
        demo.send_signal(signum)
        assert demo.wait(60) == 0, out
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in started):
            time.sleep(0.2)
        assert not [pid for pid in started if _alive(pid)], out
        with open(access_log) as log:
            lines = log.read().splitlines()
        assert any('"status"' in line for line in lines), lines  # the demo's own requests were logged there
        # and the admin API's writes, one audit line each (docs/admin-api.md): the demo's and the test's
        audited = [line for line in lines if '"audit"' in line]
        assert len(audited) == 3 and '"name":"hello"' in audited[0], audited
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def _follow_the_admin_curl_lines(out: str) -> None:
    """What the printed curl lines do, against the running demo: list, add a route, it is served,
    delete it, it is gone."""
    admin = int(re.search(r"curl -s http://127\.0\.0\.1:(\d+)/routes ", out).group(1))
    gateway = int(re.search(r"curl -i http://127\.0\.0\.1:(\d+)/hi ", out).group(1))
    body = re.search(r"/routes -H 'Content-Type: application/json' -d '(\{.*\})'", out).group(1)
    status, listed = _call(admin, "GET", "/routes")
    assert status == 200 and {r["name"] for r in listed["data"]} == {"users", "hello"}, listed
    json_header = {"Content-Type": "application/json"}
    assert _call(admin, "POST", "/routes", body.encode(), json_header)[0] == 201
    deadline = time.monotonic() + 10
    while _call(gateway, "GET", "/hi")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _call(gateway, "GET", "/hi")[0] == 200
    assert _call(admin, "DELETE", "/routes/hi")[0] in (200, 204)
    deadline = time.monotonic() + 10
    while _call(gateway, "GET", "/hi")[0] != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _call(gateway, "GET", "/hi")[0] == 404


def _call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(raw) if raw and "json" in ctype else raw


def _read_until(popen: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """Output up to the line holding `marker`; fails after `timeout` seconds (read in a thread)."""
    lines: list[str] = []

    def read() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            lines.append(line)
            if marker in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    text = "".join(lines)
    assert marker in text, text
    return text
