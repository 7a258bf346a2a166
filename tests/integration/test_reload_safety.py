"""Reloads that must not happen: an empty file, a config without routes, a file read while it is being
written. The running config stays, the failure is logged and shown on /status.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
import yaml

from tests.support import gateway_config, request, wait_until

pytestmark = pytest.mark.integration


def routes_config(url: str, paths: list[str], **gateway: Any) -> dict[str, Any]:
    routes = [{"name": p.strip("/"), "service": "backend", "paths": [p]} for p in paths]
    return gateway_config(url, routes=routes, **gateway)


def last_reload(gw) -> dict[str, Any]:
    return request(gw.status_port, path="/status").json()["config"]["last_reload"]


@pytest.mark.parametrize("trigger", ["sighup", "watcher"])
def test_an_empty_file_is_never_applied(gateway, backend, trigger: str) -> None:
    be = backend()
    watch = "100ms" if trigger == "watcher" else 0
    gw = gateway(routes_config(be.url, ["/a"], watch_interval=watch))
    gw.config_path.write_text("")  # in place, as `: > gateway.yaml` or an editor truncating first
    if trigger == "sighup":
        gw.signal(signal.SIGHUP)
    gw.wait_for_output(r"the file is empty .*not applied")
    assert request(gw.port, path="/a").status == 200  # still the running config
    status = request(gw.status_port, path="/status").json()
    assert status["config"]["version"] == 1
    reload = status["config"]["last_reload"]
    assert reload["result"] == "failed" and any("empty" in issue for issue in reload["errors"])
    assert request(gw.status_port, path="/ready").status == 200


def test_a_config_without_routes_needs_allow_empty_routes(gateway, backend) -> None:
    be = backend()
    gw = gateway(routes_config(be.url, ["/a"], watch_interval=0))
    no_routes = gateway_config(be.url, watch_interval=0)
    no_routes["routes"] = []
    gw.write_config(no_routes)
    gw.signal(signal.SIGHUP)
    gw.wait_for_output(r"has no routes.*not applied \(gateway.allow_empty_routes: true allows it\)")
    assert request(gw.port, path="/a").status == 200
    assert last_reload(gw)["result"] == "failed"
    # Said explicitly: applied, and every request gets 404.
    no_routes["gateway"]["allow_empty_routes"] = True
    gw.write_config(no_routes)
    gw.signal(signal.SIGHUP)
    gw.wait_for_output(r"config v2 applied", stream="output")
    assert request(gw.port, path="/a").status == 404
    assert last_reload(gw)["result"] == "ok"


def test_a_file_written_in_place_is_read_once_it_is_stable(gateway, backend) -> None:
    """A writer that truncates and writes in pieces: a read between pieces sees a valid prefix (fewer
    routes). The reload must apply only the finished file."""
    be = backend()
    gw = gateway(routes_config(be.url, ["/a"], watch_interval=0))
    full = yaml.safe_dump(routes_config(be.url, ["/a", "/b", "/c"], watch_interval=0), sort_keys=False)
    cut = full.index("- name: c")  # a prefix that is a valid config with routes a and b only
    assert yaml.safe_load(full[:cut])["routes"][-1]["name"] == "b"

    def slow_writer() -> None:
        with open(gw.config_path, "w") as f:  # truncates: in place, no rename
            f.write(full[: cut // 2])
            f.flush()
            time.sleep(0.06)
            f.write(full[cut // 2 : cut])
            f.flush()
            time.sleep(0.06)
            f.write(full[cut:])

    writer = threading.Thread(target=slow_writer)
    writer.start()
    time.sleep(0.01)
    gw.signal(signal.SIGHUP)  # while the file is half-written
    writer.join()
    gw.wait_for_output(r"config v2 applied", stream="output")
    assert request(gw.port, path="/c").status == 200  # the first config applied is the whole file
    time.sleep(0.3)
    assert not any("config v3" in line for line in gw.output)  # and no second pass was needed


def test_tollway_check_warns_about_a_config_without_routes(tmp_path) -> None:
    import subprocess
    import sys

    from tests.support import ROOT

    path = tmp_path / "empty.yaml"
    path.write_text("gateway:\n  listen: ['127.0.0.1:0']\n")
    out = subprocess.run(
        [sys.executable, "-m", "tollway", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "0 routes" in out.stdout
    assert "warning: the config has no routes" in out.stderr
    assert "allow_empty_routes" in out.stderr


def test_reload_storm_with_in_place_edits_never_drops_routes(gateway, backend) -> None:
    """Under load, 10 SIGHUPs racing in-place rewrites of the file: no request gets a 404."""
    be = backend()
    config = routes_config(be.url, ["/a", "/b"], watch_interval="50ms")
    gw = gateway(config)
    text = yaml.safe_dump(config, sort_keys=False)
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        while not stop.is_set():
            statuses.append(request(gw.port, path="/b").status)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    cut = text.index("- name: b\n")  # the prefix is a valid config whose only route is /a
    try:
        for i in range(10):
            with open(gw.config_path, "w") as f:  # truncate, then write in two pieces
                f.write(text[:cut])
                f.flush()
                if i % 2:
                    gw.signal(signal.SIGHUP)  # mid-write
                time.sleep(0.03)
                f.write(text[cut:])
            gw.signal(signal.SIGHUP)
            time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert wait_until(lambda: request(gw.port, path="/a").status == 200)
