"""The trace id pool (one slice per new trace) and the ids an exchange reads back from its traceparent
line; the request id handed out as its whole header line."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tollway.observability.tracecontext import IdPool, TraceSettings
from tollway.proxy.exchange import Exchange, RequestIds

PAIR = re.compile(rb"([0-9a-f]{32})-([0-9a-f]{16})")
LINE = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\r\n")


def zeros_first() -> Callable[[int], bytes]:
    """A random source whose first draw is all zeros: every id in it would be invalid."""
    calls: list[int] = []

    def draw(size: int) -> bytes:
        calls.append(size)
        if len(calls) == 1:
            return bytes(size)
        return bytes((i * 7 + len(calls)) % 256 for i in range(size))

    return draw


def test_pairs_are_unique_lowercase_hex_across_refills() -> None:
    pool = IdPool()
    pairs = [pool.pair() for _ in range(1000)]  # ~8 refills of 128
    assert all(PAIR.fullmatch(p) for p in pairs)
    assert len({p[:32] for p in pairs}) == 1000 and len({p[33:] for p in pairs}) == 1000


def test_a_refill_with_an_all_zero_id_is_drawn_again() -> None:
    pool = IdPool(zeros_first())
    pairs = [pool.pair() for _ in range(128)]
    assert all(p[:32] != b"0" * 32 and p[33:] != b"0" * 16 for p in pairs)
    assert pool.take(16) != b"0" * 16


def test_consecutive_pairs_share_no_digits() -> None:
    # Pair k's span id and pair k+1's trace id come from one 48-digit group: both must be whole.
    pool = IdPool()
    buf_pairs = [pool.pair() for _ in range(128)]
    joined = b"".join(p[:32] + p[33:] for p in buf_pairs)
    assert len(joined) == 128 * 48 and joined == pool.buf[16 : 16 + 128 * 49].replace(b"-", b"")


@pytest.mark.parametrize(
    ("enabled", "ratio", "flag"), [(False, 0.0, b"01"), (True, 1.0, b"01"), (True, 0.0, b"00")]
)
def test_a_new_trace_is_one_line_and_its_ids_are_read_from_it(
    exchange: Callable[..., Exchange], enabled: bool, ratio: float, flag: bytes
) -> None:
    settings = TraceSettings(enabled=enabled, propagate=True, sample_ratio=ratio)
    ex = exchange()
    parts: list[bytes] = []
    settings.add_header(ex, parts)
    assert len(parts) == 1 and parts[0] is ex.trace_line
    m = LINE.fullmatch(parts[0])
    assert m is not None and m.group(3) == flag and ex.sampled == (flag == b"01")
    assert ex.trace_id == m.group(1) and ex.span_id == m.group(2)
    again: list[bytes] = []
    settings.add_header(ex, again)  # a retried request's head: the same line
    assert again == parts


def test_a_continued_trace_gets_a_new_span_id_from_the_pool(exchange: Callable[..., Exchange]) -> None:
    settings = TraceSettings(enabled=True, propagate=True, sample_ratio=0.0)
    ex = exchange(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    line = settings.start(ex)
    m = LINE.fullmatch(line)
    assert m is not None and m.group(1) == b"4bf92f3577b34da6a3ce929d0e0e4736" and m.group(3) == b"00"
    assert ex.span_id == m.group(2) != b"00f067aa0ba902b7" and ex.parent_span_id == b"00f067aa0ba902b7"


def test_ids_set_directly_win_and_are_empty_before_a_line_exists(exchange: Callable[..., Exchange]) -> None:
    ex = exchange()
    assert ex.trace_id == b"" and ex.span_id == b""
    ex.trace_id, ex.span_id = b"a" * 32, b"b" * 16
    assert (ex.trace_id, ex.span_id) == (b"a" * 32, b"b" * 16)


def test_request_ids_come_as_their_header_line() -> None:
    ids = RequestIds(b"0123456789abcdef")
    lines = [ids.next_line() for _ in range(300)]
    assert lines[0] == b"X-Request-Id: 0123456789abcdef0000000000000001\r\n"
    assert lines[255] == b"X-Request-Id: 0123456789abcdef0000000000000100\r\n"
    assert ids.next() == b"0123456789abcdef000000000000012d"  # the 301st, alone
