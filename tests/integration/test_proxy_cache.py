"""proxy-cache through real gateway processes and a real backend that counts what reaches it.

Per RFC 9111 section: freshness (§4.2), request directives (§5.2.1), validation and 304 refresh
(§4.3), Vary (§4.1), invalidation by unsafe methods incl. Location (§4.4), HEAD from a stored GET,
ranges from a stored body; coalescing of concurrent misses; stale-if-error with the backend gone;
workers sharing the node store; eviction under a byte budget; objects over the size limit.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cache_support import Origin, cache_config, count, make_cached, make_origin
from tests.support import Backend, Gateway, Seen, request, wait_until

pytestmark = pytest.mark.integration
origin = pytest.fixture(name="origin")(make_origin)
cached = pytest.fixture(name="cached")(make_cached)


# -- freshness (§4.2) -------------------------------------------------------------------------------------
def test_fresh_response_is_served_from_the_cache_without_reaching_the_backend(
    cached: Any, origin: Origin
) -> None:
    origin.routes["/a"] = (200, [("Cache-Control", "max-age=60"), ("Content-Type", "text/plain")], b"hello")
    gw, b = cached()
    first = request(gw.port, path="/a")
    assert first.status == 200 and first.body == b"hello"
    assert first.header("x-cache-status") == "MISS"
    assert "fwd=uri-miss" in first.header("cache-status") and "stored" in first.header("cache-status")
    second = request(gw.port, path="/a")
    assert second.status == 200 and second.body == b"hello"
    assert second.header("x-cache-status") == "HIT"
    assert second.header("content-type") == "text/plain"
    assert second.header("cache-status").startswith("Tollway; hit")
    assert second.header("age") is not None and int(second.header("age")) >= 0
    assert count(b, "/a") == 1


def test_expired_response_goes_back_to_the_backend(cached: Any, origin: Origin) -> None:
    origin.routes["/short"] = (200, [("Cache-Control", "max-age=1")], b"x")
    gw, b = cached()
    request(gw.port, path="/short")
    assert request(gw.port, path="/short").header("x-cache-status") == "HIT"
    time.sleep(1.2)
    again = request(gw.port, path="/short")
    assert again.header("x-cache-status") in ("MISS", "EXPIRED")
    assert count(b, "/short") == 2


def test_age_from_the_backend_counts_against_freshness(cached: Any, origin: Origin) -> None:
    origin.routes["/aged"] = (200, [("Cache-Control", "max-age=60"), ("Age", "59")], b"x")
    gw, b = cached()
    request(gw.port, path="/aged")
    hit = request(gw.port, path="/aged")
    assert hit.header("x-cache-status") == "HIT" and int(hit.header("age")) >= 59
    time.sleep(1.1)
    assert request(gw.port, path="/aged").header("x-cache-status") == "EXPIRED"
    assert count(b, "/aged") == 2


def test_responses_without_freshness_are_not_stored_unless_a_default_ttl_is_configured(
    cached: Any, origin: Origin
) -> None:
    origin.routes["/plain"] = (200, [], b"x")
    gw, b = cached()
    request(gw.port, path="/plain")
    assert request(gw.port, path="/plain").header("x-cache-status") == "MISS"
    assert count(b, "/plain") == 2


def test_default_ttl_applies_to_responses_without_freshness(cached: Any, origin: Origin) -> None:
    origin.routes["/plain"] = (200, [], b"x")
    gw, b = cached(default_ttl="30s")
    request(gw.port, path="/plain")
    assert request(gw.port, path="/plain").header("x-cache-status") == "HIT"
    assert count(b, "/plain") == 1


@pytest.mark.parametrize("directive", ["no-store", "private", "max-age=60, no-store"])
def test_response_directives_that_forbid_storing(cached: Any, origin: Origin, directive: str) -> None:
    origin.routes["/p"] = (200, [("Cache-Control", directive)], b"x")
    gw, b = cached()
    request(gw.port, path="/p")
    request(gw.port, path="/p")
    assert count(b, "/p") == 2


def test_authorization_requires_public_or_s_maxage(cached: Any, origin: Origin) -> None:
    origin.routes["/auth"] = (200, [("Cache-Control", "max-age=60")], b"secret")
    origin.routes["/shared"] = (200, [("Cache-Control", "public, max-age=60")], b"shared")
    gw, b = cached()
    for _ in range(2):
        request(gw.port, path="/auth", headers={"Authorization": "Bearer a"})
        request(gw.port, path="/shared", headers={"Authorization": "Bearer a"})
    assert count(b, "/auth") == 2
    assert count(b, "/shared") == 1


# -- request directives (§5.2.1) -------------------------------------------------------------------------
def test_request_no_cache_revalidates_and_only_if_cached_answers_504(cached: Any, origin: Origin) -> None:
    origin.routes["/r"] = (200, [("Cache-Control", "max-age=60")], b"x")
    gw, b = cached()
    assert request(gw.port, path="/none", headers={"Cache-Control": "only-if-cached"}).status == 504
    assert count(b, "/none") == 0
    request(gw.port, path="/r")
    assert request(gw.port, path="/r", headers={"Cache-Control": "only-if-cached"}).status == 200
    request(gw.port, path="/r", headers={"Cache-Control": "no-cache"})
    assert count(b, "/r") == 2
    request(gw.port, path="/r", headers={"Pragma": "no-cache"})
    assert count(b, "/r") == 3


def test_client_no_cache_can_be_ignored_by_config(cached: Any, origin: Origin) -> None:
    origin.routes["/r"] = (200, [("Cache-Control", "max-age=60")], b"x")
    gw, b = cached(ignore_client_no_cache=True)
    request(gw.port, path="/r")
    assert (
        request(gw.port, path="/r", headers={"Cache-Control": "no-cache"}).header("x-cache-status") == "HIT"
    )
    assert count(b, "/r") == 1


def test_request_max_age_min_fresh_and_max_stale(cached: Any, origin: Origin) -> None:
    origin.routes["/m"] = (200, [("Cache-Control", "max-age=2")], b"x")
    gw, b = cached()
    request(gw.port, path="/m")
    time.sleep(1.1)
    assert (
        request(gw.port, path="/m", headers={"Cache-Control": "max-age=5"}).header("x-cache-status") == "HIT"
    )
    assert (
        request(gw.port, path="/m", headers={"Cache-Control": "max-age=0"}).header("x-cache-status") != "HIT"
    )
    before = count(b, "/m")
    assert (
        request(gw.port, path="/m", headers={"Cache-Control": "min-fresh=30"}).header("x-cache-status")
        != "HIT"
    )
    assert count(b, "/m") == before + 1
    origin.routes["/s"] = (200, [("Cache-Control", "max-age=1")], b"s")
    request(gw.port, path="/s")
    time.sleep(1.2)
    stale = request(gw.port, path="/s", headers={"Cache-Control": "max-stale=60"})
    assert stale.header("x-cache-status") == "STALE" and stale.body == b"s"
    assert count(b, "/s") == 1


# -- validation (§4.3) -------------------------------------------------------------------------------------
def test_stale_copy_is_revalidated_with_a_conditional_request_and_a_304_refreshes_it(
    cached: Any, origin: Origin
) -> None:
    def answer(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if seen.header("if-none-match") == '"v1"':
            return 304, [("Cache-Control", "max-age=60"), ("ETag", '"v1"'), ("X-Refreshed", "yes")], b""
        return 200, [("Cache-Control", "max-age=1"), ("ETag", '"v1"'), ("X-Refreshed", "no")], b"body-v1"

    origin.routes["/v"] = (0, [], answer)  # type: ignore[assignment]
    gw, b = cached()
    assert request(gw.port, path="/v").body == b"body-v1"
    time.sleep(1.2)
    refreshed = request(gw.port, path="/v")
    assert refreshed.status == 200 and refreshed.body == b"body-v1"
    assert refreshed.header("x-cache-status") == "REVALIDATED"
    assert refreshed.header("x-refreshed") == "yes"
    assert [s.header("if-none-match") for s in b.seen] == [None, '"v1"']
    hit = request(gw.port, path="/v")  # fresh again for 60 s, with the 304's headers
    assert hit.header("x-cache-status") == "HIT" and hit.header("x-refreshed") == "yes"
    assert count(b, "/v") == 2


def test_client_conditional_requests_are_answered_304_from_the_cache(cached: Any, origin: Origin) -> None:
    lm = "Tue, 01 Dec 2026 10:00:00 GMT"
    origin.routes["/c"] = (
        200,
        [("Cache-Control", "max-age=60"), ("ETag", 'W/"abc"'), ("Last-Modified", lm)],
        b"c",
    )
    gw, b = cached()
    request(gw.port, path="/c")
    not_modified = request(gw.port, path="/c", headers={"If-None-Match": '"abc"'})
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.header("etag") == 'W/"abc"'
    assert request(gw.port, path="/c", headers={"If-None-Match": '"other"'}).status == 200
    assert request(gw.port, path="/c", headers={"If-Modified-Since": lm}).status == 304
    assert (
        request(gw.port, path="/c", headers={"If-Modified-Since": "Mon, 30 Nov 2026 10:00:00 GMT"}).status
        == 200
    )
    assert count(b, "/c") == 1


# -- Vary (§4.1) ------------------------------------------------------------------------------------------
def test_vary_keeps_one_copy_per_normalised_request_field(cached: Any, origin: Origin) -> None:
    def answer(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        lang = seen.header("accept-language") or "none"
        return 200, [("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")], lang.encode()

    origin.routes["/vary"] = (0, [], answer)  # type: ignore[assignment]
    gw, b = cached()
    assert request(gw.port, path="/vary", headers={"Accept-Language": "en, fr"}).body == b"en, fr"
    assert request(gw.port, path="/vary", headers={"Accept-Language": "de"}).body == b"de"
    again = request(gw.port, path="/vary", headers={"Accept-Language": "fr,EN"})  # same list, normalised
    assert again.header("x-cache-status") == "HIT" and again.body == b"en, fr"
    assert request(gw.port, path="/vary", headers={"Accept-Language": "de"}).header("x-cache-status") == "HIT"
    assert request(gw.port, path="/vary").body == b"none"
    assert count(b, "/vary") == 3


def test_vary_star_is_never_stored(cached: Any, origin: Origin) -> None:
    origin.routes["/star"] = (200, [("Cache-Control", "max-age=60"), ("Vary", "*")], b"x")
    gw, b = cached()
    request(gw.port, path="/star")
    request(gw.port, path="/star")
    assert count(b, "/star") == 2


# -- invalidation (§4.4) -----------------------------------------------------------------------------------
def test_unsafe_methods_invalidate_the_uri_and_location(cached: Any, origin: Origin) -> None:
    version = {"n": 1}

    def user(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if seen.method == "PUT":
            version["n"] += 1
            return 200, [("Content-Location", "/users/1/profile")], b"updated"
        if seen.method == "POST":
            return 201, [("Location", "http://gateway.test/users/2")], b""
        return (
            200,
            [("Cache-Control", "max-age=60")],
            json.dumps({"v": version["n"], "p": seen.target}).encode(),
        )

    origin.routes["/users/1"] = (0, [], user)  # type: ignore[assignment]
    origin.routes["/users/1/profile"] = (0, [], user)  # type: ignore[assignment]
    origin.routes["/users"] = (0, [], user)  # type: ignore[assignment]
    origin.routes["/users/2"] = (0, [], user)  # type: ignore[assignment]
    gw, _b = cached()
    for path in ("/users/1", "/users/1/profile", "/users/2"):
        request(gw.port, path=path)
        assert request(gw.port, path=path).header("x-cache-status") == "HIT"
    assert request(gw.port, "PUT", "/users/1", body=b"{}").status == 200
    fresh = request(gw.port, path="/users/1")
    assert fresh.header("x-cache-status") == "MISS" and json.loads(fresh.body)["v"] == 2
    assert request(gw.port, path="/users/1/profile").header("x-cache-status") == "MISS"  # Content-Location
    assert request(gw.port, "POST", "/users", body=b"{}").status == 201
    assert request(gw.port, path="/users/2").header("x-cache-status") == "MISS"  # Location, same host


def test_failed_unsafe_requests_do_not_invalidate(cached: Any, origin: Origin) -> None:
    def answer(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if seen.method == "DELETE":
            return 500, [], b"no"
        return 200, [("Cache-Control", "max-age=60")], b"x"

    origin.routes["/d"] = (0, [], answer)  # type: ignore[assignment]
    gw, _b = cached()
    request(gw.port, path="/d")
    request(gw.port, "DELETE", "/d")
    assert request(gw.port, path="/d").header("x-cache-status") == "HIT"


# -- HEAD and ranges --------------------------------------------------------------------------------------
def test_head_and_ranges_are_answered_from_a_stored_get(cached: Any, origin: Origin) -> None:
    origin.routes["/file"] = (200, [("Cache-Control", "max-age=60"), ("ETag", '"f1"')], b"0123456789")
    gw, b = cached()
    request(gw.port, path="/file")
    head = request(gw.port, "HEAD", "/file")
    assert head.status == 200 and head.body == b"" and head.header("content-length") == "10"
    assert head.header("x-cache-status") == "HIT"
    part = request(gw.port, path="/file", headers={"Range": "bytes=2-4"})
    assert part.status == 206 and part.body == b"234" and part.header("content-range") == "bytes 2-4/10"
    suffix = request(gw.port, path="/file", headers={"Range": "bytes=-3"})
    assert suffix.status == 206 and suffix.body == b"789"
    assert request(gw.port, path="/file", headers={"Range": "bytes=20-"}).status == 416
    whole = request(gw.port, path="/file", headers={"Range": "bytes=0-1", "If-Range": '"old"'})
    assert whole.status == 200 and whole.body == b"0123456789"
    assert count(b, "/file") == 1 and count(b, "/file", "HEAD") == 0


# -- coalescing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_misses_make_one_backend_request(cached: Any, origin: Origin, workers: int) -> None:
    """100 concurrent misses: one backend request, in one worker or across a node's two workers
    (the node store's fill lease)."""
    origin.routes["/slow"] = (200, [("Cache-Control", "max-age=60")], b"slow body")
    origin.delay = 0.5
    gw, b = cached(workers=workers)
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
        try:
            conn.request("GET", "/slow")
            resp = conn.getresponse()
            body = resp.read()
            with lock:
                results.append((resp.status, body))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 100
    assert all(r == (200, b"slow body") for r in results)
    assert count(b, "/slow") == 1


def test_concurrent_requests_for_a_stale_copy_share_one_revalidation(cached: Any, origin: Origin) -> None:
    def answer(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if seen.header("if-none-match") == '"r1"':
            return 304, [("Cache-Control", "max-age=60"), ("ETag", '"r1"')], b""
        return 200, [("Cache-Control", "max-age=1"), ("ETag", '"r1"')], b"revalidated body"

    origin.routes["/rv"] = (0, [], answer)  # type: ignore[assignment]
    gw, b = cached()
    request(gw.port, path="/rv")
    time.sleep(1.2)
    origin.delay = 0.5
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: request(gw.port, path="/rv"), range(30)))
    assert all(a.status == 200 and a.body == b"revalidated body" for a in answers)
    assert [s.header("if-none-match") for s in b.seen] == [None, '"r1"']


# -- stale-if-error ---------------------------------------------------------------------------------------
def test_stale_if_error_serves_the_copy_when_the_backend_is_gone(cached: Any, origin: Origin) -> None:
    origin.routes["/sie"] = (200, [("Cache-Control", "max-age=1, stale-if-error=60")], b"still here")
    origin.routes["/strict"] = (
        200,
        [("Cache-Control", "max-age=1, must-revalidate, stale-if-error=60")],
        b"x",
    )
    gw, b = cached()
    request(gw.port, path="/sie")
    request(gw.port, path="/strict")
    time.sleep(1.2)
    b.stop()
    stale = request(gw.port, path="/sie")
    assert stale.status == 200 and stale.body == b"still here"
    assert stale.header("x-cache-status") == "STALE"
    assert request(gw.port, path="/strict").status == 502  # must-revalidate: never stale


def test_stale_if_error_serves_the_copy_when_the_backend_times_out(
    backend: Callable[..., Backend], gateway: Callable[..., Gateway], origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/t"] = (200, [("Cache-Control", "max-age=1, stale-if-error=60")], b"before")
    b = backend(origin.respond)
    config = cache_config(b, tmp_path)
    config["services"][0]["read_timeout"] = "300ms"
    gw = gateway(config)
    request(gw.port, path="/t")
    time.sleep(1.2)
    origin.delay = 2.0  # slower than the read timeout
    stale = request(gw.port, path="/t")
    assert stale.status == 200 and stale.body == b"before" and stale.header("x-cache-status") == "STALE"
    assert request(gw.port, path="/uncached").status == 504  # nothing to fall back on


def test_stale_if_error_serves_the_copy_when_no_target_is_healthy(
    backend: Callable[..., Backend], gateway: Callable[..., Gateway], origin: Origin, tmp_path: Path
) -> None:
    origin.routes["/h"] = (200, [("Cache-Control", "max-age=1")], b"healthy once")
    b = backend(origin.respond)
    config = cache_config(b, tmp_path, stale_if_error="1m")
    config["upstreams"] = [
        {
            "name": "pool",
            "targets": [{"target": f"127.0.0.1:{b.port}"}],
            "healthchecks": {"active": {"http_path": "/health", "interval": 0.2, "unhealthy_threshold": 1}},
        }
    ]
    config["services"] = [{"name": "backend", "upstream": "pool"}]
    origin.routes["/health"] = (200, [], b"ok")
    gw = gateway(config)
    assert request(gw.port, path="/h").body == b"healthy once"
    time.sleep(1.2)
    origin.routes["/health"] = (500, [], b"down")
    origin.routes["/other"] = (200, [], b"not cacheable")
    assert wait_until(lambda: request(gw.port, path="/other").status == 503, 10)  # marked down
    stale = request(gw.port, path="/h")
    assert stale.status == 200 and stale.body == b"healthy once" and stale.header("x-cache-status") == "STALE"


def test_stale_if_error_serves_the_copy_on_a_5xx(cached: Any, origin: Origin) -> None:
    origin.routes["/e"] = (200, [("Cache-Control", "max-age=1")], b"good")
    gw, _b = cached(stale_if_error="1m")
    request(gw.port, path="/e")
    time.sleep(1.2)
    origin.routes["/e"] = (503, [], b"down")
    stale = request(gw.port, path="/e")
    assert stale.status == 200 and stale.body == b"good" and stale.header("x-cache-status") == "STALE"


def test_stale_while_revalidate_answers_stale_and_refreshes_in_the_background(
    cached: Any, origin: Origin
) -> None:
    state = {"n": 0}

    def answer(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        state["n"] += 1
        return 200, [("Cache-Control", "max-age=1, stale-while-revalidate=60")], b"v%d" % state["n"]

    origin.routes["/swr"] = (0, [], answer)  # type: ignore[assignment]
    gw, b = cached()
    assert request(gw.port, path="/swr").body == b"v1"
    time.sleep(1.2)
    stale = request(gw.port, path="/swr")
    assert stale.header("x-cache-status") == "STALE" and stale.body == b"v1"
    assert wait_until(lambda: count(b, "/swr") == 2, 5)
    assert wait_until(lambda: request(gw.port, path="/swr").body == b"v2", 5)
    assert count(b, "/swr") == 2
