"""A lazily re-armed timer: one per connection, however many requests it carries.

Setting a deadline on every request and every read with ``loop.call_later`` would create and cancel a
timer handle each time. Here `arm` only stores a number; the single pending handle, when it fires,
checks the stored deadline and either re-schedules itself for it or reports a timeout. So a busy
keep-alive connection costs one timer per timeout period, not one per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The loop's clock as a plain callable, read on every request (`arm`, idle pool connections).

    asyncio's own loops return ``time.monotonic()`` from `time`, a Python method: calling the C function
    directly gives the same value without a Python frame. Any other loop (uvloop, a test's fake clock)
    is asked through its bound `time`, looked up once here instead of once per call."""
    if getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


class Deadline:
    __slots__ = ("_clock", "_handle", "_handle_at", "_loop", "_on_expire", "at", "reason")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[str], None]) -> None:
        self._loop = loop
        self._clock = loop_clock(loop)
        self._on_expire = on_expire
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0  # when the pending handle fires: kept here, `arm` runs on every request
        self.at = 0.0  # loop time of the deadline; 0 = none
        self.reason = ""

    def arm(self, seconds: float, reason: str) -> None:
        at = self._clock() + seconds
        self.at = at
        self.reason = reason
        if self._handle is None:
            self._schedule(at)
        elif at < self._handle_at:
            # A sooner deadline than the pending handle: the lazy handle would fire too late.
            self._handle.cancel()
            self._schedule(at)

    def _schedule(self, at: float) -> None:
        self._handle = self._loop.call_at(at, self._fire)
        self._handle_at = at

    def disarm(self) -> None:
        self.at = 0.0

    def cancel(self) -> None:
        self.at = 0.0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        at = self.at
        if not at:
            return
        if self._clock() < at:
            self._schedule(at)
            return
        self.at = 0.0
        self._on_expire(self.reason)

    def __repr__(self) -> str:
        state = f"{self.reason} at {self.at:.3f}" if self.at else "disarmed"
        return f"<Deadline {state}>"
