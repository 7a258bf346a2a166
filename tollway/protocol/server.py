"""The client side of the gateway: one asyncio Protocol per client connection.

httptools (llhttp, strict) parses requests and calls back into this object; each request becomes an
`Exchange`. Pipelined requests queue behind the active one and are answered in order. Reading pauses
when a queue or a buffer would otherwise grow (several reasons can hold it paused at once), and a
single lazy `Deadline` covers the header-read, body-read, send and keep-alive timeouts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

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
from tollway.protocol.http1 import check_request_version, check_transfer_encoding
from tollway.proxy.exchange import REQ_CHUNKED, REQ_LENGTH, Exchange

if TYPE_CHECKING:
    from tollway.config.schema import GatewaySettings
    from tollway.runtime.worker import Worker
    from tollway.upstream.connection import UpstreamConnection

_MAX_PIPELINED = 32
# Why reading is paused (bits): several can hold at once; reading resumes when none is left.
_PAUSE_QUEUE, _PAUSE_BODY, _PAUSE_TUNNEL = 1, 2, 4
# Request headers handled by the gateway instead of being forwarded as they are.
_HOST, _CONNECTION, _CL, _TE, _EXPECT, _UPGRADE, _XFF, _XFP, _XFH, _RID, _DROP = range(11)
_SPECIAL = {
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
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authorization": _DROP,
    b"proxy-authenticate": _DROP,
}


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_head_size",
        "_paused",
        "_tunnel",
        "_tunnel_pending",
        "active",
        "current",
        "deadline",
        "draining",
        "parser",
        "peer_ip",
        "queue",
        "scheme",
        "server_header",
        "settings",
        "transport",
        "trusted",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings: GatewaySettings = worker.snapshot.settings
        self.server_header = worker.snapshot.server_header
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.peer_ip = b""
        self.scheme = b"http"
        self.trusted = False
        self.draining = worker.draining
        self._paused = 0
        self._head_size = 0
        self._tunnel: UpstreamConnection | None = None
        self._tunnel_pending = b""
        self.deadline = Deadline(worker.loop, self._timed_out)

    def __repr__(self) -> str:
        return f"<ClientConnection {self.peer_ip.decode()} active={self.active!r} queued={len(self.queue)}>"

    # -- asyncio callbacks -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        self.peer_ip = ip.encode()
        self.trusted = self.worker.snapshot.is_trusted_proxy(ip)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
        self.transport.set_write_buffer_limits(high=65536)
        self.worker.connection_opened(self)
        self.deadline.arm(self.settings.timeouts.client_header, "header")

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0]:])
        except httptools.HttpParserError as exc:
            self._reject(_client_error(exc))
        except TollwayError as exc:
            self._reject(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        self.worker.connection_closed(self)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.abort()
        for ex in (self.active, *self.queue, self.current):
            if ex is not None and not ex.done:
                ex.abort()
        self.queue.clear()
        self.active = self.current = None
        self.transport = None

    def pause_writing(self) -> None:
        ex = self.active
        conn = self._tunnel or (ex.upstream if ex is not None else None)
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()
        self.deadline.arm(self.settings.timeouts.client_send, "send")

    def resume_writing(self) -> None:
        ex = self.active
        conn = self._tunnel or (ex.upstream if ex is not None else None)
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()
        self.deadline.disarm()
        if ex is not None and not ex.body_done:
            self.deadline.arm(self.settings.timeouts.client_body, "body")

    # -- httptools callbacks -------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = Exchange(self, self.worker.snapshot)
        self._head_size = 0
        if self.active is None:
            self.deadline.arm(self.settings.timeouts.client_header, "header")

    def on_url(self, url: bytes) -> None:
        ex = self.current
        assert ex is not None
        ex.url = ex.url + url if ex.url else url
        if len(ex.url) > self.settings.limits.max_request_line:
            raise RequestLineTooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.current
        assert ex is not None
        size = self._head_size + len(name) + len(value) + 4
        self._head_size = size
        limits = self.settings.limits
        if size > limits.max_header_size or len(ex.headers) >= limits.max_headers:
            raise HeadersTooLarge()
        kind = _SPECIAL.get(name.lower())
        if kind is None:
            ex.headers.append((name, value))
        else:
            _special_header(ex, kind, value)

    def on_headers_complete(self) -> None:
        ex = self.current
        assert ex is not None
        parser = self.parser
        ex.method = method = parser.get_method()
        version = parser.get_http_version()
        major, _, minor = version.partition(".")
        check_request_version(int(major), int(minor or 0))
        ex.version = int(minor)
        ex.keep_alive = parser.should_keep_alive() and self.settings.timeouts.keepalive > 0
        if method == b"CONNECT":
            raise ClientError("CONNECT is not supported")
        if not ex.host and ex.version == 1 and ex.url[:1] == b"/":
            raise ClientError("missing Host header")
        if not parser.should_upgrade():
            ex.upgrade = b""
        if ex.body_kind == REQ_CHUNKED and ex.version == 0:
            raise ClientError("Transfer-Encoding is not allowed in HTTP/1.0 requests")
        limit = self.settings.limits.max_body_size
        if ex.body_kind == REQ_LENGTH and limit and ex.content_length > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        if self.active is not None:
            self.queue.append(ex)
            self._pause(_PAUSE_QUEUE)
            if len(self.queue) > _MAX_PIPELINED:
                raise ClientError("too many pipelined requests")
            return
        self.active = ex
        if ex.body_kind:
            self.deadline.arm(self.settings.timeouts.client_body, "body")
        else:
            self.deadline.disarm()
        self._begin(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        if ex is self.active:
            self.deadline.arm(self.settings.timeouts.client_body, "body")
        ex.request_body(body)  # a queued request buffers it until its turn

    def on_message_complete(self) -> None:
        ex = self.current
        self.current = None
        if ex is None:
            return
        ex.request_done()
        if ex is self.active and not ex.done:
            self.deadline.disarm()

    # -- used by exchanges -------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading_for(self, ex: Exchange) -> None:
        if ex is self.active or ex is self.current:
            self._pause(_PAUSE_BODY)

    def resume_reading_for(self, ex: Exchange) -> None:
        self._resume(_PAUSE_BODY)

    def exchange_finished(self, ex: Exchange) -> None:
        """An exchange wrote its last byte: log it, then answer the next request or close."""
        self.worker.request_finished(ex)
        if ex is not self.active:
            return  # an aborted queued request: the connection is going away
        self.active = None
        transport = self.transport
        if transport is None:
            return
        if not ex.keep_alive or self.draining:
            transport.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self._resume(_PAUSE_QUEUE)
            self.active = nxt
            self._begin(nxt)
            return
        self._resume(_PAUSE_BODY)
        if self.current is None:
            self.deadline.arm(self.settings.timeouts.keepalive, "keepalive")
        else:  # the next request's head is arriving: its header timeout starts now
            self.deadline.arm(self.settings.timeouts.client_header, "header")

    def drain(self) -> None:
        """Shutting down: idle connections close now, busy ones after their current response."""
        self.draining = True
        if self.active is None and self.current is None and self.transport is not None:
            self.transport.close()

    # -- tunnels (WebSocket and any other Upgrade) -------------------------------------------------------
    def _on_upgrade(self, rest: bytes) -> None:
        """httptools stopped at an Upgrade request; bytes after its head belong to the tunnel."""
        self._tunnel_pending = rest
        self._pause(_PAUSE_TUNNEL)  # nothing more is parsed on this connection

    def start_tunnel(self, ex: Exchange, conn: UpstreamConnection, response: bytes) -> None:
        self._tunnel = conn
        conn.sink = _TunnelSink(self)
        self.write(response)
        ex.bytes_sent += len(response)
        if self._tunnel_pending:
            conn.write(self._tunnel_pending)
            self._tunnel_pending = b""
        self.worker.request_finished(ex)
        ex.done = True
        self.active = None
        self._resume(_PAUSE_TUNNEL)
        self.deadline.disarm()

    # -- internals ------------------------------------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

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

    def _reject(self, error: TollwayError) -> None:
        """Bad input: answer (if no response is under way) and close; nothing is forwarded."""
        ex = self.current or self.active
        self.current = None
        self._pause(_PAUSE_QUEUE)
        if self.active is not None and self.active is not ex:
            self.active.keep_alive = False  # finish the response under way, then close
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


class _TunnelSink:
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

    def upstream_flush(self) -> None:
        pass


def _special_header(ex: Exchange, kind: int, value: bytes) -> None:
    if kind == _HOST:
        if ex.host:
            raise ClientError("more than one Host header")
        ex.host = value
    elif kind == _CONNECTION:
        ex.connection_header = ex.connection_header + b", " + value if ex.connection_header else value
    elif kind == _CL:
        ex.body_kind = REQ_LENGTH
        ex.content_length = int(value.strip(b" \t"))
    elif kind == _TE:
        check_transfer_encoding(value, 1)
        ex.body_kind = REQ_CHUNKED
    elif kind == _EXPECT:
        if value.strip(b" \t").lower() != b"100-continue":
            raise ClientError("unsupported Expect header")
        ex.expect_continue = True
    elif kind == _UPGRADE:
        ex.upgrade = value
    elif kind == _XFF:
        ex.x_forwarded_for = ex.x_forwarded_for + b", " + value if ex.x_forwarded_for else value
    elif kind == _XFP:
        ex.x_forwarded_proto = value
    elif kind == _XFH:
        ex.x_forwarded_host = value
    elif kind == _RID:
        if 0 < len(value) <= 200:
            ex.request_id = value


def _client_error(exc: httptools.HttpParserError) -> TollwayError:
    """httptools raises HttpParserCallbackError wrapping our own errors raised in callbacks."""
    cause = exc.__context__
    if isinstance(cause, TollwayError):
        return cause
    return ClientError(f"malformed request: {exc}")
