"""How request header fields are sorted (tollway.protocol.request): the special ones by name in any case,
the others forwarded as they are."""

from __future__ import annotations

from tollway.protocol import request
from tollway.protocol.request import ORDINARY_FIELD, SPECIAL_FIELDS, field_kind


def test_special_fields_in_any_case() -> None:
    for name, kind in SPECIAL_FIELDS.items():
        for spelling in (name, name.upper(), name.title()):
            assert field_kind(spelling) == kind
            assert field_kind(spelling) == kind  # the second time from the cache by spelling


def test_other_fields_are_ordinary() -> None:
    for name in (b"User-Agent", b"accept", b"X-Forwarded-Hostx", b"Hostname", b""):
        assert field_kind(name) == ORDINARY_FIELD
        assert field_kind(name) == ORDINARY_FIELD


def test_the_cache_is_bounded() -> None:
    for i in range(3000):
        assert field_kind(b"X-Field-%d" % i) == ORDINARY_FIELD
    assert len(request._KIND_BY_NAME) <= 1024
    assert field_kind(b"HOST") == SPECIAL_FIELDS[b"host"]
