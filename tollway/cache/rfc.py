"""RFC 9111 (HTTP caching) for a shared cache, as pure functions: no I/O, no clock, no gateway.

Header fields come in as a list of ``(name, value)`` byte pairs, as the gateway has them; times are
seconds since the epoch, passed in by the caller. Each function cites the section it implements;
docs/plugins/proxy-cache.md lists what is followed and what is deliberately not.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Iterable, Mapping

Headers = list[tuple[bytes, bytes]]
Directives = dict[str, str | None]

# §3: methods this cache understands and stores (HEAD is answered from a stored GET, §4.3.5 spirit).
STORABLE_METHODS = frozenset({b"GET"})
SERVABLE_METHODS = frozenset({b"GET", b"HEAD"})
UNSAFE_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})  # RFC 9110 9.2.1: not safe
# RFC 9110 15.1: status codes heuristically cacheable ("cacheable by default"). 206 is left out: this
# cache stores only complete responses and makes ranges from them itself.
CACHEABLE_BY_DEFAULT = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Status codes whose semantics this cache understands (§5.2.2.3 must-understand): those of RFC 9110.
UNDERSTOOD_STATUS = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 406, 408}
    | {409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422, 426, 500, 501, 502, 503, 504, 505}
)
# §4.2.4 / RFC 5861 §4: statuses that count as the backend failing (stale-if-error applies).
ERROR_STATUS = frozenset({500, 502, 503, 504})
# §3.1 and RFC 9110 7.6.1: never stored (hop-by-hop, or meaningful only on the wire).
UNSTORED_FIELDS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"content-length",  # recomputed from the stored body (and never updated by a 304, §3.2)
        b"age",  # recomputed on every hit (§4.2.3)
    }
)
# §4.1: header fields a 304 from the cache carries (RFC 9110 15.4.5).
NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)
MAX_DELTA = 2147483648  # §1.2.2: a delta-seconds overflow is taken as 2^31
MAX_HEURISTIC = 86400.0  # heuristic freshness never exceeds a day

_DIRECTIVE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)')


# -- field parsing -------------------------------------------------------------------------------------
def field(headers: Headers, lname: bytes) -> bytes | None:
    """Every value of a field, combined with commas (RFC 9110 5.3); None if absent. `lname` lowercase."""
    values = [v for n, v in headers if n.lower() == lname]
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


def parse_cache_control(value: bytes | str | None) -> Directives:
    """``max-age=60, no-cache="set-cookie", public`` → ``{"max-age": "60", "no-cache": "set-cookie",
    "public": None}``. Names are case-insensitive (§5.2); quoted strings unquoted; the first of a
    repeated directive wins; garbage between commas is skipped."""
    if not value:
        return {}
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    found: Directives = {}
    pos = 0
    while pos < len(text):
        match = _DIRECTIVE.match(text, pos)
        if match is None:  # not a directive: skip to the next comma
            comma = text.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        pos = match.end()
        name = match.group(1).lower()
        raw = match.group(2)
        if raw is not None:
            raw = raw.strip()
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        found.setdefault(name, raw)
    return found


def delta_seconds(value: str | None) -> int | None:
    """§1.2.2: a non-negative integer; None if missing or invalid; huge values become 2^31."""
    if value is None or not value.isdigit():
        return None
    return min(int(value), MAX_DELTA)


def parse_http_date(value: bytes | None) -> float | None:
    """RFC 9110 5.6.7: IMF-fixdate (and the obsolete formats email.utils accepts); None if invalid."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
    except (ValueError, TypeError, IndexError):
        return None
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError):
        return None


def format_http_date(when: float) -> bytes:
    return email.utils.formatdate(when, usegmt=True).encode()


# -- storing (§3) ---------------------------------------------------------------------------------------
def storable(
    method: bytes,
    status: int,
    request_cc: Directives,
    response_cc: Directives,
    response_headers: Headers,
    has_authorization: bool,
    heuristic: bool = False,
    default_ttl: float = 0.0,
) -> str | None:
    """§3: None if a shared cache may store this response, else why not (for Cache-Status)."""
    if method not in STORABLE_METHODS:
        return "method"
    if status < 200 or status in (206, 304):
        return "status"
    if "must-understand" in response_cc:
        if status not in UNDERSTOOD_STATUS:
            return "must-understand"
    elif "no-store" in response_cc:
        return "no-store"
    if "no-store" in request_cc:
        return "request no-store"
    if "private" in response_cc:
        return "private"
    if has_authorization and not ({"public", "s-maxage", "must-revalidate"} & response_cc.keys()):
        return "authorization"  # §3.5
    vary = field(response_headers, b"vary")
    if vary is not None and b"*" in [v.strip() for v in vary.split(b",")]:
        return "vary"  # Vary: * never matches a later request (§4.1)
    explicit = (
        "public" in response_cc
        or "max-age" in response_cc
        or "s-maxage" in response_cc
        or field(response_headers, b"expires") is not None
    )
    if explicit:
        return None
    if status in CACHEABLE_BY_DEFAULT and (heuristic or default_ttl > 0):
        return None
    return "no freshness"


# -- freshness and age (§4.2) ---------------------------------------------------------------------------
def freshness_lifetime(
    status: int,
    response_cc: Directives,
    headers: Headers,
    response_time: float,
    heuristic: bool = False,
    default_ttl: float = 0.0,
) -> float:
    """§4.2.1: s-maxage, then max-age, then Expires − Date; then (only for statuses cacheable by
    default, and only if configured) the heuristic of §4.2.2 or the operator's default TTL."""
    for name in ("s-maxage", "max-age"):
        if name in response_cc:
            seconds = delta_seconds(response_cc[name])
            return 0.0 if seconds is None else float(seconds)  # invalid: stale (§4.2.1)
    expires_field = field(headers, b"expires")
    if expires_field is not None:
        expires = parse_http_date(expires_field)
        if expires is None:
            return 0.0  # §5.3: an invalid Expires means "already expired"
        date = parse_http_date(field(headers, b"date")) or response_time
        return max(0.0, expires - date)
    if status not in CACHEABLE_BY_DEFAULT:
        return 0.0
    if heuristic:
        last_modified = parse_http_date(field(headers, b"last-modified"))
        if last_modified is not None:
            date = parse_http_date(field(headers, b"date")) or response_time
            return min(MAX_HEURISTIC, max(0.0, (date - last_modified) / 10))  # §4.2.2: 10% typical
    return max(0.0, default_ttl)


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """§4.2.3 corrected_initial_age: what the response's age was when it arrived."""
    age_value = delta_seconds(_first(field(headers, b"age"))) or 0
    date = parse_http_date(field(headers, b"date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    return max(apparent_age, corrected_age_value)


def current_age(initial: float, response_time: float, now: float) -> float:
    """§4.2.3: corrected_initial_age + resident_time."""
    return initial + max(0.0, now - response_time)


def age_field(age: float) -> bytes:
    return b"%d" % min(int(age), MAX_DELTA)


def _first(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.split(b",")[0].strip().decode("latin-1")


# -- reuse (§4, §4.2.4, RFC 5861) ----------------------------------------------------------------------
FRESH, STALE_SERVE, STALE_REVALIDATE, VALIDATE = "fresh", "stale", "swr", "validate"


def may_serve_stale(response_cc: Directives) -> bool:
    """§4.2.4: no-cache, must-revalidate, proxy-revalidate and s-maxage (§5.2.2.10: it implies
    proxy-revalidate for a shared cache) forbid ever serving this response stale."""
    return not ({"no-cache", "must-revalidate", "proxy-revalidate", "s-maxage"} & response_cc.keys())


def reuse(
    age: float,
    lifetime: float,
    response_cc: Directives,
    request_cc: Directives,
    swr: float = 0.0,
) -> str:
    """How a stored response may answer a request (§4, §5.2.1, RFC 5861 §3): FRESH (serve it),
    STALE_SERVE (serve it stale: the client's max-stale allows), STALE_REVALIDATE (serve it stale and
    refresh it in the background) or VALIDATE (ask the backend first). `swr` is the
    stale-while-revalidate window (the response's or the configured one)."""
    if "no-cache" in response_cc or "no-cache" in request_cc:
        return VALIDATE
    limit = lifetime
    max_age = delta_seconds(request_cc.get("max-age")) if "max-age" in request_cc else None
    if max_age is not None:
        limit = min(limit, float(max_age))
    min_fresh = delta_seconds(request_cc.get("min-fresh")) if "min-fresh" in request_cc else None
    if min_fresh is not None:
        limit -= min_fresh
    if age < limit:
        return FRESH
    stale_ok = may_serve_stale(response_cc)
    if stale_ok and "max-stale" in request_cc:
        raw = request_cc["max-stale"]
        allowed = delta_seconds(raw) if raw is not None else None
        if raw is None or (allowed is not None and age - lifetime <= allowed):
            return STALE_SERVE
    if stale_ok and max_age is None and min_fresh is None and age - lifetime < swr:
        return STALE_REVALIDATE
    return VALIDATE


def stale_if_error_ok(age: float, lifetime: float, response_cc: Directives, window: float) -> bool:
    """RFC 5861 §4: may this stored response answer when the backend fails? `window` is the
    response's stale-if-error or the configured one."""
    return may_serve_stale(response_cc) and age - lifetime <= window


def window(response_cc: Directives, name: str, configured: float) -> float:
    """A stale-while-revalidate / stale-if-error window: the response's directive, else config."""
    seconds = delta_seconds(response_cc.get(name)) if name in response_cc else None
    return float(seconds) if seconds is not None else configured


def request_directives(headers: Headers) -> Directives:
    """The request's Cache-Control; `Pragma: no-cache` counts as no-cache only without Cache-Control
    (§5.4)."""
    cc = field(headers, b"cache-control")
    if cc is not None:
        return parse_cache_control(cc)
    pragma = field(headers, b"pragma")
    if pragma is not None and b"no-cache" in pragma.lower():
        return {"no-cache": None}
    return {}


# -- validation (§4.3) ----------------------------------------------------------------------------------
def validators(stored: Headers) -> Headers:
    """§4.3.1: the conditional fields for revalidating a stored response (ETag preferred; both sent)."""
    out: Headers = []
    etag = field(stored, b"etag")
    if etag is not None:
        out.append((b"If-None-Match", etag))
    last_modified = field(stored, b"last-modified")
    if last_modified is not None:
        out.append((b"If-Modified-Since", last_modified))
    return out


def _etags(value: bytes) -> list[bytes]:
    return [t.strip() for t in value.split(b",") if t.strip()]


def _weak_equal(a: bytes, b: bytes) -> bool:
    return a.removeprefix(b"W/") == b.removeprefix(b"W/")


def not_modified(request: Headers, stored: Headers) -> bool:
    """§4.3.2 / RFC 9110 13.1.2-13.1.3: does the client's conditional GET/HEAD match the stored
    response (answer 304)? If-None-Match is evaluated with weak comparison and, when present, takes
    precedence over If-Modified-Since."""
    inm = field(request, b"if-none-match")
    if inm is not None:
        etag = field(stored, b"etag")
        if inm.strip() == b"*":
            return True
        return etag is not None and any(_weak_equal(t, etag) for t in _etags(inm))
    ims = parse_http_date(field(request, b"if-modified-since"))
    if ims is None:
        return False
    modified = parse_http_date(field(stored, b"last-modified")) or parse_http_date(field(stored, b"date"))
    return modified is not None and modified <= ims


def not_modified_headers(stored: Headers) -> Headers:
    """RFC 9110 15.4.5: the stored fields a 304 carries."""
    return [(n, v) for n, v in stored if n.lower() in NOT_MODIFIED_FIELDS]


def freshen(stored: Headers, update: Headers) -> Headers | None:
    """§4.3.4 / §3.2: the stored fields updated with a 304's, or None when the 304 does not select
    this stored response (its strong ETag differs). Content-Length and unstored fields never update."""
    new_etag = field(update, b"etag")
    old_etag = field(stored, b"etag")
    strong = new_etag is not None and not new_etag.startswith(b"W/")
    if strong and old_etag is not None and new_etag != old_etag:
        return None
    updated = {n.lower() for n, _ in update if n.lower() not in UNSTORED_FIELDS}
    merged = [(n, v) for n, v in stored if n.lower() not in updated]
    merged += [(n, v) for n, v in update if n.lower() in updated]
    return merged


def storable_fields(headers: Headers, connection: Iterable[bytes] = ()) -> Headers:
    """§3.1: the header fields kept with a stored response."""
    listed = {c.lower() for c in connection}
    return [(n, v) for n, v in headers if n.lower() not in UNSTORED_FIELDS and n.lower() not in listed]


# -- Vary (§4.1) ----------------------------------------------------------------------------------------
def vary_names(headers: Headers) -> tuple[bytes, ...]:
    """The request fields a response varies on, lowercase, sorted, without duplicates."""
    vary = field(headers, b"vary")
    if vary is None:
        return ()
    return tuple(sorted({v.strip().lower() for v in vary.split(b",") if v.strip()}))


def normalise_field(value: bytes | None) -> bytes:
    """§4.1 allows normalising: whitespace around commas and list order carry no meaning for the list
    fields requests vary on (Accept-*), and neither does case in their tokens."""
    if value is None:
        return b""
    items = sorted(part.strip().lower() for part in value.split(b","))
    return b",".join(items)


def vary_values(request: Headers, names: Iterable[bytes]) -> list[bytes]:
    return [normalise_field(field(request, name)) for name in names]


# -- ranges (RFC 9110 14) -------------------------------------------------------------------------------
_RANGE = re.compile(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def byte_range(value: bytes, length: int) -> tuple[int, int] | bool | None:
    """A single ``bytes=`` range against a body of `length`: (first, last) inclusive; None when the
    field is not one this cache answers (multiple ranges, another unit, bad syntax: the whole body is
    sent, which RFC 9110 14.2 allows); False when it cannot be satisfied (416)."""
    match = _RANGE.fullmatch(value)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0:
            return False
        return (max(0, length - suffix), length - 1) if length else False
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid range-spec: ignore the field
    if first >= length:
        return False
    last = int(last_text) if last_text else length - 1
    return first, min(last, length - 1)


def if_range_matches(value: bytes, stored: Headers) -> bool:
    """RFC 9110 13.1.5: If-Range with a strong ETag, or with an exact Last-Modified date."""
    value = value.strip()
    if value.startswith((b'"', b"W/")):
        etag = field(stored, b"etag")
        return (
            etag is not None and not value.startswith(b"W/") and not etag.startswith(b"W/") and etag == value
        )
    last_modified = field(stored, b"last-modified")
    return last_modified is not None and last_modified.strip() == value


# -- invalidation (§4.4) --------------------------------------------------------------------------------
def invalidated_targets(method: bytes, status: int, response: Headers, host: str) -> list[str]:
    """§4.4: after a non-error response to an unsafe method, the target URI is invalid, and so are the
    URIs in Location and Content-Location when they name the same host. Returns origin-form targets
    (path and query) besides the request's own (the caller adds that one)."""
    if method not in UNSAFE_METHODS or not (200 <= status < 400):
        return []
    out: list[str] = []
    for name in (b"location", b"content-location"):
        value = field(response, name)
        if value is None:
            continue
        target = same_host_target(value.decode("latin-1").strip(), host)
        if target is not None and target not in out:
            out.append(target)
    return out


def same_host_target(uri: str, host: str) -> str | None:
    if uri.startswith("/") and not uri.startswith("//"):
        return uri
    for scheme in ("http://", "https://"):
        if uri.lower().startswith(scheme):
            rest = uri[len(scheme) :]
            authority, slash, path = rest.partition("/")
            name = authority.rpartition("@")[2].lower()
            name = name.rpartition(":")[0] if ":" in name and not name.endswith("]") else name
            if name != host:
                return None
            return "/" + path if slash else "/"
    return None


# -- Cache-Status (RFC 9211) ----------------------------------------------------------------------------
def cache_status(
    name: str, hit: bool, fwd: str = "", stored: bool = False, ttl: float | None = None
) -> bytes:
    """``Tollway; hit; ttl=52`` or ``Tollway; fwd=uri-miss; stored``."""
    parts = [name]
    if hit:
        parts.append("hit")
    if fwd:
        parts.append(f"fwd={fwd}")
    if stored:
        parts.append("stored")
    if ttl is not None:
        parts.append(f"ttl={math.floor(ttl)}")
    return "; ".join(parts).encode("latin-1")


def directives_from(headers: Headers) -> Directives:
    return parse_cache_control(field(headers, b"cache-control"))


def has_any(headers: Headers, names: Mapping[bytes, object] | frozenset[bytes]) -> bool:
    return any(n.lower() in names for n, _ in headers)
