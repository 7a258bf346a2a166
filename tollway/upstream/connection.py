"""One keep-alive connection to a backend: writes a request, frames the response, hands bytes on.

The response head is parsed here (`tollway.protocol.http1`); the body is passed through as the
`data_received` buffers arrive, never re-buffered, with its end found by counting Content-Length
bytes or following chunk boundaries. The exchange that owns the request (the "sink") decides what
the client sees. After a 101 the connection becomes one half of a byte tunnel.

Compiled with mypyc (see setup.py): a plain class implementing the asyncio protocol methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tollway.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResetError,
    UpstreamTimeout,
)
from tollway.protocol.deadline import Deadline
from tollway.protocol.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedDecoder,
    ResponseHead,
    find_head_end,
    parse_response_head,
)

if TYPE_CHECKING:
    import asyncio

    from tollway.proxy.exchange import Exchange
    from tollway.proxy.server import TunnelSink
    from tollway.upstream.pool import Pool


class UpstreamConnection:
    __slots__ = (
        "_buf",
        "_decoder",
        "_remaining",
        "_transport_write",
        "body_kind",
        "deadline",
        "head",
        "idle_since",
        "keep_alive",
        "method",
        "pool",
        "read_timeout",
        "reading_paused",
        "received",
        "requests",
        "sink",
        "transport",
        "tunnel",
        "tunnel_sink",
        "write_timeout",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # The transport's write, bound once: a call through it skips the lookup by name on each request.
        self._transport_write: Callable[[bytes], object] | None = None
        self.sink: Exchange | None = None  # the exchange this connection currently serves
        self.tunnel_sink: TunnelSink | None = None
        self.tunnel = False
        self.method = b"GET"
        self.head: ResponseHead | None = None
        self.body_kind = BODY_NONE
        self.keep_alive = True
        self.requests = 0
        self.idle_since = 0.0  # the pool's clock when it was last released (kept idle)
        self.received = 0  # response bytes received for the current request
        self.read_timeout = 60.0
        self.write_timeout = 60.0
        self.reading_paused = False  # by the client side, while the client reads slower than we receive
        self._buf = b""
        self._remaining = 0
        self._decoder: ChunkedDecoder | None = None
        self.deadline = Deadline(pool.loop, self._timed_out)

    def __repr__(self) -> str:
        if self.transport is None or self.transport.is_closing():
            state = "closed"
        else:
            state = "tunnel" if self.tunnel else "active" if self.sink is not None else "idle"
        return f"<UpstreamConnection {self.pool.label} {state} requests={self.requests}>"

    # -- asyncio protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._transport_write = transport.write
        transport.set_write_buffer_limits(65536)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.tunnel_sink is not None:
                self.tunnel_sink.upstream_body(data)
            return
        sink = self.sink
        if sink is None:
            # A backend talking out of turn on an idle connection: it cannot be trusted any more.
            self.close()
            return
        self.received += len(data)
        try:
            if self.head is None:
                self._on_head_data(sink, data)
            else:
                self._on_body_data(sink, data)
        except UpstreamError as exc:
            self._fail(exc, False)
            return
        if self.sink is not None and not self.reading_paused:  # more to come: the read timeout restarts
            self.deadline.arm(self.read_timeout, "read")

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        self.pool.forget(self)
        if self.tunnel:
            tunnel_sink, self.tunnel_sink = self.tunnel_sink, None
            if tunnel_sink is not None:
                tunnel_sink.upstream_complete()
            return
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self.head is not None and self.body_kind == BODY_UNTIL_CLOSE:
            sink.upstream_complete()
            return
        # Nothing received on a reused connection: the backend closed it as we sent the request.
        replayable = self.received == 0 and self.requests > 1
        if self.head is None:
            error = UpstreamResetError("upstream closed the connection before responding")
        else:
            error = UpstreamResetError("upstream closed the connection mid-response")
        sink.upstream_failed(error, replayable)

    def pause_writing(self) -> None:
        """The backend reads slower than the client sends: stop reading from the client, and give the
        backend `write_timeout` to take more."""
        if self.tunnel_sink is not None:
            self.tunnel_sink.upstream_pause_writing()
        elif self.sink is not None:
            self.deadline.arm(self.write_timeout, "write")
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.tunnel_sink is not None:
            self.tunnel_sink.upstream_resume_writing()
        elif self.sink is not None:
            sink = self.sink
            if sink.body_done:
                self.deadline.arm(self.read_timeout, "read")
            else:
                self.deadline.disarm()  # the rest of the body comes at the client's pace
            sink.upstream_resume_writing()

    # -- flow control from the client side ------------------------------------------------------------
    def pause_reading(self) -> None:
        """The client reads slower than the backend sends. Its send timeout applies meanwhile, not our
        read timeout: a slow client is not a slow backend."""
        transport = self.transport
        if transport is not None and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
            if not self.tunnel:
                self.deadline.disarm()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
            if self.sink is not None:
                self.deadline.arm(self.read_timeout, "read")

    # -- request side -------------------------------------------------------------------------------------
    def start(self, sink: Exchange, method: bytes, read_timeout: float, write_timeout: float) -> None:
        """Bind this connection to a request about to be written."""
        self.sink = sink
        self.method = method
        self.head = None
        self.received = 0
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.keep_alive = True
        self.requests += 1
        self.deadline.arm(read_timeout, "read")

    def write(self, data: bytes) -> None:
        write = self._transport_write
        if write is not None:
            write(data)

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.keep_alive = False
        self.sink = None
        self.tunnel_sink = None
        if self.transport is not None:
            self.transport.abort()

    # -- response side -------------------------------------------------------------------------------------
    def _on_head_data(self, sink: Exchange, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = find_head_end(buf, len(self._buf))
            if end < 0 or end > self.pool.max_head_size:
                if len(buf) > self.pool.max_head_size:
                    raise UpstreamProtocolError("upstream response head is too large")
                self._buf = buf
                return
            self._buf = b""
            raw = buf[:end] if end < len(buf) else buf
            head = parse_response_head(raw, self.method)
            rest = buf[end:]
            if head.status == 101:
                self.keep_alive = False
                self.deadline.disarm()
                sink.upstream_upgraded(head, raw, rest)  # the client side calls `start_tunnel`
                return
            if head.status >= 200:
                break
            sink.upstream_head(head, raw)  # a 1xx interim response, then the real one
            buf = rest
            if not buf:
                return
        self.head = head
        self.keep_alive = head.keep_alive
        kind = self.body_kind = head.body_kind
        sink.upstream_head(head, raw)
        if self.sink is not sink:
            return  # the exchange let go of this response (a retry on its status, a failed plugin)
        if kind == BODY_LENGTH:
            self._remaining = head.content_length
        elif kind == BODY_CHUNKED:
            self._decoder = ChunkedDecoder(False)
        elif kind == BODY_NONE:
            if rest:
                self.keep_alive = False  # bytes after a body-less response: not reusable
            self._complete(sink)
            return
        if rest:
            self._on_body_data(sink, rest)
        elif self.sink is not None:
            sink.upstream_flush()

    def _on_body_data(self, sink: Exchange, data: bytes) -> None:
        kind = self.body_kind
        if kind == BODY_LENGTH:
            remaining = self._remaining - len(data)
            if remaining > 0:
                self._remaining = remaining
                sink.upstream_body(data)
                return
            if remaining < 0:
                self.keep_alive = False  # the backend sent more than it announced
                data = data[: self._remaining]
            self._remaining = 0
            sink.upstream_body(data)
            self._complete(sink)
        elif kind == BODY_CHUNKED:
            decoder = self._decoder
            assert decoder is not None
            used = decoder.feed(data)
            if used < len(data):
                self.keep_alive = False
                data = data[:used]
            sink.upstream_body(data)
            if decoder.done:
                self._complete(sink)
        else:
            sink.upstream_body(data)

    def _complete(self, sink: Exchange) -> None:
        self.deadline.disarm()
        self.sink = None
        self._decoder = None
        sink.upstream_complete()

    def _timed_out(self, reason: str) -> None:
        if self.sink is None:
            return
        self._fail(UpstreamTimeout(f"upstream {reason} timed out"), False)

    def _fail(self, error: UpstreamError, replayable: bool) -> None:
        sink, self.sink = self.sink, None
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.upstream_failed(error, replayable)
