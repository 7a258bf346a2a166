"""Request ids unique across workers and restarts (like nginx's $request_id), handed out as their
whole ``X-Request-Id`` header line.

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

from binascii import hexlify
from typing import Final

_HEX2_CRLF: Final = [b"%02x\r\n" % i for i in range(256)]
RID_NAME: Final = b"X-Request-Id: "
RID_AT: Final = len(RID_NAME)  # where the id starts in its header line


class RequestIds:
    """Request ids unique across workers and restarts: a random per-process prefix and a counter
    (32 hex digits, like nginx's $request_id), without the cost of a UUID per request. Handed out as
    the whole ``X-Request-Id: <id>\\r\\n`` line: the upstream head takes it as one piece."""

    __slots__ = ("_counter", "_high", "_high_of", "_prefix")

    def __init__(self, prefix: bytes) -> None:
        self._prefix = prefix
        self._counter = 0
        self._high_of = -1  # the counter's bits above the last 8 that `_high` spells
        self._high = b""  # "X-Request-Id: ", the prefix and the counter's first 14 hex digits

    def next_line(self) -> bytes:
        # == b"X-Request-Id: %s%016x\r\n" % (prefix, counter): the first 30 digits change once every
        # 256 ids, so most lines cost one table lookup and one concatenation
        counter = self._counter + 1
        self._counter = counter
        high = counter >> 8
        if high != self._high_of:
            self._high_of = high
            self._high = RID_NAME + self._prefix + hexlify(high.to_bytes(7, "big"))
        return self._high + _HEX2_CRLF[counter & 0xFF]

    def next(self) -> bytes:
        """The next id alone."""
        return self.next_line()[RID_AT:-2]


__all__ = ["RID_AT", "RID_NAME", "RequestIds"]
