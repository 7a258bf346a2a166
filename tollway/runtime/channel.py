"""The supervisor↔worker channel: length-prefixed pickled tuples over a Unix socket pair.

Both ends are this program, started by the same user, so pickle is safe here and lets a whole
validated config travel as one message. Messages are tuples whose first item names the kind:

  supervisor → worker: ("config", version, GatewayConfig)  ("drain", timeout)  ("collect", token)
                       ("health", {upstream: {target: state}})  ("reopen_logs",)
  worker → supervisor: ("ready", version)  ("config_failed", version, text)  ("collected", token, data)
                       ("event", kind, data)

("collect", token) is answered with the worker's metrics (tollway.counters.metrics snapshot
plus "connections" and "config_version"); a draining worker also sends ("collected", 0, data) with
its final numbers just before it exits.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

_LENGTH = struct.Struct("!I")
Message = tuple[Any, ...]


def encode(message: Message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class ChannelProtocol(asyncio.Protocol):
    """Reassembles frames and hands each decoded message to `on_message`."""

    def __init__(self, on_message: Callable[[Message], None], on_closed: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 4:
            (size,) = _LENGTH.unpack_from(buf)
            if len(buf) < 4 + size:
                return
            payload = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            self._on_message(pickle.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_closed()

    def send(self, message: Message) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(message))
        return True


async def open_channel(
    sock: socket.socket, on_message: Callable[[Message], None], on_closed: Callable[[], None]
) -> ChannelProtocol:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.connect_accepted_socket(lambda: ChannelProtocol(on_message, on_closed), sock)
    return protocol
