"""proxy-cache's compiled hit path (tollway.plugins.builtin.cache_hit) must send exactly what the
general path sends for the same hit, and hand every other case to the general path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.harness import Harness, Result
from tollway.cache.stats import STATS
from tollway.plugins.builtin.cache_hit import HitPath

CACHEABLE = (200, [("Content-Type", "application/json"), ("Cache-Control", "max-age=600")], b'{"id":1}')
# A request directive that changes nothing for a fresh copy but sends the request the general way.
GENERAL = [("Cache-Control", "max-stale=0")]


def _gateway(tmp_path: Path, gateway: dict[str, Any] | None = None, **cache: Any) -> Harness:
    plugins: list[dict[str, Any]] = [
        {"name": "proxy-cache", "config": {"store": "node", "path": str(tmp_path / "c"), **cache}}
    ]
    return Harness({"gateway": gateway or {}, "plugins": plugins})


def _hits(gw: Harness) -> HitPath:
    route = gw.worker.snapshot.routes[0]
    for hook in route.pipeline.access:
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, HitPath):
            return owner
    raise AssertionError("proxy-cache's access hook is not its hit path")


def _comparable(raw: bytes) -> bytes:
    """The answer with Age, ttl and request id blanked: two hits a second apart differ only there."""
    raw = re.sub(rb"\r\nX-Request-Id: [0-9a-f]+\r\n", b"\r\nX-Request-Id: -\r\n", raw)
    return re.sub(rb"ttl=\d+", b"ttl=0", re.sub(rb"\r\nAge: \d+\r\n", b"\r\nAge: 0\r\n", raw))


def _fast_then_general(
    gw: Harness, backend: tuple[int, list[tuple[str, str]], bytes]
) -> tuple[Result, Result]:
    first = gw.request("GET", "/user/1", backend=backend)
    assert first.upstream is not None and first.header("x-cache-status") in (None, "MISS")
    hits = STATS.hits
    fast = gw.request("GET", "/user/1")
    assert fast.upstream is None and STATS.hits == hits + 1
    assert _hits(gw).prepared, "the hit did not go through the compiled path"
    general = gw.request("GET", "/user/1", GENERAL)
    assert general.upstream is None and STATS.hits == hits + 2
    return fast, general


@pytest.mark.parametrize(
    ("gateway", "cache", "backend"),
    [
        ({}, {}, CACHEABLE),
        ({"server_header": "tollway"}, {}, (200, [("Server", "origin/1"), *CACHEABLE[1]], b"{}")),
        ({}, {"status_header": None, "cache_status_name": "edge-1"}, CACHEABLE),
        ({}, {}, (404, [("Cache-Control", "max-age=60")], b"not here")),
        ({}, {}, (200, [("X-Request-Id", "from-the-backend"), *CACHEABLE[1]], b"{}")),
    ],
    ids=["plain", "own-server-field", "status-fields-configured", "404", "backend-echoes-request-id"],
)
def test_a_fast_hit_sends_what_the_general_path_sends(
    tmp_path: Path, gateway: dict[str, Any], cache: dict[str, Any], backend: Any
) -> None:
    gw = _gateway(tmp_path, gateway, **cache)
    try:
        fast, general = _fast_then_general(gw, backend)
        assert fast.status == backend[0] and fast.response.body == backend[2]
        assert _comparable(fast.raw) == _comparable(general.raw)
        if any(k == "X-Request-Id" for k, _ in backend[1]):  # each answer names its own request
            assert fast.header("x-request-id") not in (
                None,
                "from-the-backend",
                general.header("x-request-id"),
            )
    finally:
        gw.close()


@pytest.mark.parametrize(
    "fields",
    [
        [("If-None-Match", '"x"')],
        [("Range", "bytes=0-1")],
        [("Pragma", "no-cache")],
        [("Cache-Control", "no-cache")],
    ],
    ids=["conditional", "range", "pragma", "no-cache"],
)
def test_requests_the_answer_depends_on_take_the_general_path(tmp_path: Path, fields: Any) -> None:
    gw = _gateway(tmp_path)
    try:
        etagged = (200, [("ETag", '"x"'), *CACHEABLE[1]], b"0123456789")
        gw.request("GET", "/user/1", backend=etagged)
        answer = gw.request("GET", "/user/1", fields, backend=etagged)
        expected = {"If-None-Match": 304, "Range": 206, "Pragma": 200, "Cache-Control": 200}[fields[0][0]]
        assert answer.status == expected
        if fields[0][0] in ("If-None-Match", "Range"):
            assert answer.upstream is None and answer.header("x-cache-status") == "HIT"
        else:  # no-cache: validated with the backend first
            assert answer.upstream is not None
        assert not _hits(gw).prepared, "the compiled path answered a request it must not"
    finally:
        gw.close()


def test_head_and_stale_copies_take_the_general_path(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    try:
        gw.request("GET", "/a", backend=(200, [("Cache-Control", "max-age=600")], b"body"))
        head = gw.request("HEAD", "/a")
        assert head.status == 200 and head.upstream is None and head.response.body == b""
        assert not _hits(gw).prepared
        gw.request("GET", "/b", backend=(200, [("Cache-Control", "max-age=600"), ("Age", "700")], b"old"))
        again = gw.request("GET", "/b", backend=(200, [("Cache-Control", "max-age=600")], b"new"))
        assert again.upstream is not None and again.response.body == b"new"
    finally:
        gw.close()


def test_fields_other_plugins_add_reach_a_hit(tmp_path: Path) -> None:
    plugins = [
        {"name": "correlation-id", "config": {"echo_downstream": True}},
        {"name": "proxy-cache", "config": {"store": "node", "path": str(tmp_path / "c")}},
    ]
    gw = Harness({"plugins": plugins})
    try:
        miss = gw.request("GET", "/user/1", backend=CACHEABLE)
        hit = gw.request("GET", "/user/1")
        assert hit.upstream is None and hit.header("x-cache-status") == "HIT"
        correlation = hit.header("x-correlation-id")
        assert correlation is not None and correlation != miss.header("x-correlation-id")
    finally:
        gw.close()


def test_a_purged_copy_is_not_answered_from_what_the_hit_path_prepared(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    try:
        gw.request("GET", "/user/1", backend=CACHEABLE)
        assert gw.request("GET", "/user/1").upstream is None
        assert _hits(gw).prepared
        put = gw.request("PUT", "/user/1", body=b"{}", backend=(204, [], b""))
        assert put.status == 204
        after = gw.request("GET", "/user/1", backend=(200, CACHEABLE[1], b'{"id":2}'))
        assert after.upstream is not None and after.response.body == b'{"id":2}'
    finally:
        gw.close()


@pytest.mark.parametrize(
    "cache",
    [{"key_headers": ["Accept-Language"]}, {"key_consumer": True}, {"methods": ["HEAD"]}],
    ids=["key-headers", "key-consumer", "head-only"],
)
def test_caches_whose_hits_cannot_take_the_compiled_path_do_not_install_it(
    tmp_path: Path, cache: dict[str, Any]
) -> None:
    gw = _gateway(tmp_path, **cache)
    try:
        route = gw.worker.snapshot.routes[0]
        assert not any(isinstance(getattr(h, "__self__", None), HitPath) for h in route.pipeline.access)
        if "methods" not in cache:  # the general path still answers hits
            gw.request("GET", "/user/1", {"Accept-Language": "en"}, backend=CACHEABLE)
            hit = gw.request("GET", "/user/1", {"Accept-Language": "en"})
            assert hit.upstream is None and hit.header("x-cache-status") == "HIT"
    finally:
        gw.close()
