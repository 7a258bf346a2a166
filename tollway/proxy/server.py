"""The client side of the gateway: one protocol object per client connection.

httptools (llhttp, strict) parses requests and calls back into this object; each request becomes an
`Exchange`. Pipelined requests queue behind the active one and are answered in order. Reading pauses
when a queue or a buffer would otherwise grow (several reasons can hold it paused at once), and a
single lazy `Deadline` covers the header-read, body-read, send and keep-alive timeouts.

This module is compiled with mypyc (see setup.py), so its classes are plain classes that implement the
asyncio protocol methods rather than subclasses of `asyncio.Protocol`: uvloop only needs the methods.
Limits and timeouts are copied from the config when a connection opens (a reload applies to new
connections), so the per-request checks read plain fields.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import httptools

from tollway.errors import (
    BodyTooLarge,
    ClientError,
    HeadersTooLarge,
    RequestLineTooLong,
    RequestTimeout,
    TollwayError,
)
from tollway.protocol.deadline import Deadline
from tollway.protocol.http1 import check_request_version
from tollway.protocol.request import ORDINARY_FIELD, REQ_CHUNKED, REQ_LENGTH, field_kind, special_field
from tollway.protocol.tls import sni_of
from tollway.proxy.exchange import Exchange
from tollway.proxy.request_ids import RequestIds

if TYPE_CHECKING:
    import asyncio

    from tollway.proxy.pdk import RequestContext
    from tollway.runtime.worker import Worker
    from tollway.upstream.connection import UpstreamConnection

_MAX_PIPELINED: Final = 32
# A head still incomplete after this many bytes beyond the configured limits is refused (431): httptools
# buffers a partial header field until its end, so without this a client could grow it without bound.
# The slack covers one read's worth of bytes that belonged to the previous request.
_HEAD_SLACK: Final = 262144
# Why reading is paused (bits): several can hold at once; reading resumes when none is left.
_PAUSE_QUEUE: Final = 1
_PAUSE_BODY: Final = 2
_PAUSE_TUNNEL: Final = 4
_PAUSE_REJECTED: Final = 8  # bad input: nothing more is read from this connection
_GET: Final = b"GET"


class ClientConnection:
    __slots__ = (
        "_feed_data",
        "_get_method",
        "_head_bytes",
        "_head_size",
        "_head_started",
        "_keeps_alive",
        "_last",
        "_paused",
        "_rejected",
        "_transport_closing",
        "_transport_write",
        "_tunnel",
        "_tunnel_pending",
        "_writing_paused",
        "active",
        "body_timeout",
        "current",
        "deadline",
        "draining",
        "forwarded_host",
        "forwarded_host_lines",
        "forwarded_lines",
        "header_timeout",
        "ids",
        "keepalive_timeout",
        "max_body_size",
        "max_header_size",
        "max_headers",
        "max_request_line",
        "parser",
        "peer_ip",
        "queue",
        "route_host",
        "route_host_of",
        "scheme",
        "send_timeout",
        "server_header",
        "sni",
        "transport",
        "trusted",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        settings = worker.snapshot.settings
        limits, timeouts = settings.limits, settings.timeouts
        self.max_request_line: int = limits.max_request_line
        self.max_header_size: int = limits.max_header_size
        self.max_headers: int = limits.max_headers
        self.max_body_size: int = limits.max_body_size
        self.header_timeout: float = timeouts.client_header
        self.body_timeout: float = timeouts.client_body
        self.send_timeout: float = timeouts.client_send
        self.keepalive_timeout: float = timeouts.keepalive
        self.server_header: bytes | None = worker.snapshot.server_header
        self.ids: RequestIds = worker.request_ids
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # The parser's and the transport's methods used on every request, bound once per connection: a
        # call through a bound method skips the method lookup by name (~120 instructions) each time.
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data
        self._get_method: Callable[[], bytes] = self.parser.get_method
        self._keeps_alive: Callable[[], bool] = self.parser.should_keep_alive
        self._transport_write: Callable[[bytes], object] = _no_write
        self._transport_closing: Callable[[], bool] = _closed
        self.current: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.peer_ip = b""
        self.scheme = b"http"
        self.sni = ""  # the TLS server name the client sent (tollway.protocol.tls)
        self.trusted = False
        self.forwarded_lines = _forwarded_lines(self.peer_ip, self.scheme)
        # The forwarded lines with an X-Forwarded-Host line, for the last Host seen on this connection
        # (a client repeats its Host): `forwarded_lines_with_host`.
        self.forwarded_host = b""
        self.forwarded_host_lines = b""
        # The routing host of the last Host header (Exchange._route): a client repeats its Host.
        self.route_host_of = b""
        self.route_host = ""
        self.draining: bool = worker.draining
        self._paused = 0
        self._writing_paused = False
        self._head_size = 0
        self._head_bytes = 0
        self._head_started = False  # a head began in the current read (data_received arms its timeout)
        self._rejected: tuple[Exchange, TollwayError] | None = None  # answered after the requests before it
        # No request after the current ones is served: one asked to close the connection (Connection:
        # close, HTTP/1.0) or was answered with a close. Bytes after it are discarded, never forwarded.
        self._last = False
        self._tunnel: UpstreamConnection | None = None
        self._tunnel_pending = b""
        self.deadline = Deadline(worker.loop, self._timed_out)

    def __repr__(self) -> str:
        return f"<ClientConnection {self.peer_ip.decode()} active={self.active!r} queued={len(self.queue)}>"

    # -- asyncio protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._transport_write = transport.write
        self._transport_closing = transport.is_closing
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        self.peer_ip = ip.encode()
        self.trusted = self.worker.snapshot.is_trusted_proxy(ip)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
            self.sni = sni_of(transport)
        self.forwarded_lines = _forwarded_lines(self.peer_ip, self.scheme)
        self.forwarded_host = self.forwarded_host_lines = b""
        transport.set_write_buffer_limits(65536)
        self.worker.connection_opened(self)
        self.deadline.arm(self.header_timeout, "header")

    def data_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.write(data)
            return
        try:
            self._feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            if self._last and self.current is None:
                self._discard_rest()  # bytes after the last request (llhttp: "Data after Connection: close")
                return
            self._reject(self._parse_error(exc))
        except TollwayError as exc:
            self._reject(exc)
        ex = self.current
        if ex is not None and not ex.method:  # the head is still incomplete
            if self._head_started:  # it began in this read: its header timeout runs from now
                self._head_started = False
                if self.active is None:
                    self.deadline.arm(self.header_timeout, "header")
            self._head_bytes += len(data)
            if self._head_bytes > self.max_request_line + self.max_header_size + _HEAD_SLACK:
                self._reject(HeadersTooLarge())

    def eof_received(self) -> bool | None:
        return None  # close our side too (half-open client connections are not kept)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        self.worker.connection_closed(self)
        self.transport = None  # first: an aborted exchange must not start the next queued one
        self._transport_write = _no_write
        self._transport_closing = _closed
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.abort()
        for ex in (self.active, *self.queue, self.current):
            if ex is not None and not ex.done:
                ex.abort()
        self.queue.clear()
        self.active = self.current = None

    def pause_writing(self) -> None:
        """The client reads slower than the backend writes: stop reading from the backend."""
        self._writing_paused = True
        conn = self._source()
        if conn is not None:
            conn.pause_reading()
        self.deadline.arm(self.send_timeout, "send")

    def resume_writing(self) -> None:
        self._writing_paused = False
        conn = self._source()
        if conn is not None:
            conn.resume_reading()
        self._rearm()

    def _source(self) -> UpstreamConnection | None:
        if self._tunnel is not None:
            return self._tunnel
        ex = self.active
        return ex.upstream if ex is not None else None

    # -- httptools callbacks ------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._last:
            raise _AfterLastRequest()  # stops the parser: nothing after the last request is read
        self.current = Exchange(self, self.worker.snapshot)
        self._head_size = 0
        self._head_bytes = 0
        # The header timeout starts when the head began, but is armed only if the head is still
        # incomplete at the end of this read (data_received): most heads arrive whole, and their
        # request's own timeout replaces it at once.
        self._head_started = True

    def on_url(self, url: bytes) -> None:
        ex = self.current
        assert ex is not None
        ex.url = ex.url + url if ex.url else url
        if len(ex.url) > self.max_request_line:
            raise RequestLineTooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.current
        assert ex is not None
        size = self._head_size + len(name) + len(value) + 4
        self._head_size = size
        if size > self.max_header_size or len(ex.headers) >= self.max_headers:
            raise HeadersTooLarge()
        if ex.method:
            return  # a trailer field after a chunked body: dropped (the body is forwarded re-chunked)
        kind = field_kind(name)
        if kind == ORDINARY_FIELD:
            ex.headers.append((name, value))
        else:
            special_field(ex, kind, value)

    def on_headers_complete(self) -> None:
        ex = self.current
        assert ex is not None
        parser = self.parser
        method = self._get_method()
        if method == b"GET":
            method = _GET  # one object whose hash is computed once, for the lookups by method
        ex.method = method
        keep_alive = self._keeps_alive()
        # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0, and keeps only 1.1 alive without a Connection
        # header: then the version is known without get_http_version(), which formats a string.
        if not keep_alive or ex.connection_header:
            version = parser.get_http_version()
            if version == "1.1":
                ex.version = 1
            elif version == "1.0":
                ex.version = 0
            else:
                major, _, minor = version.partition(".")
                check_request_version(int(major), int(minor or "0"))
        ex.keep_alive = self.keepalive_timeout > 0 and keep_alive
        if not ex.keep_alive:
            self._last = True
        if method == b"CONNECT":
            raise ClientError("CONNECT is not supported")
        if not ex.host and ex.version == 1 and ex.url[:1] == b"/":
            raise ClientError("missing Host header")
        if ex.upgrade:
            if not parser.should_upgrade():
                ex.upgrade = b""
            elif ex.body_kind:  # llhttp would hand the body to the tunnel: refuse the ambiguity
                raise ClientError("a request with a body cannot upgrade the connection")
        if ex.body_kind:
            self._check_body_framing(ex)
        if self.active is not None:
            self.queue.append(ex)
            self._pause(_PAUSE_QUEUE)
            if len(self.queue) > _MAX_PIPELINED:
                raise ClientError("too many pipelined requests")
            return
        self.active = ex
        if ex.body_kind:
            self.deadline.arm(self.body_timeout, "body")
        else:
            self.deadline.disarm()
        self._begin(ex)

    def _check_body_framing(self, ex: Exchange) -> None:
        if ex.body_kind == REQ_CHUNKED and ex.version == 0:
            raise ClientError("Transfer-Encoding is not allowed in HTTP/1.0 requests")
        limit = self.max_body_size
        if ex.body_kind == REQ_LENGTH and limit and ex.content_length > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")

    def on_body(self, body: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        if ex is self.active and not self._writing_paused:
            self.deadline.arm(self.body_timeout, "body")
        ex.request_body(body)  # a queued request buffers it until its turn

    def on_message_complete(self) -> None:
        ex = self.current
        self.current = None
        if ex is None:
            return
        ex.request_done()
        if ex is self.active and not ex.done and ex.body_kind:
            self._rearm()

    def on_chunk_complete(self) -> None:
        """A chunk of a chunked request body parsed, data and CRLF included: the first one releases
        the request head held for it (Exchange.first_chunk_parsed)."""
        ex = self.current
        if ex is not None and not ex.chunk_parsed:
            ex.first_chunk_parsed()

    # -- used by exchanges ------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self._transport_closing():
            self._transport_write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def forwarded_lines_with_host(self, host: bytes) -> bytes:
        """`forwarded_lines` and ``X-Forwarded-Host: host`` (a request from an untrusted client, with a
        Host): built once per distinct Host in a row, so once per connection as a rule."""
        if host != self.forwarded_host:
            self.forwarded_host = host
            self.forwarded_host_lines = self.forwarded_lines + b"X-Forwarded-Host: " + host + b"\r\n"
        return self.forwarded_host_lines

    def pause_reading_for(self, ex: RequestContext) -> None:
        if ex is self.active or ex is self.current:
            self._pause(_PAUSE_BODY)

    def resume_reading_for(self, ex: RequestContext) -> None:
        self._resume(_PAUSE_BODY)

    def exchange_finished(self, ex: Exchange) -> None:
        """An exchange wrote its last byte: log it, then answer the next request or close."""
        finished = ex.snapshot.request_finished
        if finished is not None:
            finished(ex)
        if ex is not self.active:
            return  # an aborted queued request: the connection is going away
        self.active = None
        transport = self.transport
        if transport is None:
            return
        if not ex.keep_alive or self.draining:
            self._last = True  # requests already read behind it (same packet) are never started
            transport.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self._resume(_PAUSE_QUEUE)
            self.active = nxt
            self._begin(nxt)
            self._rearm()
            return
        if self._rejected is not None:  # bad input that came after the requests just answered
            bad, error = self._rejected
            self._rejected = None
            self.active = bad
            self.worker.bad_request(self, error)
            bad.fail(error)
            return
        if self._paused:
            self._resume(_PAUSE_BODY)
        if self._writing_paused:
            return  # the send timeout stays armed until the client reads what it was sent
        if self.current is None:
            self.deadline.arm(self.keepalive_timeout, "keepalive")
        else:  # the next request's head is arriving: its header timeout starts now
            self.deadline.arm(self.header_timeout, "header")

    def drain(self) -> None:
        """Shutting down: idle connections close now, busy ones after their current response; tunnels
        (WebSockets) live on until the drain timeout, like requests in flight."""
        self.draining = True
        idle = self.active is None and self.current is None and self._tunnel is None
        if idle and self.transport is not None:
            self.transport.close()

    # -- tunnels (WebSocket and any other Upgrade) ----------------------------------------------------------
    def _on_upgrade(self, rest: bytes) -> None:
        """httptools stopped at an Upgrade request; bytes after its head belong to the tunnel."""
        self._tunnel_pending = rest
        self._pause(_PAUSE_TUNNEL)  # nothing more is parsed on this connection

    def start_tunnel(self, ex: Exchange, conn: UpstreamConnection, response: bytes) -> None:
        """The backend agreed to switch protocols: from now on bytes flow both ways untouched."""
        self._tunnel = conn
        conn.sink = None
        conn.tunnel_sink = TunnelSink(self)
        conn.tunnel = True
        self.write(response)
        ex.bytes_sent += len(response)
        if self._tunnel_pending:
            conn.write(self._tunnel_pending)
            self._tunnel_pending = b""
        ex.done = True
        finished = ex.snapshot.request_finished
        if finished is not None:
            finished(ex)
        self.active = None
        self._resume(_PAUSE_TUNNEL)
        self.deadline.disarm()

    # -- internals ------------------------------------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _rearm(self) -> None:
        """Arm the client timeout that fits what the connection is waiting for."""
        if self._writing_paused or self.transport is None:
            return  # the send timeout is armed
        if self._tunnel is not None:
            self.deadline.disarm()  # a tunnel has no timeout of its own (its protocol pings if it needs to)
            return
        ex = self.active
        if ex is None:
            if self.current is None:
                self.deadline.arm(self.keepalive_timeout, "keepalive")
            else:
                self.deadline.arm(self.header_timeout, "header")
        elif ex.body_kind and not ex.body_done and not ex.done:
            self.deadline.arm(self.body_timeout, "body")
        else:
            self.deadline.disarm()  # waiting for the backend: the upstream timeouts apply

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None:
                self.transport.resume_reading()

    def _begin(self, ex: Exchange) -> None:
        try:
            ex.begin()
        except Exception as exc:  # a bug must cost one request a 500, never the worker
            ex.fail(exc)

    def _discard_rest(self) -> None:
        """Input after the last request: dropped unread; the connection closes after the answers."""
        self._pause(_PAUSE_REJECTED)

    def _parse_error(self, exc: httptools.HttpParserError) -> TollwayError:
        """httptools wraps exceptions raised in our callbacks; a bug there is logged, not blamed on
        the client."""
        cause = exc.__context__
        if isinstance(cause, TollwayError):
            return cause
        if isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
            self.worker.log_exception("request parsing failed", cause, self.current)
            return TollwayError()
        return ClientError(f"malformed request: {exc}")

    def _reject(self, error: TollwayError) -> None:
        """Bad input: answer and close; nothing of it is forwarded. Requests received before it are
        answered first (in order), then its error."""
        ex = self.current or self.active
        self.current = None
        self._pause(_PAUSE_REJECTED)
        if self.active is not None and self.active is not ex:
            if ex is None:
                ex = Exchange(self, self.worker.snapshot)
            elif ex in self.queue:
                self.queue.remove(ex)  # its body was bad: it must not be forwarded when its turn comes
            ex.keep_alive = False
            if self._rejected is None:
                self._rejected = (ex, error)
            return
        if ex is None:
            ex = Exchange(self, self.worker.snapshot)
        ex.keep_alive = False
        self.active = ex
        self.worker.bad_request(self, error)
        ex.fail(error)

    def _timed_out(self, reason: str) -> None:
        transport = self.transport
        if transport is None:
            return
        if reason == "keepalive" or (reason == "header" and self.current is None):
            transport.close()
        elif reason == "header" and self.current is not None and self.active is None:
            self._reject(RequestTimeout("timed out reading the request head"))
        elif reason == "body" and self.active is not None and not self.active.response_started:
            self.active.keep_alive = False
            self.active.fail(RequestTimeout("timed out reading the request body"))
        else:
            transport.abort()


def _no_write(data: bytes) -> None:
    """The transport's write before the connection is made and after it is lost: nothing to write to."""


def _closed() -> bool:
    return True


def _forwarded_lines(peer_ip: bytes, scheme: bytes) -> bytes:
    """X-Forwarded-For and X-Forwarded-Proto of a request from an untrusted client: the same for every
    request of the connection, so built once per connection (Exchange._build_request_head)."""
    return b"X-Forwarded-For: " + peer_ip + b"\r\nX-Forwarded-Proto: " + scheme + b"\r\n"


class _AfterLastRequest(Exception):
    """Raised from a parser callback to stop parsing input that follows the connection's last request."""


class TunnelSink:
    """After a 101, the upstream connection hands bytes straight to the client."""

    __slots__ = ("client",)

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def upstream_body(self, data: bytes) -> None:
        self.client.write(data)

    def upstream_complete(self) -> None:
        if self.client.transport is not None:
            self.client.transport.close()

    def upstream_failed(self, error: Exception, replayable: bool) -> None:
        self.client.abort()

    def upstream_pause_writing(self) -> None:
        self.client._pause(_PAUSE_TUNNEL)

    def upstream_resume_writing(self) -> None:
        self.client._resume(_PAUSE_TUNNEL)
