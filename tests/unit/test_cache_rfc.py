"""RFC 9111 rules of tollway.cache.rfc and tollway.cache.serve, section by section (pure functions)."""

from __future__ import annotations

import pytest

from tollway.cache import keys, rfc, serve
from tollway.cache.entry import NO_CACHE, NO_STALE, VALIDATORS, Entry, Variants, decode, flags_for

H = list[tuple[bytes, bytes]]
DATE = b"Tue, 01 Dec 2026 10:00:00 GMT"
T = rfc.parse_http_date(DATE)
assert T is not None


def cc(value: str) -> rfc.Directives:
    return rfc.parse_cache_control(value)


# -- §5.2: Cache-Control parsing -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("max-age=60", {"max-age": "60"}),
        ("Max-Age=60, PUBLIC", {"max-age": "60", "public": None}),
        ('no-cache="Set-Cookie, X-Foo", private', {"no-cache": "Set-Cookie, X-Foo", "private": None}),
        ("max-age=60, max-age=10", {"max-age": "60"}),  # the first wins
        ("  s-maxage = 5 ,, ,must-revalidate", {"s-maxage": "5", "must-revalidate": None}),
        ('ext="a \\"q\\" b"', {"ext": 'a "q" b'}),
        ("", {}),
        (",,,", {}),
    ],
)
def test_parse_cache_control(value: str, expected: rfc.Directives) -> None:
    assert rfc.parse_cache_control(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0), ("60", 60), ("-1", None), ("1.5", None), ("abc", None), (None, None)]
)
def test_delta_seconds(value: str | None, expected: int | None) -> None:
    assert rfc.delta_seconds(value) == expected


def test_delta_seconds_overflow_is_2_to_the_31() -> None:
    assert rfc.delta_seconds("99999999999999999999") == 2**31


def test_http_dates() -> None:
    assert rfc.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == rfc.parse_http_date(
        b"Sun, 06 Nov 1994 08:49:37 GMT"
    )
    assert rfc.parse_http_date(b"not a date") is None
    assert rfc.parse_http_date(b"") is None
    assert rfc.parse_http_date(rfc.format_http_date(T)) == T


def test_fields_combine_repeated_lines() -> None:
    headers = [(b"Cache-Control", b"max-age=5"), (b"cache-control", b"public")]
    assert rfc.field(headers, b"cache-control") == b"max-age=5, public"
    assert rfc.directives_from(headers) == {"max-age": "5", "public": None}


# -- §3: storing -----------------------------------------------------------------------------------------
def storable(
    status: int = 200, response: str = "max-age=60", request: str = "", auth: bool = False, **kw
) -> str | None:
    headers: H = [(b"Cache-Control", response.encode())] if response else []
    headers += kw.pop("extra", [])
    return rfc.storable(b"GET", status, cc(request), cc(response), headers, auth, **kw)


def test_storable_basics() -> None:
    assert storable() is None
    assert rfc.storable(b"POST", 200, {}, cc("max-age=60"), [], False) == "method"
    assert rfc.storable(b"HEAD", 200, {}, cc("max-age=60"), [], False) == "method"
    assert storable(status=206) == "status"
    assert storable(status=304) == "status"
    assert storable(status=101) == "status"


@pytest.mark.parametrize(
    ("response", "reason"),
    [("no-store", "no-store"), ("max-age=60, no-store", "no-store"), ("private, max-age=60", "private")],
)
def test_response_directives_forbid_storing(response: str, reason: str) -> None:
    assert storable(response=response) == reason


def test_request_no_store_forbids_storing() -> None:
    assert storable(request="no-store") == "request no-store"


def test_must_understand_overrides_no_store_for_understood_status_only() -> None:
    assert storable(response="must-understand, no-store, max-age=60") is None
    assert storable(status=299, response="must-understand, no-store, max-age=60") == "must-understand"


def test_authorization_needs_public_s_maxage_or_must_revalidate() -> None:
    assert storable(auth=True) == "authorization"
    for response in ("public, max-age=60", "s-maxage=60", "must-revalidate, max-age=60"):
        assert storable(response=response, auth=True) is None


def test_storable_needs_explicit_freshness_or_configured_default() -> None:
    assert storable(response="") == "no freshness"
    assert storable(response="public") is None
    assert storable(response="", extra=[(b"Expires", DATE)]) is None
    assert storable(response="", default_ttl=10) is None
    assert storable(response="", heuristic=True) is None
    assert storable(status=201, response="", default_ttl=10) == "no freshness"  # not cacheable by default


def test_vary_star_is_not_storable() -> None:
    assert storable(extra=[(b"Vary", b"Accept, *")]) == "vary"


# -- §4.2: freshness and age ----------------------------------------------------------------------------
def lifetime(response: str = "", extra: H | None = None, status: int = 200, **kw) -> float:
    headers: H = [(b"Cache-Control", response.encode())] if response else []
    headers += extra or []
    return rfc.freshness_lifetime(status, cc(response), headers, T, **kw)


def test_freshness_lifetime_order() -> None:
    assert lifetime("s-maxage=10, max-age=20") == 10
    assert lifetime("max-age=20", [(b"Expires", rfc.format_http_date(T + 100))]) == 20
    assert lifetime("", [(b"Expires", rfc.format_http_date(T + 100)), (b"Date", DATE)]) == 100
    assert lifetime("", [(b"Expires", b"0")]) == 0  # invalid Expires: already expired
    assert lifetime("max-age=abc") == 0
    assert lifetime("") == 0


def test_heuristic_and_default_ttl() -> None:
    last_modified = [(b"Last-Modified", rfc.format_http_date(T - 1000)), (b"Date", DATE)]
    assert lifetime("", last_modified) == 0
    assert lifetime("", last_modified, heuristic=True) == 100
    assert (
        lifetime("", [(b"Last-Modified", rfc.format_http_date(T - 10**8)), (b"Date", DATE)], heuristic=True)
        == 86400
    )
    assert lifetime("", default_ttl=30) == 30
    assert lifetime("", status=201, default_ttl=30) == 0  # heuristics only for cacheable-by-default


def test_initial_and_current_age() -> None:
    # §4.2.3: the larger of apparent age (response time - Date) and Age + response delay
    assert rfc.initial_age([(b"Date", rfc.format_http_date(T - 30))], T - 2, T) == 30
    assert rfc.initial_age([(b"Age", b"100")], T - 2, T) == 102
    assert rfc.initial_age([(b"Date", rfc.format_http_date(T + 30))], T, T) == 0  # Date in the future
    assert rfc.current_age(10, T, T + 5) == 15
    assert rfc.age_field(15.9) == b"15"


# -- §4, §5.2.1, RFC 5861: reuse ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("age", "response", "asked", "swr", "expected"),
    [
        (5, "max-age=10", "", 0, rfc.FRESH),
        (10, "max-age=10", "", 0, rfc.VALIDATE),
        (5, "max-age=10, no-cache", "", 0, rfc.VALIDATE),
        (5, "max-age=10", "no-cache", 0, rfc.VALIDATE),
        (5, "max-age=10", "max-age=3", 0, rfc.VALIDATE),
        (5, "max-age=10", "max-age=6", 0, rfc.FRESH),
        (5, "max-age=10", "min-fresh=6", 0, rfc.VALIDATE),
        (5, "max-age=10", "min-fresh=4", 0, rfc.FRESH),
        (15, "max-age=10", "max-stale", 0, rfc.STALE_SERVE),
        (15, "max-age=10", "max-stale=10", 0, rfc.STALE_SERVE),
        (25, "max-age=10", "max-stale=10", 0, rfc.VALIDATE),
        (15, "max-age=10, must-revalidate", "max-stale", 0, rfc.VALIDATE),
        (15, "max-age=10, proxy-revalidate", "max-stale", 0, rfc.VALIDATE),
        (15, "s-maxage=10", "max-stale", 0, rfc.VALIDATE),
        (15, "max-age=10", "", 30, rfc.STALE_REVALIDATE),
        (45, "max-age=10", "", 30, rfc.VALIDATE),
        (15, "max-age=10, must-revalidate", "", 30, rfc.VALIDATE),
        (15, "max-age=10", "max-age=12", 30, rfc.VALIDATE),  # the client asked for a bound
    ],
)
def test_reuse(age: float, response: str, asked: str, swr: float, expected: str) -> None:
    response_cc = cc(response)
    life = rfc.freshness_lifetime(200, response_cc, [], T)
    assert rfc.reuse(age, life, response_cc, cc(asked), swr) == expected


def test_stale_if_error_and_windows() -> None:
    assert rfc.stale_if_error_ok(20, 10, {}, 30)
    assert not rfc.stale_if_error_ok(50, 10, {}, 30)
    assert not rfc.stale_if_error_ok(20, 10, cc("must-revalidate"), 30)
    assert rfc.window(cc("stale-if-error=5"), "stale-if-error", 60) == 5
    assert rfc.window({}, "stale-if-error", 60) == 60


def test_request_directives_and_pragma() -> None:
    assert rfc.request_directives([(b"Pragma", b"no-cache")]) == {"no-cache": None}
    assert rfc.request_directives([(b"Pragma", b"no-cache"), (b"Cache-Control", b"max-age=5")]) == {
        "max-age": "5"
    }
    assert rfc.request_directives([]) == {}


# -- §4.3: validation ------------------------------------------------------------------------------------
def test_validators_for_a_conditional_request() -> None:
    stored = [(b"ETag", b'"a"'), (b"Last-Modified", DATE)]
    assert rfc.validators(stored) == [(b"If-None-Match", b'"a"'), (b"If-Modified-Since", DATE)]
    assert rfc.validators([]) == []


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ([(b"If-None-Match", b'"a"')], True),
        ([(b"If-None-Match", b'W/"a"')], True),  # weak comparison
        ([(b"If-None-Match", b'"x", "a"')], True),
        ([(b"If-None-Match", b"*")], True),
        ([(b"If-None-Match", b'"b"')], False),
        ([(b"If-None-Match", b'"b"'), (b"If-Modified-Since", DATE)], False),  # INM takes precedence
        ([(b"If-Modified-Since", DATE)], True),
        ([(b"If-Modified-Since", rfc.format_http_date(T - 1))], False),
        ([(b"If-Modified-Since", b"garbage")], False),
        ([], False),
    ],
)
def test_not_modified(request_fields: H, expected: bool) -> None:
    stored = [(b"ETag", b'"a"'), (b"Last-Modified", DATE), (b"Content-Type", b"text/plain")]
    assert rfc.not_modified(request_fields, stored) is expected


def test_not_modified_headers_keep_only_what_a_304_carries() -> None:
    stored = [(b"ETag", b'"a"'), (b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=5")]
    assert rfc.not_modified_headers(stored) == [(b"ETag", b'"a"'), (b"Cache-Control", b"max-age=5")]


def test_freshen_updates_stored_fields_from_a_304() -> None:
    stored = [(b"ETag", b'"a"'), (b"Cache-Control", b"max-age=5"), (b"Content-Type", b"text/plain")]
    update = [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"0"), (b"X-New", b"1")]
    merged = rfc.freshen(stored, update)
    assert merged == [
        (b"ETag", b'"a"'),
        (b"Content-Type", b"text/plain"),
        (b"Cache-Control", b"max-age=60"),
        (b"X-New", b"1"),
    ]
    assert rfc.freshen(stored, [(b"ETag", b'"other"')]) is None  # selects another representation
    assert rfc.freshen(stored, [(b"ETag", b'W/"other"')]) is not None


def test_storable_fields_drop_hop_by_hop_and_connection_listed() -> None:
    headers = [
        (b"Connection", b"x-hop"),
        (b"X-Hop", b"1"),
        (b"Age", b"3"),
        (b"Content-Length", b"2"),
        (b"A", b"b"),
    ]
    assert rfc.storable_fields(headers, [b"X-Hop"]) == [(b"A", b"b")]


# -- §4.1: Vary ------------------------------------------------------------------------------------------
def test_vary_names_and_normalised_values() -> None:
    assert rfc.vary_names(
        [(b"Vary", b"Accept-Encoding, accept-language"), (b"vary", b"Accept-Encoding")]
    ) == (
        b"accept-encoding",
        b"accept-language",
    )
    assert rfc.vary_names([]) == ()
    assert rfc.normalise_field(b"gzip,  BR") == rfc.normalise_field(b"br, gzip")
    assert rfc.normalise_field(None) == b""
    assert rfc.vary_values([(b"Accept", b"a")], [b"accept", b"x"]) == [b"a", b""]


# -- RFC 9110 14: ranges ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"bytes=0-4", (0, 4)),
        (b"bytes=5-", (5, 9)),
        (b"bytes=-3", (7, 9)),
        (b"bytes=-30", (0, 9)),
        (b"bytes=8-100", (8, 9)),
        (b"bytes=10-", False),
        (b"bytes=-0", False),
        (b"bytes=5-2", None),
        (b"bytes=0-1,3-4", None),  # multiple ranges: the whole body
        (b"items=0-1", None),
        (b"bytes=-", None),
    ],
)
def test_byte_range(value: bytes, expected: object) -> None:
    assert rfc.byte_range(value, 10) == expected


def test_if_range() -> None:
    stored = [(b"ETag", b'"s"'), (b"Last-Modified", DATE)]
    assert rfc.if_range_matches(b'"s"', stored)
    assert not rfc.if_range_matches(b'W/"s"', stored)  # If-Range needs a strong comparison
    assert rfc.if_range_matches(DATE, stored)
    assert not rfc.if_range_matches(b"Wed, 02 Dec 2026 10:00:00 GMT", stored)


# -- §4.4: invalidation ----------------------------------------------------------------------------------
def test_invalidated_targets() -> None:
    response = [
        (b"Location", b"http://api.test:8000/users/2"),
        (b"Content-Location", b"/users/2/profile?x=1"),
    ]
    assert rfc.invalidated_targets(b"POST", 201, response, "api.test") == ["/users/2", "/users/2/profile?x=1"]
    assert rfc.invalidated_targets(b"POST", 500, response, "api.test") == []
    assert rfc.invalidated_targets(b"GET", 200, response, "api.test") == []
    assert rfc.invalidated_targets(b"PUT", 200, [(b"Location", b"https://other.test/x")], "api.test") == []
    assert rfc.same_host_target("//evil.test/x", "api.test") is None
    assert rfc.same_host_target("http://user@API.test", "api.test") == "/"


# -- RFC 9211: Cache-Status ------------------------------------------------------------------------------
def test_cache_status() -> None:
    assert rfc.cache_status("Tollway", True, ttl=52.7) == b"Tollway; hit; ttl=52"
    assert rfc.cache_status("Tollway", False, "uri-miss", stored=True) == b"Tollway; fwd=uri-miss; stored"


# -- answers from a stored response ----------------------------------------------------------------------
def entry(status: int = 200, body: bytes = b"0123456789", headers: H | None = None) -> Entry:
    fields = headers if headers is not None else [(b"ETag", b'"e"'), (b"Content-Type", b"text/plain")]
    return Entry(status, fields, body, T, 0, 60)


def test_answer_full_head_and_304() -> None:
    status, headers, body = serve.answer(entry(), [], b"GET", 7.2)
    assert status == 200 and body == b"0123456789" and (b"Age", b"7") in headers
    assert (b"Accept-Ranges", b"bytes") in headers
    status, headers, body = serve.answer(entry(), [(b"If-None-Match", b'"e"')], b"GET", 0)
    assert status == 304 and body == b"" and (b"ETag", b'"e"') in headers
    assert all(n != b"Content-Type" for n, _ in headers)
    status, _, _ = serve.answer(entry(), [(b"If-None-Match", b'"e"')], b"GET", 0, conditional=False)
    assert status == 200


def test_answer_ranges() -> None:
    status, headers, body = serve.answer(entry(), [(b"Range", b"bytes=1-3")], b"GET", 0)
    assert (status, body) == (206, b"123") and (b"Content-Range", b"bytes 1-3/10") in headers
    status, headers, _ = serve.answer(entry(), [(b"Range", b"bytes=50-")], b"GET", 0)
    assert status == 416 and (b"Content-Range", b"bytes */10") in headers
    status, _, body = serve.answer(entry(), [(b"Range", b"bytes=1-3"), (b"If-Range", b'"old"')], b"GET", 0)
    assert (status, body) == (200, b"0123456789")
    status, _, _ = serve.answer(entry(status=404), [(b"Range", b"bytes=1-3")], b"GET", 0)
    assert status == 404


# -- entries and keys ------------------------------------------------------------------------------------
def test_entry_round_trip_and_flags() -> None:
    original = Entry(203, [(b"A", b"1"), (b"B", b"x: y")], b"body\r\n", T, 3.5, 60, 10, 20, NO_CACHE)
    copy = decode(original.encode())
    assert isinstance(copy, Entry)
    assert (copy.status, copy.headers, copy.body) == (203, [(b"A", b"1"), (b"B", b"x: y")], b"body\r\n")
    assert (copy.response_time, copy.initial_age, copy.lifetime, copy.swr, copy.sie) == (T, 3.5, 60, 10, 20)
    assert copy.flags == NO_CACHE
    variants = decode(Variants((b"accept", b":consumer")).encode())
    assert isinstance(variants, Variants) and variants.names == (b"accept", b":consumer")
    assert decode(b"garbage") is None
    assert decode(original.encode()[:20]) is None
    assert flags_for(cc("no-cache"), [(b"ETag", b'"x"')]) == NO_CACHE | NO_STALE | VALIDATORS


def test_keep_for() -> None:
    fresh = Entry(200, [], b"", T, 0, 60, 0, 0, 0)
    assert fresh.keep_for(T, 0) == 60
    assert fresh.keep_for(T, 100) == 160
    strict = Entry(200, [], b"", T, 0, 60, 0, 0, NO_STALE)
    assert strict.keep_for(T, 100) == 60
    assert Entry(200, [], b"", T, 0, 60, 0, 0, NO_STALE | VALIDATORS).keep_for(T, 100) == 160


def test_keys() -> None:
    assert keys.normalise_query("b=2&utm_source=x&a=1", frozenset({"utm_source"}), sort=True) == "a=1&b=2"
    assert keys.normalise_query("b=2&a=1") == "b=2&a=1"
    assert keys.primary_key("http", "api.test", "/u", "a=1") == b"http://api.test/u?a=1"
    long = keys.primary_key("http", "h", "/" + "x" * 1000, "")
    assert len(long) < 511 and long.startswith(b"http://h/xxx")
    one = keys.secondary_key(b"http://h/u", b"n" * 8, [b"en"])
    assert one.startswith(b"http://h/u#v") and one != keys.secondary_key(b"http://h/u", b"m" * 8, [b"en"])
