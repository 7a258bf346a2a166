"""W3C Trace Context (traceparent / tracestate), by hand, on every request.

Always on, so it is built to cost next to nothing: the client's ``traceparent`` is captured as raw
bytes while headers are parsed (tollway.proxy.server), and `TraceSettings.add_header` — called once
while the upstream request head is built — validates it, picks this hop's ids and sampled flag, and
appends the whole ``traceparent: …\\r\\n`` line to the head's parts as one piece. A trace the gateway
starts takes its ids from `IdPool`, as one slice ``<trace id>-<span id>`` of a buffer of random hex
digits that os.urandom and one hexlify refill every 128 traces. The exchange keeps the line
(`Exchange.trace_line`) and reads ``trace_id`` and ``span_id`` back from it only when something asks
(the access log's fields, the span export). No OpenTelemetry object is involved; the SDK is only
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from tollway.protocol.request import INVALID_TRACEPARENT as INVALID  # a repeated traceparent
from tollway.protocol.request import TRACE_LINE_PREFIX as _PREFIX

if TYPE_CHECKING:
    from tollway.config.schema import Tracing
    from tollway.proxy.exchange import Exchange

_HEX: Final = b"0123456789abcdef"
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16
_SAMPLED_TAIL: Final = b"-01\r\n"
_UNSAMPLED_TAIL: Final = b"-00\r\n"
# A refill hexlifies 24 × 129 random bytes with a "-" after every 24: each 48-digit group holds the
# span id of one pair (its first 16 digits) and the trace id of the next (its last 32), so pair k is
# the 49 bytes at 16 + 49k, dash included, and no digit is wasted but the last group's 32.
_PAIRS: Final = 128
_PAIR: Final = 49  # <32 hex>-<16 hex>
_FIRST: Final = 16
_END: Final = _FIRST + _PAIRS * _PAIR
_ZERO_RUN: Final = b"0" * 16  # no id may be all zeros: no 16 zero digits anywhere in a refill


class IdPool:
    """Random ``<32 hex digits: trace id>-<16 hex digits: span id>`` pairs, handed out one slice each
    (one pool per process)."""

    __slots__ = ("buf", "pos", "random_bytes")

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.random_bytes = random_bytes
        self.buf = b""
        self.pos = _END

    def _refill(self) -> bytes:
        size = (_PAIRS + 1) * 24
        digits = binascii.hexlify(self.random_bytes(size), b"-", 24)
        while digits.find(_ZERO_RUN) != -1:  # one refill in ~2**51: draw the whole batch again
            digits = binascii.hexlify(self.random_bytes(size), b"-", 24)
        return digits

    def _next(self) -> int:
        """The offset of an unused pair (refilling when none is left)."""
        pos = self.pos
        if pos == _END:
            self.buf = self._refill()
            pos = _FIRST
        self.pos = pos + _PAIR
        return pos

    def pair(self) -> bytes:
        """A new trace's ``<trace id>-<span id>``: one slice."""
        pos = self._next()
        return self.buf[pos : pos + _PAIR]

    def take(self, digits: int) -> bytes:
        """`digits` (at most 32) random lowercase hex digits, not all zero: a pair's trace id, or its
        start (a continued trace's new span id takes 16)."""
        pos = self._next()
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
        line = ex.trace_line
        if not line:  # (a retry's head reuses the first one's)
            line = self.start(ex)
        parts.append(line)
        if ex.tracestate:
            parts += (b"tracestate: ", ex.tracestate, b"\r\n")

    def start(self, ex: Exchange) -> bytes:
        """Choose the trace id, this hop's span id and the sampled flag (once per request): sets and
        returns `ex.trace_line`, from which `ex.trace_id` and `ex.span_id` are read."""
        parent = ex.traceparent
        if parent and _valid(parent):
            sampled = (_hexval(parent[54]) & 1) == 1
            tail = _SAMPLED_TAIL if sampled else _UNSAMPLED_TAIL
            if self.enabled:
                ex.parent_span_id = parent[36:52]
                line = _PREFIX + parent[3:36] + self.ids.take(16) + tail
            else:  # not a hop: the backend's parent stays the client's span
                line = _PREFIX + parent[3:52] + tail
        else:
            ex.tracestate = b""  # a tracestate without a valid traceparent is discarded
            sampled = not self.enabled or random.random() < self.ratio
            line = _PREFIX + self.ids.pair() + (_SAMPLED_TAIL if sampled else _UNSAMPLED_TAIL)
        ex.sampled = sampled
        ex.trace_line = line
        return line


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
