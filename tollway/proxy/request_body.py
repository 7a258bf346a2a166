"""The request-body side of one request: the body as the client connection parses it, on its way to
the backend.

Streamed as it arrives: to the upstream connection once a try has one, else buffered (reading pauses
past `_BUFFER_HIGH`), and kept for a replay up to the retry policy's limit (tollway.proxy.tries). Three
cases hold the request before it is forwarded:
- a chunked body whose first chunk has not parsed yet: the head waits for it, so a malformed first
  chunk is refused with nothing sent to a backend;
- a plugin's `buffer_request_body` transform: the whole body is read, transformed, then forwarded;
- a plugin's `whole_request_body` that awaits the rest of the body (key-auth's `key_in_body`).

`RequestBody` is a base class of `Exchange` rather than an object of its own, like `UpstreamTries`,
so a request costs no extra allocation.

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final

from tollway.errors import BodyTooLarge
from tollway.protocol.http1 import LAST_CHUNK, chunk
from tollway.protocol.request import REQ_CHUNKED, REQ_NONE
from tollway.proxy.tries import REPLAY_LIMIT, UpstreamTries

if TYPE_CHECKING:
    from tollway.proxy.server import ClientConnection
    from tollway.proxy.snapshot import Snapshot

# Request body buffered while no upstream connection takes it: reading pauses beyond this.
_BUFFER_HIGH: Final = 65536
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestBody(UpstreamTries):
    __slots__ = ("_awaiting_body", "_awaiting_chunk", "_body_waiter", "chunk_parsed")

    def __init__(self, client: ClientConnection, snapshot: Snapshot) -> None:
        super().__init__(client, snapshot)
        self._awaiting_body = False  # proceed() waits for a whole body to transform
        self._body_waiter: asyncio.Future[None] | None = None  # a plugin waits for it (whole_request_body)
        self._awaiting_chunk = False  # proceed() holds the head until the first chunk has parsed
        self.chunk_parsed = False  # a chunk of the (chunked) request body parsed completely

    # -- what the exchange provides -------------------------------------------------------------------
    def proceed(self) -> None:
        """Forward the request (plugins passed it, and its body is as far as it must be)."""
        raise NotImplementedError

    # -- called by the client connection as httptools parses the body ---------------------------------
    def request_body(self, data: bytes) -> None:
        """Called from the parser: an error raised here reaches the client connection's `_reject`,
        which answers it in this request's turn (a queued request must not answer before its turn)."""
        if self.done:
            return
        self.body_received += len(data)
        limit = self.max_body_size
        if limit and self.body_received > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        framed = chunk(data) if self.body_kind == REQ_CHUNKED else data
        replay = self._replay
        if replay is not None:
            service = self.service
            limit = service.cluster.retry.replay_limit if service is not None else REPLAY_LIMIT
            if self.body_received <= limit:
                replay.append(framed)
            else:
                self._replay = None
        conn = self.upstream
        if conn is not None:
            conn.write(framed)
        else:
            self._body_buf.append(framed)
            self._body_buffered += len(framed)
            if self._body_buffered > _BUFFER_HIGH and not self._awaiting_body:
                if self._awaiting_chunk:  # a first chunk this large: its size line parsed, send on
                    self.first_chunk_parsed()
                else:
                    self.client.pause_reading_for(self)

    def request_done(self) -> None:
        self.body_done = True
        if self._awaiting_body or self._awaiting_chunk:
            self._awaiting_body = self._awaiting_chunk = False
            if self._body_waiter is not None:
                self._wake_body_waiter()  # a plugin reads the body before it decides
                return
            self.proceed()  # the whole body is here: transform it and forward
            return
        conn = self.upstream
        if conn is not None and not self.done:
            if self.body_kind == REQ_CHUNKED:
                conn.write(LAST_CHUNK)
            if self.body_kind != REQ_NONE and conn.sink is self:
                conn.deadline.arm(conn.read_timeout, "read")

    def first_chunk_parsed(self) -> None:
        """Called by the client connection when a request chunk (size, data, CRLF) has parsed."""
        self.chunk_parsed = True
        if self._awaiting_chunk and not self.done:
            self._awaiting_chunk = False
            self.proceed()

    # -- holding the head -------------------------------------------------------------------------------
    def _hold_for_first_chunk(self) -> None:
        """A chunked body whose first chunk has not parsed yet: the head waits for it, so a malformed
        first chunk (bad size, data longer than its size) is refused with nothing sent to a backend."""
        self._awaiting_chunk = True
        self._read_on()

    def _read_on(self) -> None:
        """Read the body while the request is held (answering `Expect: 100-continue` first)."""
        if self.expect_continue and self.version == 1:
            self.expect_continue = False
            self.client.write(_CONTINUE)
        self.client.resume_reading_for(self)

    def _whole_body(self) -> bytes | Awaitable[bytes | None]:
        if self.body_done:
            return b"".join(self._body_buf)
        waiter = self._body_waiter
        if waiter is None:  # (request_done wakes it; so does the end of the request)
            waiter = self._body_waiter = asyncio.get_running_loop().create_future()
            self._awaiting_body = True  # read on without pausing: the body is at most max_size
            self._read_on()
        return self._body_arrival(waiter)

    async def _body_arrival(self, waiter: asyncio.Future[None]) -> bytes | None:
        await waiter
        return b"".join(self._body_buf) if self.body_done and not self.done else None

    def _wake_body_waiter(self) -> None:
        waiter = self._body_waiter
        self._body_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _transform_request_body(self) -> bool:
        """Before forwarding: True to go on; False while the body is still arriving or on failure."""
        if not self.body_done:
            self._awaiting_body = True
            self._read_on()
            return False
        transform = self.request_body_transform
        self.request_body_transform = None
        if transform is None:
            return True
        body = b"".join(self._body_buf)
        try:
            new = transform(body)
        except Exception as exc:
            self.fail(exc)
            return False
        if new is not None and new != body:
            self._body_buf = [new]
            self._body_buffered = len(new)
            self._replay = [new]
            self.content_length = len(new)
        return True
