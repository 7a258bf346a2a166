"""Rate-limit response fields, as pure functions of the limits and their decisions.

IETF (draft-ietf-httpapi-ratelimit-headers-10 and the editor's copy -11, 2026; Structured Field Lists):

    RateLimit-Policy: "minute";q=100;w=60, "day";q=5000;w=86400
    RateLimit: "minute";r=42;t=17, "day";r=4931;t=61023

- Item value: the policy name as an sf-string. `q` quota units, `w` window in whole seconds (omitted
  for a concurrency limit, which has `qu="concurrent-requests"` instead), optional `pk` partition key
  as an sf-binary (`:base64:`) — off by default, since it would echo the client's key.
- `r` available units (non-negative integer), `t` seconds (integer) within which no more than `r`
  can be used: the window's end, or, on a denied request, when a retry can pass — so `t` never points
  past Retry-After, which the draft asks for.

Legacy (what most clients parse today): X-RateLimit-Limit / -Remaining / -Reset of the most
restrictive limit, optionally also per limit with its name as suffix (Kong: X-RateLimit-Limit-Minute).
A 429 carries Retry-After (integer seconds, at least 1) and a JSON body in the gateway's error shape
({"message", "request_id"}) plus the draft's quota-exceeded problem fields.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence

import orjson

from tollway.state.spec import Decision, LimitSpec, most_restrictive

Header = tuple[bytes, bytes]
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"


def sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, with \\ and \" escaped (anything else becomes '?')."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return '"' + "".join(out) + '"'


_QUOTED: dict[str, str] = {}


def _quoted(name: str) -> str:
    """sf_string(name), cached: policy names are few and fixed per config."""
    quoted = _QUOTED.get(name)
    if quoted is None:
        if len(_QUOTED) >= 4096:
            _QUOTED.clear()
        quoted = _QUOTED[name] = sf_string(name)
    return quoted


def sf_binary(data: bytes) -> str:
    return ":" + base64.b64encode(data).decode() + ":"


def whole_seconds(value: float) -> int:
    """Non-negative whole seconds, rounded up (a client must not come back too early)."""
    if value <= 0 or math.isnan(value):
        return 0
    if math.isinf(value):
        return 2**31 - 1
    return math.ceil(value - 1e-9)


def policy_item(spec: LimitSpec, partition_key: bytes | None = None) -> str:
    """One RateLimit-Policy item: ``"minute";q=100;w=60``."""
    item = f"{_quoted(spec.name)};q={spec.limit}"
    if spec.algorithm == "concurrency":
        item += ';qu="concurrent-requests"'
    else:
        item += f";w={max(1, round(spec.window))}"
    if partition_key is not None:
        item += f";pk={sf_binary(partition_key)}"
    return item


def ratelimit_policy(specs: Sequence[LimitSpec], partition_key: bytes | None = None) -> str:
    """The RateLimit-Policy field value (constant per plugin and key: build it once per config)."""
    return ", ".join(policy_item(s, partition_key) for s in specs)


def ratelimit_item(decision: Decision, partition_key: bytes | None = None) -> str:
    """One RateLimit item: ``"minute";r=42;t=17``."""
    spec = decision.spec
    remaining = decision.remaining if decision.remaining > 0 else 0
    if spec.algorithm == "concurrency":
        item = f"{_quoted(spec.name)};r={remaining}"
    else:  # one f-string: built once, where appending to it would copy it again
        after = decision.reset_after if decision.allowed else decision.retry_after
        item = f"{_quoted(spec.name)};r={remaining};t={whole_seconds(after)}"
    if partition_key is not None:
        item += f";pk={sf_binary(partition_key)}"
    return item


def ratelimit(decisions: Sequence[Decision], partition_key: bytes | None = None) -> str:
    """The RateLimit field value: one item per limit decided for this request."""
    return ", ".join(ratelimit_item(d, partition_key) for d in decisions)


def retry_after(decisions: Sequence[Decision]) -> str:
    """Retry-After for a denied request: the longest wait among the denying limits, at least 1 s."""
    waits = [d.retry_after for d in decisions if not d.allowed]
    return str(max(1, whole_seconds(max(waits, default=1.0))))


def legacy_headers(decisions: Sequence[Decision], per_limit: bool = False) -> list[Header]:
    """X-RateLimit-Limit/-Remaining/-Reset of the most restrictive decision; with `per_limit`, also
    X-RateLimit-Limit-<Name> and X-RateLimit-Remaining-<Name> for each limit."""
    if not decisions:
        return []
    top = most_restrictive(list(decisions))
    after = top.reset_after if top.allowed else top.retry_after
    headers = [
        (b"X-RateLimit-Limit", b"%d" % top.limit),
        (b"X-RateLimit-Remaining", b"%d" % max(0, top.remaining)),
        (b"X-RateLimit-Reset", b"%d" % whole_seconds(after)),
    ]
    if per_limit:
        for d in decisions:
            suffix = _header_token(d.spec.name)
            headers.append((b"X-RateLimit-Limit-" + suffix, b"%d" % d.limit))
            headers.append((b"X-RateLimit-Remaining-" + suffix, b"%d" % max(0, d.remaining)))
    return headers


def response_headers(
    decisions: Sequence[Decision],
    *,
    ietf: bool = True,
    legacy: bool = False,
    per_limit: bool = False,
    policy_value: str | None = None,
    partition_key: bytes | None = None,
) -> list[Header]:
    """Every rate-limit header for a response (allowed or denied). `policy_value` is the prebuilt
    RateLimit-Policy value (`ratelimit_policy`), else built from the decisions."""
    headers: list[Header] = []
    if not decisions:
        return headers
    if ietf:
        policy = policy_value or ratelimit_policy([d.spec for d in decisions], partition_key)
        headers.append((b"RateLimit-Policy", policy.encode()))
        headers.append((b"RateLimit", ratelimit(decisions, partition_key).encode()))
    if legacy:
        headers.extend(legacy_headers(decisions, per_limit))
    if any(not d.allowed for d in decisions):
        headers.append((b"Retry-After", retry_after(decisions).encode()))
    return headers


def denial_body(
    decisions: Sequence[Decision],
    request_id: str = "",
    status: int = 429,
    message: str = "rate limit exceeded",
) -> tuple[int, bytes]:
    """(status, JSON body) for a denied request: `status` (429) with `message` when over a limit, 503
    when a limit could not be checked and fails closed."""
    limited_status, limited_message = status, message
    denied = [d for d in decisions if not d.allowed]
    unavailable = any(d.unavailable for d in denied)
    wait = int(retry_after(decisions))
    names = [d.spec.name for d in denied]
    if unavailable:
        status = 503
        body = {
            "message": "rate limit could not be checked; try again later",
            "request_id": request_id,
            "type": REDUCED_CAPACITY,
            "title": "Temporary Reduced Capacity",
            "violated-policies": names,
            "retry_after": wait,
        }
    else:
        status = limited_status
        body = {
            "message": limited_message,
            "request_id": request_id,
            "type": QUOTA_EXCEEDED,
            "title": "Quota Exceeded",
            "violated-policies": names,
            "retry_after": wait,
        }
    return status, orjson.dumps(body)


def _header_token(name: str) -> bytes:
    """A policy name as a header-name suffix: "minute" -> b"Minute", "per user" -> b"Per-User"."""
    parts = "".join(ch if ch.isascii() and ch.isalnum() else " " for ch in name).split()
    return "-".join(p[:1].upper() + p[1:] for p in parts).encode() or b"Limit"
