"""In-memory stand-ins for asyncio transports: drive `ClientConnection` and `UpstreamConnection` the way
the event loop would, without sockets (tests/plugins/harness.py, tests/unit/test_pool.py, bench/hotpath.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class MemoryTransport:
    """Just enough of an asyncio transport: records writes and the reading state."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self.peer = peer
        self.data = bytearray()
        self.closing = False
        self.aborted = False
        self.reading = True
        self.on_write: Callable[[bytes], None] | None = None

    def write(self, data: bytes) -> None:
        self.data += data
        if self.on_write is not None:
            self.on_write(data)

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class CountingTransport(MemoryTransport):
    """Counts the bytes written instead of keeping them: for benchmarks, where kept bytes would grow with
    every request and their copying would be measured as the gateway's cost."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        super().__init__(peer)
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
