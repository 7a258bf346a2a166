"""`tollway demo` end to end: README's main job, run as a newcomer would (with --exit so it stops)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
