"""RateLimit / RateLimit-Policy (IETF httpapi draft), legacy X-RateLimit-*, Retry-After, 429/503 bodies."""

from __future__ import annotations

import orjson

from tollway.state.headers import (
    denial_body,
    legacy_headers,
    policy_item,
    ratelimit,
    ratelimit_policy,
    response_headers,
    retry_after,
    sf_string,
)
from tollway.state.spec import Decision, LimitSpec

MINUTE = LimitSpec("minute", 100, 60)
DAY = LimitSpec("day", 5000, 86400, "sliding")
CONC = LimitSpec("inflight", 10, 30, "concurrency")


def test_policy_field_is_a_structured_list_of_items() -> None:
    assert ratelimit_policy([MINUTE, DAY]) == '"minute";q=100;w=60, "day";q=5000;w=86400'
    assert policy_item(CONC) == '"inflight";q=10;qu="concurrent-requests"'
    assert policy_item(LimitSpec("fast", 5, 0.5)) == '"fast";q=5;w=1'  # whole seconds, at least 1
    assert policy_item(MINUTE, partition_key=b"alice") == '"minute";q=100;w=60;pk=:YWxpY2U=:'


def test_ratelimit_field_uses_reset_when_allowed_and_retry_when_denied() -> None:
    allowed = Decision(True, 100, 42, 16.2, 0.0, MINUTE)
    denied = Decision(False, 5000, 0, 86000.0, 12.5, DAY)
    assert ratelimit([allowed, denied]) == '"minute";r=42;t=17, "day";r=0;t=13'
    assert ratelimit([Decision(True, 10, 3, 0.0, 0.0, CONC)]) == '"inflight";r=3'


def test_sf_string_escapes() -> None:
    assert sf_string('per "user"\\x') == '"per \\"user\\"\\\\x"'
    assert sf_string("caf\u00e9") == '"caf?"'


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after([Decision(False, 1, 0, 0.2, 0.2, MINUTE)]) == "1"
    assert retry_after([Decision(False, 1, 0, 3.01, 3.01, MINUTE), Decision(False, 1, 0, 9, 7.5, DAY)]) == "8"


def test_legacy_headers_pick_the_most_restrictive() -> None:
    decisions = [Decision(True, 100, 90, 30.0, 0.0, MINUTE), Decision(True, 5000, 10, 500.0, 0.0, DAY)]
    assert legacy_headers(decisions) == [
        (b"X-RateLimit-Limit", b"5000"),
        (b"X-RateLimit-Remaining", b"10"),
        (b"X-RateLimit-Reset", b"500"),
    ]
    per = dict(legacy_headers(decisions, per_limit=True))
    assert per[b"X-RateLimit-Limit-Minute"] == b"100" and per[b"X-RateLimit-Remaining-Day"] == b"10"


def test_response_headers_on_a_denial() -> None:
    decisions = [Decision(False, 100, 0, 20.0, 20.0, MINUTE)]
    headers = dict(response_headers(decisions, legacy=True))
    assert headers[b"RateLimit-Policy"] == b'"minute";q=100;w=60'
    assert headers[b"RateLimit"] == b'"minute";r=0;t=20'
    assert headers[b"Retry-After"] == b"20"
    assert headers[b"X-RateLimit-Remaining"] == b"0"
    allowed = dict(response_headers([Decision(True, 100, 5, 20.0, 0.0, MINUTE)]))
    assert b"Retry-After" not in allowed and b"X-RateLimit-Limit" not in allowed


def test_denial_bodies() -> None:
    status, body = denial_body([Decision(False, 100, 0, 20.0, 20.0, MINUTE)], "req-1")
    data = orjson.loads(body)
    assert status == 429
    assert data["message"] == "rate limit exceeded" and data["request_id"] == "req-1"
    assert data["violated-policies"] == ["minute"] and data["retry_after"] == 20
    assert data["type"].endswith("#quota-exceeded")
    status, body = denial_body([Decision(False, 100, 0, 1.0, 1.0, MINUTE, "fail-closed")], "req-2")
    assert status == 503 and orjson.loads(body)["type"].endswith("#temporary-reduced-capacity")
