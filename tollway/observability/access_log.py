"""The access log: one JSON line per request, written without ever blocking the event loop.

The event loop only builds a line and appends it to a list. Every half second, or when the list
passes `buffer_size` bytes, the batch is handed to a writer thread (tollway.observability.log_sinks)
through a bounded queue. If the sink is slow or the disk is full, the queue fills and batches are
dropped and counted (exported as tollway_access_log_dropped_lines_total) — traffic never waits for
the log.

Which fields a line holds is configured (`gateway.access_log.fields`, catalogue in
tollway.config.log_fields) and compiled into a bit mask once per config. A line is assembled
from byte pieces rather than through a dict and orjson: most values are already bytes (the client
address, the method, the request id), names from the config are quoted once, numbers come from small
tables, and only strings that may need JSON escaping go through orjson (one string each). That
halves the cost of building a dict and serialising it, which was most of what logging cost per
request. The output is the same JSON (latin-1 request bytes appear as the matching Unicode
characters, as before).

Sampling (`sample_ratio`) skips a line before anything is built; 5xx answers can be kept regardless
(`always_log_errors`).

Compiled with mypyc (setup.py HOT_MODULES); the writer thread lives in log_sinks, which is not.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import TYPE_CHECKING, Any, Final

import orjson

from tollway.config.log_fields import FIELDS, REQUEST_HEADER_PREFIX, RESPONSE_HEADER_PREFIX
from tollway.observability.log_sinks import LogWriter

if TYPE_CHECKING:
    from tollway.config.schema import AccessLog as AccessLogSettings
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.snapshot import CompiledRoute

_FLUSH_INTERVAL: Final = 0.5
_NAMES: Final = list(FIELDS)
_BITS: Final = {name: 1 << i for i, name in enumerate(_NAMES)}
F_TIME: Final = 1 << 0
F_CLIENT: Final = 1 << 1
F_METHOD: Final = 1 << 2
F_HOST: Final = 1 << 3
F_PATH: Final = 1 << 4
F_QUERY: Final = 1 << 5
F_PROTOCOL: Final = 1 << 6
F_ROUTE: Final = 1 << 7
F_SERVICE: Final = 1 << 8
F_UPSTREAM: Final = 1 << 9
F_STATUS: Final = 1 << 10
F_BYTES_SENT: Final = 1 << 11
F_BYTES_RECEIVED: Final = 1 << 12
F_DURATION: Final = 1 << 13
F_UPSTREAM_MS: Final = 1 << 14
F_GATEWAY_MS: Final = 1 << 15
F_REQUEST_ID: Final = 1 << 16
F_TRACE_ID: Final = 1 << 17
F_SPAN_ID: Final = 1 << 18
F_USER_AGENT: Final = 1 << 19
F_REFERER: Final = 1 << 20
F_CONSUMER: Final = 1 << 21
F_WORKER: Final = 1 << 22
TRACE_FIELDS: Final = F_TRACE_ID | F_SPAN_ID

_NULL: Final = b"null"
# How each field's value sits in a line's template: quoted there (values known to need no escaping)
# or as given (JSON made by the line builder: numbers, null, strings quoted and escaped by orjson).
_SHAPES: Final = {name: b'"%s"' if name in ("client", "method") else b"%s" for name in FIELDS}
_SMALL: Final = [str(i).encode() for i in range(1000)]  # integers below 1000 without formatting
_SMALL_DOT: Final = [b"%d." % i for i in range(1000)]  # whole milliseconds and the point
_DIGITS3: Final = [b"%03d" % i for i in range(1000)]  # the milliseconds' decimals
_MILLIS: Final = [b'.%03dZ"' % i for i in range(1000)]  # the timestamp's tail
_HTTP11: Final = b'"HTTP/1.1"'
_HTTP10: Final = b'"HTTP/1.0"'
_now: Final = time.time
_dumps: Final = orjson.dumps


# The default fields' line, with route and service as one piece (`AccessLog._route_piece`).
_DEFAULT_TEMPLATE: Final = (
    b'{"time":%s,"client":"%s","method":"%s","path":%s,%s,"upstream":%s,"status":%s,"bytes_sent":%s,'
    b'"bytes_received":%s,"duration_ms":%s,"upstream_ms":%s,"request_id":%s}\n'
)
_NO_ROUTE: Final = b'"route":null,"service":null'
DEFAULT_MASK: Final = (
    F_TIME
    | F_CLIENT
    | F_METHOD
    | F_PATH
    | F_ROUTE
    | F_SERVICE
    | F_UPSTREAM
    | F_STATUS
    | F_BYTES_SENT
    | F_BYTES_RECEIVED
    | F_DURATION
    | F_UPSTREAM_MS
    | F_REQUEST_ID
)


def field_mask(fields: list[str]) -> int:
    mask = 0
    for name in fields:
        mask |= _BITS.get(name, 0)
    return mask


class AccessLog:
    __slots__ = (
        "_buffer",
        "_buffered",
        "_clock_offset",
        "_loop",
        "_names",
        "_route_pieces",
        "_second",
        "_second_text",
        "_timer",
        "always_log_errors",
        "buffer_size",
        "default",
        "dropped_lines",
        "mask",
        "path",
        "pid",
        "request_headers",
        "response_headers",
        "sample_ratio",
        "sampled_out",
        "settings",
        "template",
        "writer",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: AccessLogSettings) -> None:
        self._loop = loop
        self.settings = settings
        self.path = settings.path
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._second = -1
        self._second_text = b""
        self._timer: asyncio.TimerHandle | None = None
        self._names: dict[str, bytes] = {}  # config names (route, service, target) quoted once
        self._route_pieces: dict[CompiledRoute, bytes] = {}
        self._clock_offset = _now() - time.perf_counter()  # wall clock = perf_counter() + offset
        self.dropped_lines = 0  # batches refused by a full queue (the writer counts its own failures)
        self.sampled_out = 0
        self.pid = _SMALL[0]
        self.mask = 0
        self.template = b""
        self.default = False
        self.sample_ratio = 1.0
        self.always_log_errors = True
        self.buffer_size = 65536
        self.request_headers: list[str] = []
        self.response_headers: list[bytes] = []
        self.update(settings)
        self.writer = LogWriter(settings)

    def __repr__(self) -> str:
        buffered = len(self._buffer)
        return f"<AccessLog {self.writer.describe()} buffered={buffered} dropped={self.dropped_total}>"

    def update(self, settings: AccessLogSettings) -> None:
        """Apply settings that do not need a new sink (a reload with the same destination)."""
        self.settings = settings
        self.buffer_size = settings.buffer_size
        self.sample_ratio = settings.sample_ratio
        self.always_log_errors = settings.always_log_errors
        self.pid = str(os.getpid()).encode()
        self._names.clear()
        self._route_pieces.clear()  # compiled routes of older snapshots are not kept alive
        mask = self.mask = field_mask(settings.fields)
        pieces = [_dumps(name) + b":" + _SHAPES[name] for name in _NAMES if mask & _BITS[name]]
        self.request_headers = []
        self.response_headers = []
        for name in settings.fields:
            if name.startswith(REQUEST_HEADER_PREFIX):
                self.request_headers.append(name[len(REQUEST_HEADER_PREFIX) :])
            elif name.startswith(RESPONSE_HEADER_PREFIX):
                self.response_headers.append(name[len(RESPONSE_HEADER_PREFIX) :].encode("latin-1"))
            else:
                continue
            pieces.append(_dumps(name).replace(b"%", b"%%") + b":%s")  # header names may hold "%"
        self.template = b"{" + b",".join(pieces) + b"}\n"
        self.default = mask == DEFAULT_MASK and not self.request_headers and not self.response_headers

    def same_sink(self, settings: AccessLogSettings) -> bool:
        old = self.settings
        return (
            old.resolved_sink == settings.resolved_sink
            and old.path == settings.path
            and old.syslog_address == settings.syslog_address
            and old.syslog_facility == settings.syslog_facility
            and old.syslog_app_name == settings.syslog_app_name
        )

    @property
    def needs_trace_ids(self) -> bool:
        return (self.mask & TRACE_FIELDS) != 0

    @property
    def dropped_total(self) -> int:
        return self.dropped_lines + self.writer.dropped_lines

    @property
    def written_total(self) -> int:
        return self.writer.written_lines

    def log(self, ex: Exchange, total: float, gateway: float, now: float) -> None:
        """Log a finished request; `now` is time.perf_counter() at its end (the recorder's clock)."""
        ratio = self.sample_ratio
        if ratio < 1.0 and random.random() >= ratio and not (self.always_log_errors and ex.status >= 500):
            self.sampled_out += 1
            return
        wall = now + self._clock_offset
        if int(wall) != self._second:
            wall = self._new_second(now)
        line = self.default_line(ex, total, wall) if self.default else self.line(ex, total, gateway, wall)
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= self.buffer_size:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(_FLUSH_INTERVAL, self.flush)

    def default_line(self, ex: Exchange, total: float, wall: float) -> bytes:
        """`line` for the default fields: the values go straight into one tuple, the route and service
        as one piece quoted once per route."""
        route = ex.route
        target = ex.target
        rid = ex.request_id
        return _DEFAULT_TEMPLATE % (
            self._second_text + _MILLIS[int((wall - self._second) * 1000.0)],
            ex.client.peer_ip,
            ex.method,
            _dumps(ex.raw_path or _target_path(ex.url)),
            self._route_piece(route) if route is not None else _NO_ROUTE,
            self._name(target.label) if target is not None else _NULL,
            _int(ex.status),
            _int(ex.bytes_sent),
            _int(ex.body_received),
            _ms(total),
            _ms(ex.upstream_time) if ex.upstream_time >= 0.0 else _NULL,
            b'"' + rid + b'"' if rid.isalnum() else _dumps(rid.decode("latin-1")),
        )

    def line(self, ex: Exchange, total: float, gateway: float, wall: float) -> bytes:
        """One JSON line (newline included): the config's template filled with this request's values
        (one bytes formatting, in the catalogue's order; see _SHAPES for which are quoted there)."""
        mask = self.mask
        route = ex.route
        v: list[bytes] = []
        if mask & F_TIME:
            v.append(self._second_text + _MILLIS[int((wall - self._second) * 1000.0)])
        if mask & F_CLIENT:
            v.append(ex.client.peer_ip)  # an IP address: nothing to escape
        if mask & F_METHOD:
            v.append(ex.method)  # a token: llhttp admits nothing that needs escaping
        if mask & F_HOST:
            v.append(_dumps(ex.host.decode("latin-1")) if ex.host else _NULL)
        if mask & F_PATH:
            v.append(_dumps(ex.raw_path or _target_path(ex.url)))
        if mask & F_QUERY:
            v.append(_dumps(ex.query))
        if mask & F_PROTOCOL:
            v.append(_HTTP11 if ex.version == 1 else _HTTP10)
        if mask & F_ROUTE:
            v.append(self._name(route.name) if route is not None else _NULL)
        if mask & F_SERVICE:
            v.append(self._name(route.service.name) if route is not None else _NULL)
        if mask & F_UPSTREAM:
            target = ex.target
            v.append(self._name(target.label) if target is not None else _NULL)
        if mask & F_STATUS:
            v.append(_int(ex.status))
        if mask & F_BYTES_SENT:
            v.append(_int(ex.bytes_sent))
        if mask & F_BYTES_RECEIVED:
            v.append(_int(ex.body_received))
        if mask & F_DURATION:
            v.append(_ms(total))
        if mask & F_UPSTREAM_MS:
            v.append(_ms(ex.upstream_time) if ex.upstream_time >= 0.0 else _NULL)
        if mask & F_GATEWAY_MS:
            v.append(_ms(gateway))
        if mask & F_REQUEST_ID:
            rid = ex.request_id  # ours (hex), or the client's: escaped unless plainly safe
            v.append(b'"' + rid + b'"' if rid.isalnum() else _dumps(rid.decode("latin-1")))
        if mask & F_TRACE_ID:
            v.append(_quoted(ex.trace_id))  # validated hex, or ours
        if mask & F_SPAN_ID:
            v.append(_quoted(ex.span_id))
        if mask & F_USER_AGENT:
            v.append(_dumps(ex.get_header("user-agent")))
        if mask & F_REFERER:
            v.append(_dumps(ex.get_header("referer")))
        if mask & F_CONSUMER:
            v.append(_dumps(_consumer_name(ex.consumer)))
        if mask & F_WORKER:
            v.append(self.pid)
        for name in self.request_headers:
            v.append(_dumps(ex.get_header(name)))
        if self.response_headers:
            head = ex.response_head
            for raw_name in self.response_headers:
                value = head.get(raw_name) if head is not None else None
                v.append(_dumps(value.decode("latin-1")) if value is not None else _NULL)
        return self.template % tuple(v)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        batch, self._buffer, self._buffered = self._buffer, [], 0
        if not self.writer.submit(batch):
            self.dropped_lines += len(batch)

    def reopen(self) -> None:
        """SIGUSR1 (logrotate): lines buffered so far go to the old file, later ones to a new one."""
        self.flush()
        self.writer.reopen()

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is buffered and stop the writer (at shutdown or when the sink changes)."""
        self.flush()
        self.writer.close(timeout)

    def _new_second(self, now: float) -> float:
        """The wall clock's second changed (by the perf_counter-based estimate): read the wall clock,
        re-anchor the estimate, format the second. Timestamps are ``"2026-11-26T18:00:00.123Z"``
        (quoted): the second formatted once, the milliseconds from a table."""
        wall = _now()
        self._clock_offset = wall - now
        second = int(wall)
        if second != self._second:
            self._second = second
            self._second_text = ('"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))).encode()
        return wall

    def _route_piece(self, route: CompiledRoute) -> bytes:
        """``"route":"users","service":"users-svc"``, quoted once per compiled route."""
        piece = self._route_pieces.get(route)
        if piece is None:
            if len(self._route_pieces) >= 10000:
                self._route_pieces.clear()
            piece = b'"route":' + _dumps(route.name) + b',"service":' + _dumps(route.service.name)
            self._route_pieces[route] = piece
        return piece

    def _name(self, name: str) -> bytes:
        """A name from the config (route, service, target), quoted once."""
        quoted = self._names.get(name)
        if quoted is None:
            if len(self._names) >= 10000:
                self._names.clear()
            quoted = self._names[name] = _dumps(name)
        return quoted


def _target_path(url: bytes) -> str:
    """The path of a request refused before routing (no parsed path yet): never the query, which
    may carry tokens."""
    return url.partition(b"?")[0].decode("latin-1")


def _quoted(value: bytes) -> bytes:
    """Bytes that need no escaping (hex ids), quoted; empty is null."""
    return b'"' + value + b'"' if value else _NULL


def _int(value: int) -> bytes:
    return _SMALL[value] if 0 <= value < 1000 else str(value).encode()


def _ms(seconds: float) -> bytes:
    """Milliseconds with three decimals: 0.0012345 s → b"1.235"."""
    micros = int(seconds * 1000000.0 + 0.5)
    if micros < 0:
        micros = 0
    whole = micros // 1000
    return (_SMALL_DOT[whole] if whole < 1000 else str(whole).encode() + b".") + _DIGITS3[micros % 1000]


def _consumer_name(consumer: Any) -> Any:
    if consumer is None:
        return None
    if isinstance(consumer, str):
        return consumer
    name = getattr(consumer, "username", None)
    return name if isinstance(name, str) else str(consumer)
