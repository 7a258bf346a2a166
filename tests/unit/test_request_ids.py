"""Request ids: 32 lowercase hex digits, a per-process prefix and a counter (like nginx's $request_id)."""

from __future__ import annotations

import re

from tollway.proxy.exchange import RequestIds


def test_ids_are_the_prefix_and_a_16_digit_hex_counter() -> None:
    ids = RequestIds(b"0123456789abcdef")
    taken = [ids.next() for _ in range(300)]
    assert all(re.fullmatch(rb"0123456789abcdef[0-9a-f]{16}", i) for i in taken)
    assert taken[0] == b"0123456789abcdef0000000000000001"
    assert taken[255] == b"0123456789abcdef0000000000000100"
    assert len(set(taken)) == len(taken)


def test_the_counter_keeps_16_digits_up_to_its_last_value() -> None:
    ids = RequestIds(b"a" * 16)
    ids._counter = 2**64 - 2
    assert ids.next() == b"a" * 16 + b"f" * 16
