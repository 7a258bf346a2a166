"""W3C trace context by hand: parsing, continuing, starting, sampling, the header sent upstream."""

from __future__ import annotations

import re

import pytest

from tollway.observability.tracecontext import INVALID, IdPool, TraceSettings, parse_traceparent
from tollway.proxy.exchange import Exchange

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = b"00f067aa0ba902b7"
SAMPLED = b"00-" + TRACE + b"-" + SPAN + b"-01"
UNSAMPLED = b"00-" + TRACE + b"-" + SPAN + b"-00"
HEADER = re.compile(rb"^traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\r\n$")


def header(settings: TraceSettings, ex: Exchange) -> bytes:
    parts: list[bytes] = []
    settings.add_header(ex, parts)
    return b"".join(parts)


@pytest.mark.parametrize(
    "value",
    [
        SAMPLED,
        UNSAMPLED,
        b"01-" + TRACE + b"-" + SPAN + b"-01-future-fields",  # a later version may append fields
        b"cc-" + TRACE + b"-" + SPAN + b"-09",  # unknown flags: only the sampled bit counts
    ],
)
def test_valid_traceparents_parse(value):
    parsed = parse_traceparent(value)
    assert parsed is not None
    assert parsed[0] == TRACE and parsed[1] == SPAN


@pytest.mark.parametrize(
    "value",
    [
        b"",
        INVALID,
        SAMPLED + b"-extra",  # version 00 is exactly 55 characters
        b"ff-" + TRACE + b"-" + SPAN + b"-01",  # version ff is forbidden
        b"00-" + TRACE.upper() + b"-" + SPAN + b"-01",  # uppercase hex is invalid
        b"00-" + b"0" * 32 + b"-" + SPAN + b"-01",  # all-zero trace id
        b"00-" + TRACE + b"-" + b"0" * 16 + b"-01",  # all-zero span id
        b"00-" + TRACE[:-1] + b"g-" + SPAN + b"-01",
        b"00_" + TRACE + b"-" + SPAN + b"-01",
        b"00-" + TRACE + b"-" + SPAN + b"-1",
        b"01-" + TRACE + b"-" + SPAN + b"-01x",  # a later version's extra fields start with "-"
    ],
)
def test_invalid_traceparents_are_rejected(value):
    assert parse_traceparent(value) is None


def test_client_trace_is_continued_with_a_new_span_for_the_gateway_hop(exchange):
    settings = TraceSettings(enabled=True, propagate=True, sample_ratio=0.0)
    ex = exchange(SAMPLED, b"vendor=abc,other=1")
    line = header(settings, ex)
    first, second = line.split(b"\r\n", 1)
    m = HEADER.match(first + b"\r\n")
    assert m is not None
    assert m.group(1) == TRACE  # same trace
    assert m.group(2) != SPAN and m.group(2) == ex.span_id  # our span, sent as the backend's parent
    assert m.group(3) == b"01"  # the client's sampled flag wins over the ratio
    assert ex.parent_span_id == SPAN
    assert ex.sampled
    assert second == b"tracestate: vendor=abc,other=1\r\n"


def test_client_unsampled_flag_is_followed_even_at_ratio_one(exchange):
    settings = TraceSettings(enabled=True, propagate=True, sample_ratio=1.0)
    ex = exchange(UNSAMPLED)
    m = HEADER.match(header(settings, ex))
    assert m is not None and m.group(3) == b"00" and m.group(1) == TRACE
    assert not ex.sampled


@pytest.mark.parametrize(("ratio", "flag"), [(1.0, b"01"), (0.0, b"00")])
def test_new_trace_is_started_and_sampled_by_ratio(exchange, ratio, flag):
    settings = TraceSettings(enabled=True, propagate=True, sample_ratio=ratio)
    ex = exchange()
    m = HEADER.match(header(settings, ex))
    assert m is not None
    assert m.group(1) == ex.trace_id and m.group(2) == ex.span_id and m.group(3) == flag
    assert ex.parent_span_id == b""


def test_sampling_ratio_is_roughly_honoured(exchange):
    settings = TraceSettings(enabled=True, propagate=True, sample_ratio=0.25)
    sampled = 0
    for _ in range(4000):
        ex = exchange()
        settings.start(ex)
        sampled += ex.sampled
    assert 700 < sampled < 1300


def test_invalid_client_header_starts_a_new_trace_and_drops_tracestate(exchange):
    settings = TraceSettings(enabled=True, propagate=True, sample_ratio=1.0)
    ex = exchange(b"00-garbage", b"vendor=abc")
    line = header(settings, ex)
    assert HEADER.match(line) is not None
    assert ex.trace_id != TRACE and b"tracestate" not in line


def test_tracing_disabled_passes_the_client_trace_on_unchanged(exchange):
    settings = TraceSettings(enabled=False, propagate=True, sample_ratio=0.0)
    ex = exchange(UNSAMPLED, b"k=v")
    assert header(settings, ex) == b"traceparent: " + UNSAMPLED + b"\r\ntracestate: k=v\r\n"
    assert ex.trace_id == TRACE and ex.span_id == SPAN


def test_tracing_disabled_still_starts_a_trace_marked_sampled(exchange):
    # Unsampled would switch tracing off in backends whose sampler follows the parent.
    settings = TraceSettings(enabled=False, propagate=True, sample_ratio=0.0)
    ex = exchange()
    m = HEADER.match(header(settings, ex))
    assert m is not None and m.group(3) == b"01"


def test_propagate_off_forwards_what_the_client_sent(exchange):
    settings = TraceSettings(enabled=False, propagate=False, sample_ratio=1.0)
    assert header(settings, exchange(SAMPLED)) == b"traceparent: " + SAMPLED + b"\r\n"
    assert header(settings, exchange()) == b""
    assert header(settings, exchange(INVALID)) == b""


def test_ids_are_unique_lowercase_hex_across_pool_refills():
    pool = IdPool()
    ids = {pool.take(32) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids)
