"""The access log: one JSON line per request, written without ever blocking the event loop.

The event loop only serialises a line (orjson, well under a microsecond) and appends it to a list.
Every half second, or when the list passes `buffer_size` bytes, the batch is handed to a writer
thread through a bounded queue. If the sink is slow or the disk is full, the queue fills and batches
are dropped and counted (`dropped_lines`) — traffic never waits for the log.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, BinaryIO

import orjson

if TYPE_CHECKING:
    from tollway.config.schema import AccessLog as AccessLogSettings
    from tollway.proxy.exchange import Exchange

_FLUSH_INTERVAL = 0.5
_QUEUE_BATCHES = 64


class AccessLog:
    __slots__ = (
        "_buffer",
        "_buffered",
        "_loop",
        "_queue",
        "_second",
        "_second_text",
        "_thread",
        "_timer",
        "buffer_size",
        "dropped_lines",
        "path",
        "written_lines",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: AccessLogSettings) -> None:
        self._loop = loop
        self.path = settings.path
        self.buffer_size = settings.buffer_size
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._second = -1
        self._second_text = ""
        self.dropped_lines = 0
        self.written_lines = 0
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(_QUEUE_BATCHES)
        self._thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._thread.start()
        self._timer: asyncio.TimerHandle | None = None

    def log(self, ex: Exchange) -> None:
        route = ex.route
        target = ex.target
        line = orjson.dumps(
            {
                "time": self._timestamp(),
                "client": ex.client.peer_ip.decode("latin-1"),
                "method": ex.method.decode("latin-1"),
                # The path as the client sent it, never the query (it may carry tokens). A request
                # refused before routing has no parsed path yet: take it from its target.
                "path": ex.raw_path or ex.url.partition(b"?")[0].decode("latin-1"),
                "route": route.name if route is not None else None,
                "service": route.service.name if route is not None else None,
                "upstream": target.label if target is not None else None,
                "status": ex.status,
                "bytes_sent": ex.bytes_sent,
                "bytes_received": ex.body_received,
                "duration_ms": round(ex.elapsed * 1000, 3),
                "upstream_ms": round(ex.upstream_time * 1000, 3) if ex.upstream_time >= 0 else None,
                "request_id": ex.request_id.decode("latin-1"),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= self.buffer_size:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(_FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        batch, self._buffer, self._buffered = self._buffer, [], 0
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped_lines += len(batch)

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is buffered and stop the writer (at shutdown)."""
        self.flush()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    # -- writer thread ------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        sink = self._open()
        while True:
            batch = self._queue.get()
            if batch is None:
                break
            try:
                sink.write(b"".join(batch))
                sink.flush()
                self.written_lines += len(batch)
            except OSError:
                self.dropped_lines += len(batch)  # a full disk or a closed pipe: count, never stall
        if sink is not sys.stdout.buffer:
            sink.close()

    def _open(self) -> BinaryIO:
        if self.path == "-":
            return sys.stdout.buffer
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        return open(self.path, "ab")
