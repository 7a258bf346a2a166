"""The lazy per-connection timer: one pending handle whatever the number of re-arms, firing exactly
when the latest deadline passes. Driven by a fake loop with a manual clock (no sleeping)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tollway.protocol.deadline import Deadline, loop_clock


class Handle:
    def __init__(self, loop: FakeLoop, when: float, callback: Callable[[], None]) -> None:
        self.loop = loop
        self._when = when
        self.callback = callback
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """`time`, `call_at` and a manual clock: `advance` runs what falls due, in order."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(self, when, callback)
        self.handles.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            due = [h for h in self.handles if not h.cancelled and h.when() <= target]
            if not due:
                break
            handle = min(due, key=Handle.when)
            self.handles.remove(handle)
            self.now = max(self.now, handle.when())
            handle.callback()
        self.now = target

    def live(self) -> int:
        return sum(1 for h in self.handles if not h.cancelled)


def make() -> tuple[FakeLoop, Deadline, list[str]]:
    loop = FakeLoop()
    fired: list[str] = []
    return loop, Deadline(loop, fired.append), fired  # type: ignore[arg-type]


def test_fires_once_when_due() -> None:
    loop, deadline, fired = make()
    deadline.arm(5, "header")
    loop.advance(4.9)
    assert fired == []
    loop.advance(0.2)
    assert fired == ["header"]
    loop.advance(100)
    assert fired == ["header"]
    assert deadline.at == 0.0


def test_rearming_later_keeps_one_handle_and_moves_the_deadline() -> None:
    loop, deadline, fired = make()
    deadline.arm(5, "body")
    for _ in range(1000):  # a busy connection re-arms on every read
        loop.advance(1)
        deadline.arm(5, "body")
    assert loop.live() == 1
    assert fired == []
    loop.advance(4.9)
    assert fired == []
    loop.advance(0.2)
    assert fired == ["body"]


def test_a_sooner_deadline_replaces_the_pending_handle() -> None:
    loop, deadline, fired = make()
    deadline.arm(60, "keepalive")
    deadline.arm(1, "header")
    assert loop.live() == 1
    loop.advance(1.01)
    assert fired == ["header"]


def test_the_latest_reason_is_reported() -> None:
    loop, deadline, fired = make()
    deadline.arm(5, "header")
    deadline.arm(10, "body")
    loop.advance(6)
    assert fired == []
    loop.advance(5)
    assert fired == ["body"]


def test_disarm_prevents_firing_but_can_be_rearmed() -> None:
    loop, deadline, fired = make()
    deadline.arm(5, "send")
    deadline.disarm()
    loop.advance(10)
    assert fired == []
    assert loop.live() == 0  # the lazy handle fired, saw nothing armed, and did not reschedule
    deadline.arm(5, "send")
    loop.advance(5.01)
    assert fired == ["send"]


def test_cancel_drops_the_handle() -> None:
    loop, deadline, fired = make()
    deadline.arm(5, "keepalive")
    deadline.cancel()
    assert loop.live() == 0
    loop.advance(10)
    assert fired == []


def test_the_callback_may_rearm() -> None:
    loop = FakeLoop()
    fired: list[str] = []

    def on_expire(reason: str) -> None:
        fired.append(reason)
        if len(fired) < 3:
            deadline.arm(1, f"again{len(fired)}")

    deadline = Deadline(loop, on_expire)  # type: ignore[arg-type]
    deadline.arm(1, "first")
    loop.advance(10)
    assert fired == ["first", "again1", "again2"]


def test_repr() -> None:
    _loop, deadline, _ = make()
    assert repr(deadline) == "<Deadline disarmed>"
    deadline.arm(5, "header")
    assert repr(deadline) == "<Deadline header at 1005.000>"


def test_the_clock_is_the_loops() -> None:
    """asyncio's loops: time.monotonic itself (what their time() returns); any other loop: its time."""
    loop = asyncio.new_event_loop()
    try:
        assert loop_clock(loop) is time.monotonic
    finally:
        loop.close()
    fake = FakeLoop()
    clock = loop_clock(fake)  # type: ignore[arg-type]
    fake.now = 1234.5
    assert clock() == 1234.5
