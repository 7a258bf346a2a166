"""A client's request head as parsed: the request line and the header fields, sorted into those the
gateway forwards as they are and those it handles itself (framing, Host, hop-by-hop, forwarding and
trace headers). Knows HTTP only: no routes, plugins or upstreams.

The client connection (tollway.proxy.server) fills a `RequestHead` while httptools parses; the exchange
of that request (tollway.proxy.exchange) *is* a `RequestHead` (a subclass), so the parser writes plain
fields of the object the rest of the request reads, with no copy and no second allocation.

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

from typing import Final

from tollway.errors import ClientError
from tollway.protocol.http1 import check_transfer_encoding

# Request body framing, as the client sent it.
REQ_NONE: Final = 0
REQ_LENGTH: Final = 1
REQ_CHUNKED: Final = 2
# What a repeated traceparent header is turned into (a request may carry one; tollway.observability.
# tracecontext ignores this value and starts a new trace).
INVALID_TRACEPARENT: Final = b"invalid"
# The traceparent line of the upstream request head, as tollway.observability.tracecontext builds it
# (one piece of the head); the exchange reads the ids back from it only when something asks for them:
#   b"traceparent: 00-" <32 hex digits: trace id> "-" <16 hex digits: span id> "-" <2 hex: flags> "\r\n"
TRACE_LINE_PREFIX: Final = b"traceparent: 00-"
TRACE_ID_AT: Final = 16  # where the trace id starts in the line
SPAN_ID_AT: Final = 49

# Request headers handled by the gateway instead of being forwarded as they are.
_HOST: Final = 0
_CONNECTION: Final = 1
_CL: Final = 2
_TE: Final = 3
_EXPECT: Final = 4
_UPGRADE: Final = 5
_XFF: Final = 6
_XFP: Final = 7
_XFH: Final = 8
_RID: Final = 9
_DROP: Final = 10
_TRACEPARENT: Final = 11
_TRACESTATE: Final = 12
_FWD: Final = 13
SPECIAL_FIELDS: Final = {
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
    b"x-request-id": _RID,
    b"traceparent": _TRACEPARENT,
    b"tracestate": _TRACESTATE,
    b"forwarded": _FWD,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authorization": _DROP,
    b"proxy-authenticate": _DROP,
}


ORDINARY_FIELD: Final = -1  # `field_kind` of a field forwarded as it is
# `field_kind` by the name as the client spelled it: clients repeat their spelling, and a lookup by the
# exact name spares lowering it. Bounded: cleared when full.
_KIND_BY_NAME: Final[dict[bytes, int]] = {}


def field_kind(name: bytes) -> int:
    """The `SPECIAL_FIELDS` kind of a header field name, or ORDINARY_FIELD."""
    kind = _KIND_BY_NAME.get(name)
    if kind is None:
        kind = SPECIAL_FIELDS.get(name.lower(), ORDINARY_FIELD)
        if len(_KIND_BY_NAME) >= 1024:
            _KIND_BY_NAME.clear()
        _KIND_BY_NAME[name] = kind
    return kind


class RequestHead:
    """The request line and header fields of one request. `headers` holds the fields forwarded as
    they are, in order; the fields in `SPECIAL_FIELDS` are attributes instead (or dropped)."""

    __slots__ = (
        "body_kind",
        "connection_header",
        "content_length",
        "expect_continue",
        "forwarded",
        "headers",
        "host",
        "keep_alive",
        "method",
        "request_id",
        "traceparent",
        "tracestate",
        "upgrade",
        "url",
        "version",
        "x_forwarded_for",
        "x_forwarded_host",
        "x_forwarded_proto",
    )

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.version = 1  # the minor version: 1 for HTTP/1.1, 0 for HTTP/1.0
        self.headers: list[tuple[bytes, bytes]] = []  # forwarded request headers, in order
        self.host = b""
        self.connection_header = b""
        self.upgrade = b""
        self.x_forwarded_for = b""
        self.x_forwarded_proto = b""
        self.x_forwarded_host = b""
        self.forwarded = b""  # a client's Forwarded header (RFC 7239)
        self.request_id = b""
        # W3C trace context: the client's headers as received (tollway.observability.tracecontext)
        self.traceparent = b""
        self.tracestate = b""
        self.expect_continue = False
        self.keep_alive = True  # the client connection stays open after this request's response
        self.body_kind = REQ_NONE
        self.content_length = -1


def special_field(head: RequestHead, kind: int, value: bytes) -> None:
    """Take a field of `SPECIAL_FIELDS` (its `kind`) into the head, or ClientError."""
    if kind == _HOST:
        if head.host:
            raise ClientError("more than one Host header")
        if not value:
            raise ClientError("empty Host header")  # also keeps a second Host from passing unnoticed
        head.host = value
    elif kind == _CONNECTION:
        head.connection_header = head.connection_header + b", " + value if head.connection_header else value
    elif kind == _CL:
        head.body_kind = REQ_LENGTH
        head.content_length = int(value.strip(b" \t"))
    elif kind == _TE:
        check_transfer_encoding(value, 1)
        head.body_kind = REQ_CHUNKED
    elif kind == _EXPECT:
        if value.strip(b" \t").lower() != b"100-continue":
            raise ClientError("unsupported Expect header")
        head.expect_continue = True
    elif kind == _UPGRADE:
        head.upgrade = value
    elif kind == _XFF:
        head.x_forwarded_for = head.x_forwarded_for + b", " + value if head.x_forwarded_for else value
    elif kind == _XFP:
        head.x_forwarded_proto = value
    elif kind == _XFH:
        head.x_forwarded_host = value
    elif kind == _FWD:  # RFC 7239: believed from trusted proxies only, like X-Forwarded-*
        head.forwarded = head.forwarded + b", " + value if head.forwarded else value
    elif kind == _RID and 0 < len(value) <= 200:
        head.request_id = value
    elif kind == _TRACEPARENT:  # sent on by tollway.observability.tracecontext
        head.traceparent = INVALID_TRACEPARENT if head.traceparent else value  # repeated: invalid
    elif kind == _TRACESTATE:
        head.tracestate = head.tracestate + b"," + value if head.tracestate else value
