"""The match memo's contents (Snapshot.matches, tollway.proxy.match_memo): which requests make an
entry (the second time they are routed), that a hit forwards what the misses forwarded, the bound,
and a fresh memo per config version.
Through the in-process gateway (the real worker, connection and exchange): the memo is inspected.
The same behaviours over real sockets: tests/integration/test_match_cache.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.plugins.harness import Harness, Result
from tollway.config.loader import validate
from tollway.plugins.registry import PLUGIN_CHECK
from tollway.proxy.match_memo import MEMO_SIZE, KnownMatch

HOST = "gw.test"
ROUTES: list[dict[str, Any]] = [
    {"name": "root", "service": "backend", "paths": ["/"]},
    {"name": "get", "service": "backend", "paths": ["/m"], "methods": ["GET"]},
    {"name": "post", "service": "backend", "paths": ["/m"], "methods": ["POST"]},
    {"name": "strip", "service": "backend", "paths": ["/strip"], "strip_path": True},
    {"name": "rewrite", "service": "backend", "paths": ["/users/{id}"], "rewrite": "/p/{id}"},
    {"name": "header", "service": "backend", "paths": ["/h"], "headers": {"X-Version": ["2"]}},
    {"name": "query", "service": "backend", "paths": ["/q"], "query": {"v": ["2"]}},
    {"name": "tls", "service": "backend", "paths": ["/tls"], "protocols": ["https"]},
    {"name": "sni", "service": "backend", "paths": ["/sni"], "snis": ["api.test"]},
    {"name": "strict", "service": "backend", "hosts": ["strict.test"], "paths": ["/s"], "methods": ["GET"]},
    {"name": "wild", "service": "backend", "hosts": ["*.wild.test"], "paths": ["/"]},
]


# Host routes rank before the others (docs/routing.md): all of these are for one host but two.
ROUTES = [route if "hosts" in route else {**route, "hosts": [HOST]} for route in ROUTES]


@pytest.fixture
def gw() -> Any:
    # RouteFields: each request reports what routing set on it (X-Route-Fields), then changes ex.params
    h = Harness(
        {
            "routes": ROUTES,
            "plugins": [{"name": "tests.plugins.sample_plugins:RouteFields"}],
            "gateway": {"forwarded_headers": {"x_forwarded_prefix": True}},
        }
    )
    yield h
    h.close()


def send(h: Harness, method: str, target: str, host: str = HOST, **headers: str) -> Result:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    return h.request(raw=("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def forwarded(result: Result) -> tuple[Any, ...]:
    """What the backend received, the per-request ids aside; or the gateway's own answer."""
    if result.upstream is None:
        return (result.status, result.header("allow"))
    headers = [
        (k.lower(), v) for k, v in result.upstream.headers if k.lower() not in ("x-request-id", "traceparent")
    ]
    return (result.upstream.start, tuple(headers))


def keys(h: Harness) -> set[tuple[bytes, bytes, bytes]]:
    return set(h.worker.snapshot.matches)


@pytest.mark.parametrize(
    ("method", "target", "host"),
    [
        ("GET", "/a/b?x=1", HOST),
        ("GET", "/m/1", HOST),
        ("HEAD", "/a", HOST),
        ("GET", "/strip/x?y", HOST),
        ("GET", "/strip", HOST),
        ("GET", "/users/7?z", HOST),
        ("GET", "/%75sers/./8", HOST),
        ("GET", "/a//b/../c", HOST),
        ("GET", "/s", "strict.test"),
        ("GET", "/x", "A.Wild.Test:8000"),
    ],
)
def test_fast_path_results_are_memoised_and_a_hit_forwards_the_same(
    gw: Harness, method: str, target: str, host: str
) -> None:
    first = send(gw, method, target, host)
    assert keys(gw) == set()  # routed once: only its URL is kept (seen_once)
    assert len(gw.worker.snapshot.seen_once) == 1
    assert forwarded(send(gw, method, target, host)) == forwarded(first)
    assert keys(gw) == {(method.encode(), host.encode(), target.encode())}
    known = gw.worker.snapshot.matches[method.encode(), host.encode(), target.encode()]
    assert isinstance(known, KnownMatch)
    for _ in range(2):  # hits
        assert forwarded(send(gw, method, target, host)) == forwarded(first)
    assert len(keys(gw)) == 1


@pytest.mark.parametrize(
    ("method", "target", "host", "headers"),
    [
        ("POST", "/m/1", HOST, {"Content-Length": "0"}),  # the best candidate ("get") refuses POST
        ("DELETE", "/m/1", HOST, {}),  # neither allows it: the root route, through the walk
        ("GET", "/h", HOST, {"X-Version": "2"}),
        ("GET", "/h", HOST, {}),  # the header route is the best candidate: never memoised
        ("GET", "/q?v=2", HOST, {}),
        ("GET", "/q?v=1", HOST, {}),
        ("GET", "/tls", HOST, {}),
        ("GET", "/sni", HOST, {}),
        ("DELETE", "/s", "strict.test", {}),  # 405
        ("GET", "/nothing", "strict.test", {}),  # 404
        ("GET", "/" + "a" * 256, HOST, {}),  # a long URL
        ("GET", "/x", "h" * 250 + ".wild.test", {}),  # a long Host
        ("GET", "http://gw.test/a", HOST, {}),  # absolute-form
        ("GET", "/a%zz", HOST, {}),  # 400: a malformed path
        ("GET", "/a", "bad/host", {}),  # 400: an invalid Host
    ],
)
def test_what_is_never_memoised(
    gw: Harness, method: str, target: str, host: str, headers: dict[str, str]
) -> None:
    first = send(gw, method, target, host, **headers)
    for _ in range(2):
        assert forwarded(send(gw, method, target, host, **headers)) == forwarded(first)
    assert keys(gw) == set()
    assert gw.worker.snapshot.seen_once == set()


def test_answers_on_repetition(gw: Harness) -> None:
    assert forwarded(send(gw, "DELETE", "/s", "strict.test")) == (405, "GET")
    assert forwarded(send(gw, "DELETE", "/s", "strict.test")) == (405, "GET")
    assert send(gw, "GET", "/nothing", "strict.test").status == 404
    assert send(gw, "GET", "/nothing", "strict.test").status == 404
    assert send(gw, "GET", "/a%zz").status == 400
    assert send(gw, "GET", "/a%zz").status == 400
    assert send(gw, "GET", "/h", **{"X-Version": "2"}).upstream is not None
    assert send(gw, "POST", "/m", **{"Content-Length": "0"}).upstream is not None
    assert send(gw, "GET", "/m").upstream is not None
    assert send(gw, "GET", "/m").upstream is not None
    assert keys(gw) == {(b"GET", HOST.encode(), b"/m")}
    assert send(gw, "POST", "/m", **{"Content-Length": "0"}).upstream is not None  # still routed
    assert send(gw, "GET", "/s", "strict.test").status == 200


def test_the_url_limit(gw: Harness) -> None:
    at_limit = "/" + "a" * 255
    for _ in range(2):
        send(gw, "GET", at_limit)
        send(gw, "GET", at_limit + "a")
    assert keys(gw) == {(b"GET", HOST.encode(), at_limit.encode())}


def test_a_hit_sets_what_routing_set(gw: Harness) -> None:
    results = [send(gw, "GET", "/%75sers/./7?a=b") for _ in range(4)]
    fields = "/users/7 | /%75sers/./7 | a=b | id=7 | rewrite | backend | /p/7?a=b"
    assert [r.upstream.header("x-route-fields") for r in results if r.upstream] == [fields] * 4
    results = [send(gw, "GET", "/x/y") for _ in range(4)]
    fields = "/x/y | /x/y |  |  | root | backend | /x/y"
    assert [r.upstream.header("x-route-fields") for r in results if r.upstream] == [fields] * 4
    assert len(keys(gw)) == 2


def test_strip_path_prefix_on_a_hit(gw: Harness) -> None:
    for _ in range(3):
        upstream = send(gw, "GET", "/strip/x").upstream
        assert upstream is not None
        assert (upstream.target, upstream.header("x-forwarded-prefix")) == ("/x", "/strip")


def test_the_memo_is_bounded(gw: Harness) -> None:
    send(gw, "GET", "/first")
    send(gw, "GET", "/first")
    matches = gw.worker.snapshot.matches
    known = matches[b"GET", HOST.encode(), b"/first"]
    for i in range(MEMO_SIZE - 1):
        matches[b"GET", HOST.encode(), b"/filler/%d" % i] = known
    assert len(matches) == MEMO_SIZE
    send(gw, "GET", "/next")
    send(gw, "GET", "/next")  # the memo is full: cleared, then the new entry
    assert keys(gw) == {(b"GET", HOST.encode(), b"/next")}
    assert forwarded(send(gw, "GET", "/first")) == forwarded(send(gw, "GET", "/first"))
    assert len(matches) == 2
    seen = gw.worker.snapshot.seen_once
    seen.update(b"/filler/%d" % i for i in range(MEMO_SIZE - len(seen)))
    send(gw, "GET", "/once")  # the set of hashes too
    assert len(seen) == 1


def test_one_off_urls_make_no_entry(gw: Harness) -> None:
    for i in range(50):
        assert send(gw, "GET", f"/users/{i}").upstream is not None
    assert keys(gw) == set()
    assert len(gw.worker.snapshot.seen_once) == 50


def test_a_new_config_version_starts_a_new_memo(gw: Harness) -> None:
    assert send(gw, "GET", "/a").upstream is not None
    assert send(gw, "GET", "/a").upstream is not None
    old = gw.worker.snapshot
    assert len(old.matches) == 1
    config = dict(gw.config.model_dump(mode="json", exclude_none=True))
    config["routes"] = [{"name": "other", "service": "backend", "paths": ["/b"]}]
    gw.worker.apply_config(2, validate(config, plugins=PLUGIN_CHECK))
    new = gw.worker.snapshot
    assert new is not old and new.matches == {} and new.seen_once == set()
    assert send(gw, "GET", "/a").status == 404  # the URL seen before: the new routes
    assert send(gw, "GET", "/b").upstream is not None
    assert send(gw, "GET", "/b").upstream is not None
    assert keys(gw) == {(b"GET", HOST.encode(), b"/b")}
