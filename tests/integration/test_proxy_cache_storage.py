"""proxy-cache storage through real gateways: the size limit, chunked bodies, the node store shared by
workers (and removed with its node), eviction under a byte budget, keys, purging from the CLI,
metrics, and answers from a copy naming their own request."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.cache_support import Origin, count, make_cached, make_origin
from tests.support import ROOT, Backend, Gateway, gateway_config, request, wait_until
from tollway.examples.user_service import make_server

pytestmark = pytest.mark.integration
origin = pytest.fixture(name="origin")(make_origin)
cached = pytest.fixture(name="cached")(make_cached)


# -- storage ----------------------------------------------------------------------------------------------
def test_objects_over_the_size_limit_pass_through_and_are_not_stored(cached: Any, origin: Origin) -> None:
    big = b"x" * 5000
    origin.routes["/big"] = (200, [("Cache-Control", "max-age=60")], big)
    gw, b = cached(max_object_size=4096)
    assert request(gw.port, path="/big").body == big
    again = request(gw.port, path="/big")
    assert again.body == big and again.header("x-cache-status") == "MISS"
    assert "detail=too-large" in again.header("cache-status")
    assert count(b, "/big") == 2


def test_chunked_responses_are_stored_and_served_with_a_length(cached: Any, origin: Origin) -> None:
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    origin.routes["/chunked"] = (
        200,
        [("Cache-Control", "max-age=60"), ("Transfer-Encoding", "chunked")],
        chunked,
    )
    gw, _b = cached()
    assert request(gw.port, path="/chunked").body == b"hello world"
    hit = request(gw.port, path="/chunked")
    assert hit.header("x-cache-status") == "HIT" and hit.body == b"hello world"
    assert hit.header("content-length") == "11"


def test_workers_share_the_node_store(cached: Any, origin: Origin) -> None:
    origin.routes["/shared"] = (200, [("Cache-Control", "max-age=60")], b"one copy")
    gw, b = cached(workers=2)
    statuses = []
    for _ in range(20):  # new connections land on either worker (SO_REUSEPORT)
        statuses.append(request(gw.port, path="/shared").header("x-cache-status"))
    assert statuses.count("MISS") == 1 and count(b, "/shared") == 1


def test_eviction_keeps_the_store_under_its_byte_budget(cached: Any, origin: Origin) -> None:
    body = b"y" * 20000
    for i in range(10):
        origin.routes[f"/e{i}"] = (200, [("Cache-Control", "max-age=60")], body)
    gw, _b = cached(max_size="64KiB")
    for i in range(10):
        request(gw.port, path=f"/e{i}")
    assert request(gw.port, path="/e9").header("x-cache-status") == "HIT"  # most recent survives
    assert request(gw.port, path="/e0").header("x-cache-status") == "MISS"  # least recent evicted


def test_default_node_store_is_shared_by_workers_and_removed_with_its_node(
    backend: Callable[..., Backend], gateway: Callable[..., Gateway], origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/n"] = (200, [("Cache-Control", "max-age=60")], b"n")
    b = backend(origin.respond)
    config = gateway_config(b.url)
    config["plugins"] = [{"name": "proxy-cache"}]  # every option at its default
    base = tmp_path / "cache-base"
    (base / "node-999999999").mkdir(parents=True)  # a node that is gone: its store is removed
    gw = gateway(config, workers=2, env={"TOLLWAY_CACHE_DIR": str(base)})
    statuses = [request(gw.port, path="/n").header("x-cache-status") for _ in range(12)]
    assert statuses.count("MISS") == 1 and count(b, "/n") == 1
    assert sorted(p.name for p in base.iterdir()) == [f"node-{gw.process.pid}"]


# -- keys ---------------------------------------------------------------------------------------------------
def test_query_normalisation_and_key_headers(cached: Any, origin: Origin) -> None:
    origin.routes["/q"] = (
        200,
        [("Cache-Control", "max-age=60")],
        lambda seen: (200, [("Cache-Control", "max-age=60")], seen.target.encode()),
    )  # type: ignore[assignment]
    gw, b = cached(ignore_query_params=["utm_source"], sort_query=True, key_headers=["X-Tenant"])
    request(gw.port, path="/q?b=2&a=1&utm_source=mail", headers={"X-Tenant": "t1"})
    assert request(gw.port, path="/q?a=1&b=2", headers={"X-Tenant": "t1"}).header("x-cache-status") == "HIT"
    assert request(gw.port, path="/q?a=1&b=2", headers={"X-Tenant": "t2"}).header("x-cache-status") == "MISS"
    assert request(gw.port, path="/q?a=1&b=3", headers={"X-Tenant": "t1"}).header("x-cache-status") == "MISS"
    assert count(b, "/q?b=2&a=1&utm_source=mail") == 1  # the backend sees the query as sent


def test_set_cookie_responses_are_not_stored_by_default(cached: Any, origin: Origin) -> None:
    origin.routes["/cookie"] = (200, [("Cache-Control", "max-age=60"), ("Set-Cookie", "s=1")], b"x")
    gw, _ = cached()
    request(gw.port, path="/cookie")
    again = request(gw.port, path="/cookie")
    assert again.header("x-cache-status") == "MISS" and "detail=set-cookie" in again.header("cache-status")


# -- purge and metrics ------------------------------------------------------------------------------------
def test_cli_purges_by_key_prefix_and_tag(cached: Any, origin: Origin) -> None:
    for path, tag in (("/p/1", "one"), ("/p/2", "two"), ("/t/1", "tagged"), ("/t/2", "tagged")):
        origin.routes[path] = (200, [("Cache-Control", "max-age=60"), ("Surrogate-Key", f"{tag} all")], b"x")
    gw, _ = cached()
    paths = ["/p/1", "/p/2", "/t/1", "/t/2"]
    for path in paths:
        request(gw.port, path=path)

    def purge(*args: str) -> str:
        cmd = [sys.executable, "-m", "tollway", "cache", "purge", "-c", str(gw.config_path), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "1 removed" in purge("--key", "http://gateway.test/p/1")
    assert request(gw.port, path="/p/1").header("x-cache-status") == "MISS"
    assert request(gw.port, path="/p/2").header("x-cache-status") == "HIT"
    assert "2 removed" in purge("--tag", "tagged")
    assert [request(gw.port, path=p).header("x-cache-status") for p in ("/t/1", "/t/2")] == ["MISS", "MISS"]
    assert "2 removed" in purge("--prefix", "http://gateway.test/p/")
    assert request(gw.port, path="/p/2").header("x-cache-status") == "MISS"


def test_metrics_count_hits_and_misses(cached: Any, origin: Origin) -> None:
    origin.routes["/m"] = (200, [("Cache-Control", "max-age=60")], b"metrics")
    gw, _ = cached()
    for _ in range(3):
        request(gw.port, path="/m")

    def value(result: str) -> float:
        text = urllib.request.urlopen(gw.status_url + "/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(f'tollway_proxy_cache_requests_total{{result="{result}"}}'):
                return float(line.split()[-1])
        return 0.0

    assert wait_until(lambda: value("hit") == 2 and value("miss") == 1, 10)


def test_an_echoed_request_id_names_the_request_answered_from_the_copy(cached: Any, origin: Origin) -> None:
    origin.routes["/rid"] = (  # type: ignore[assignment]
        0,
        [],
        lambda seen: (
            200,
            [("Cache-Control", "max-age=60"), ("X-Request-Id", seen.header("x-request-id"))],
            b"r",
        ),
    )
    gw, b = cached()
    first = request(gw.port, path="/rid")
    hit = request(gw.port, path="/rid")
    assert hit.header("x-cache-status") == "HIT" and count(b, "/rid") == 1
    assert first.header("x-request-id") == b.seen[0].header("x-request-id")
    assert hit.header("x-request-id") and hit.header("x-request-id") != first.header("x-request-id")
    assert len([v for k, v in hit.headers if k.lower() == "x-request-id"]) == 1


def test_a_store_that_cannot_be_opened_means_bypass_never_an_error(
    backend: Callable[..., Backend], gateway: Callable[..., Gateway], origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/b"] = (200, [("Cache-Control", "max-age=60")], b"still served")
    b = backend(origin.respond)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's directory should be")
    config = gateway_config(b.url)
    config["plugins"] = [{"name": "proxy-cache", "config": {"path": str(blocker / "cache")}}]
    gw = gateway(config)
    for _ in range(2):
        answer = request(gw.port, path="/b")
        assert answer.status == 200 and answer.body == b"still served"
        assert answer.header("x-cache-status") == "BYPASS"
    assert request(gw.port, "PUT", "/b", body=b"{}").status == 200
    assert count(b, "/b") == 2


def test_key_consumer_keeps_a_copy_per_consumer(
    backend: Callable[..., Backend], gateway: Callable[..., Gateway], origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/me"] = (  # type: ignore[assignment]
        0,
        [],
        lambda seen: (
            200,
            [("Cache-Control", "public, max-age=60")],
            (seen.header("x-consumer-username") or "").encode(),
        ),
    )
    b = backend(origin.respond)
    config = gateway_config(b.url)
    config["plugins"] = [
        {"name": "key-auth"},
        {"name": "proxy-cache", "config": {"path": str(tmp_path / "cache"), "key_consumer": True}},
    ]
    config["consumers"] = [
        {"username": "ada", "credentials": {"key-auth": [{"key": "key-ada-0123456789"}]}},
        {"username": "bob", "credentials": {"key-auth": [{"key": "key-bob-0123456789"}]}},
    ]
    gw = gateway(config)
    for name in ("ada", "bob", "ada", "bob"):
        answer = request(gw.port, path="/me", headers={"apikey": f"key-{name}-0123456789"})
        assert answer.body == name.encode()
    assert count(b, "/me") == 2
    assert request(gw.port, path="/me").status == 401  # authentication still runs before the cache


# -- the seed example ---------------------------------------------------------------------------------------
def test_users_example_put_then_get_never_serves_the_old_user(
    gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """examples/users.yaml's route and plugins in front of two real user-service instances on one
    SQLite file: reads are cached, and after every PUT the next GET (on either worker) is the new user."""
    config = yaml.safe_load((ROOT / "examples" / "users.yaml").read_text())
    route = config["routes"][0]
    route["plugins"] = [p for p in route["plugins"] if p["name"] == "proxy-cache"]  # no rate limit here
    route["plugins"][0]["config"]["path"] = str(tmp_path / "cache")
    db = tmp_path / "users.db"
    with running_user_service(db, "users-a") as port_a, running_user_service(db, "users-b") as port_b:
        config["upstreams"][0]["targets"] = [
            {"target": f"127.0.0.1:{port_a}"},
            {"target": f"127.0.0.1:{port_b}"},
        ]
        config["gateway"] = {"listen": ["127.0.0.1:0"], "status_listen": "127.0.0.1:0"}
        gw = gateway(config, workers=2)
        for version in range(5):
            name = f"user{version}"
            put = request(gw.port, "PUT", "/users/7", {"Content-Type": "application/json"},
                          json.dumps({"name": name, "email": f"{name}@example.com"}).encode())  # fmt: skip
            assert put.status in (200, 201), put
            for _ in range(4):  # new connections: either worker
                got = request(gw.port, path="/users/7")
                assert got.status == 200 and json.loads(got.body)["name"] == name
        statuses = [request(gw.port, path="/users/7").header("x-cache-status") for _ in range(4)]
        assert statuses == ["HIT"] * 4


@contextlib.contextmanager
def running_user_service(db: Path, name: str) -> Iterator[int]:
    server = make_server("127.0.0.1", 0, str(db), name)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_worker_store_caches_in_the_process(cached: Any, origin: Origin) -> None:
    origin.routes["/w"] = (200, [("Cache-Control", "max-age=60")], b"in memory")
    gw, b = cached(store="worker", max_size="1mb")
    assert request(gw.port, path="/w").header("x-cache-status") == "MISS"
    hit = request(gw.port, path="/w")
    assert hit.header("x-cache-status") == "HIT" and hit.body == b"in memory"
    assert request(gw.port, "DELETE", "/w").status == 200
    assert request(gw.port, path="/w").header("x-cache-status") == "MISS"
    assert count(b, "/w") == 2
