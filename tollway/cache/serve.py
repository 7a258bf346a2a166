"""What the cache answers from a stored response, as a pure function: a full copy, a 304 for a
client's matching conditional request (§4.3.2), a 206/416 for a range (RFC 9110 14), with Age (§5.1).
HEAD is a GET answer without its body: the gateway drops the body when it writes a HEAD answer."""

from __future__ import annotations

from tollway.cache import rfc
from tollway.cache.entry import Entry

Answer = tuple[int, rfc.Headers, bytes]


def answer(entry: Entry, request: rfc.Headers, method: bytes, age: float, conditional: bool = True) -> Answer:
    """The (status, header fields, body) to send for `request` from `entry`, `age` seconds old.
    `conditional=False` ignores the client's conditional fields (they were answered already)."""
    headers = [*entry.headers, (b"Age", rfc.age_field(age))]
    status = entry.status
    special = _special_fields(request)  # one pass over the request: most have none of these fields
    if special & _CONDITIONAL and conditional and status == 200 and rfc.not_modified(request, entry.headers):
        return 304, [*rfc.not_modified_headers(entry.headers), (b"Age", rfc.age_field(age))], b""
    body = entry.body
    if status != 200 or method != b"GET":
        return status, headers, body
    headers.append((b"Accept-Ranges", b"bytes"))
    range_field = rfc.field(request, b"range") if special & _RANGE else None
    if range_field is None:
        return status, headers, body
    if_range = rfc.field(request, b"if-range")
    if if_range is not None and not rfc.if_range_matches(if_range, entry.headers):
        return status, headers, body
    length = len(body)
    span = rfc.byte_range(range_field, length)
    if span is None:
        return status, headers, body
    if span is False:
        return 416, [*headers, (b"Content-Range", b"bytes */%d" % length)], b""
    first, last = span  # type: ignore[misc]
    headers.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, length)))
    return 206, headers, body[first : last + 1]


_CONDITIONAL, _RANGE = 1, 2
_SPECIAL = {b"if-none-match": _CONDITIONAL, b"if-modified-since": _CONDITIONAL, b"range": _RANGE}


def _special_fields(request: rfc.Headers) -> int:
    found = 0
    for name, _ in request:
        found |= _SPECIAL.get(name.lower(), 0)
    return found
