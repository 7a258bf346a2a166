"""`tollway demo` end to end: README's main job, run as a newcomer would (with --exit so it stops)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

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
        with open(os.path.join(os.path.dirname(access_log), "demo.yaml")) as config:
            assert "- PUT" in config.read()  # the README's methods: [GET, PUT]
        demo.send_signal(signum)
        assert demo.wait(60) == 0, out
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in started):
            time.sleep(0.2)
        assert not [pid for pid in started if _alive(pid)], out
        with open(access_log) as lines:
            assert '"status"' in lines.readline()  # the demo's own requests were logged there
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


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
