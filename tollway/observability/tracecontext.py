"""W3C Trace Context (traceparent / tracestate), by hand, on every request.

Always on, so it is built to cost about a tenth of a microsecond: the client's ``traceparent`` is
captured as raw bytes while headers are parsed (tollway.proxy.server), and `TraceSettings.add_header`
— called once while the upstream request head is built — validates it, picks this hop's ids and
sampled flag, and appends the header pieces to the head's parts (no concatenation). Ids are slices of
a pool of hex digits refilled from os.urandom a few kilobytes at a time, so an id costs one slice
instead of a random number and its formatting. No OpenTelemetry object is involved; the SDK is only
imported by tollway.observability.tracing, and only sampled requests reach it.

Rules (https://www.w3.org/TR/trace-context/):
- A valid ``traceparent`` from the client is continued: same trace id, the client's span becomes the
  parent, the gateway's hop gets a new span id, and the client's sampled flag is followed.
  ``tracestate`` is passed on unchanged. An invalid ``traceparent`` is ignored, with its tracestate.
- Without one, the gateway starts a trace: random trace id, sampled with ``tracing.sample_ratio``.
- With tracing disabled the gateway records nothing, so it is not a hop: a client's header goes on
  unchanged, and a started trace is marked sampled, because an unsampled flag would switch off
  tracing in backends that follow their parent (the OpenTelemetry SDKs' default).

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

import binascii
import os
import random
from typing import TYPE_CHECKING, Final

from tollway.protocol.request import INVALID_TRACEPARENT as INVALID  # a repeated traceparent

if TYPE_CHECKING:
    from tollway.config.schema import Tracing
    from tollway.proxy.exchange import Exchange

_HEX: Final = b"0123456789abcdef"
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16
_POOL_BYTES: Final = 3072  # random bytes per refill: 128 requests' trace and span ids
_PREFIX: Final = b"traceparent: 00-"
_SAMPLED_TAIL: Final = b"-01\r\n"
_UNSAMPLED_TAIL: Final = b"-00\r\n"


class IdPool:
    """Random lowercase hex digits, handed out in slices (one pool per process)."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self, digits: int) -> bytes:
        pos = self.pos
        if pos + digits > len(self.buf):
            self.buf = binascii.hexlify(os.urandom(_POOL_BYTES))
            pos = 0
        self.pos = pos + digits
        return self.buf[pos : pos + digits]


IDS: Final = IdPool()


class TraceSettings:
    """`gateway.tracing`, compiled once per config version."""

    __slots__ = ("enabled", "ids", "propagate", "ratio")

    def __init__(self, enabled: bool, propagate: bool, sample_ratio: float) -> None:
        self.enabled = enabled
        self.propagate = propagate
        self.ratio = sample_ratio
        self.ids = IDS

    @classmethod
    def from_config(cls, tracing: Tracing) -> TraceSettings:
        return cls(tracing.enabled, tracing.propagate, tracing.sample_ratio)

    def __repr__(self) -> str:
        return f"<TraceSettings enabled={self.enabled} propagate={self.propagate}>"

    def add_header(self, ex: Exchange, parts: list[bytes]) -> None:
        """Append the upstream request's traceparent (and tracestate) lines to a head's parts."""
        if not self.propagate:
            _passthrough(ex, parts)
            return
        if not ex.trace_id:
            self.start(ex)
        parts.append(_PREFIX)
        parts.append(ex.trace_id)
        parts.append(b"-")
        parts.append(ex.span_id)
        parts.append(_SAMPLED_TAIL if ex.sampled else _UNSAMPLED_TAIL)
        if ex.tracestate:
            parts += (b"tracestate: ", ex.tracestate, b"\r\n")

    def start(self, ex: Exchange) -> None:
        """Choose the trace id, this hop's span id and the sampled flag (once per request)."""
        parent = ex.traceparent
        if parent and _valid(parent):
            ex.trace_id = parent[3:35]
            ex.sampled = (_hexval(parent[54]) & 1) == 1
            if self.enabled:
                ex.parent_span_id = parent[36:52]
                ex.span_id = self._span_id()
            else:
                ex.span_id = parent[36:52]  # not a hop: the backend's parent stays the client's span
            return
        ex.tracestate = b""  # a tracestate without a valid traceparent is discarded
        trace_id = self.ids.take(32)
        while trace_id == _ZERO_TRACE:  # all-zero ids are invalid (one chance in 2**128)
            trace_id = self.ids.take(32)
        ex.trace_id = trace_id
        ex.span_id = self._span_id()
        ex.sampled = not self.enabled or random.random() < self.ratio

    def _span_id(self) -> bytes:
        span_id = self.ids.take(16)
        while span_id == _ZERO_SPAN:
            span_id = self.ids.take(16)
        return span_id


def _passthrough(ex: Exchange, parts: list[bytes]) -> None:
    """propagate: false — the client's trace headers go on as they came (or not at all)."""
    if ex.traceparent and ex.traceparent != INVALID:
        parts += (b"traceparent: ", ex.traceparent, b"\r\n")
    if ex.tracestate:
        parts += (b"tracestate: ", ex.tracestate, b"\r\n")


def _valid(value: bytes) -> bool:
    """``00-<32 hex>-<16 hex>-<2 hex>``, lowercase, ids not all zero; later versions may append
    ``-...`` fields, version ff is forbidden."""
    size = len(value)
    if size < 55 or value[2] != 45 or value[35] != 45 or value[52] != 45:  # 45 == "-"
        return False
    version = value[:2]
    if version == b"00":
        if size != 55:
            return False
    elif version == b"ff" or (size > 55 and value[55] != 45):
        return False
    if value[:55].translate(None, _HEX) != b"---":
        return False
    return value[3:35] != _ZERO_TRACE and value[36:52] != _ZERO_SPAN


def _hexval(char: int) -> int:
    return char - 48 if char <= 57 else char - 87  # "0"-"9", "a"-"f" (validated)


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) of a valid header value, else None (for tests and tools)."""
    if not _valid(value):
        return None
    return value[3:35], value[36:52], (_hexval(value[54]) & 1) == 1
