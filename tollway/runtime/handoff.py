"""Connections of a dead worker go to the live ones while its replacement starts.

Each worker has an SO_REUSEPORT listening socket of its own, which the supervisor keeps open; the
kernel hashes every new connection to one of them. When a worker dies, connections keep arriving on
its socket, and without help they would wait there until the replacement has started and applied
its config — a second or more. So while a slot has no worker, the supervisor accepts on that socket
itself and passes each accepted socket (its file descriptor, over a Unix socket with SCM_RIGHTS) to a
live worker, which serves it like one it accepted. The supervisor never reads a byte of it. When the
replacement reports ready, the supervisor stops; the replacement's own server accepts from then on.

With a single worker there is nobody to pass to: connections wait for the replacement, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable

log = logging.getLogger("tollway.supervisor")
ENV_FD = "TOLLWAY_HANDOFF_FD"
_BATCH = 64  # descriptors accepted (and passed) per wake-up; the rest wait for the next one


class Orphans:
    """Supervisor side: accept on the listening sockets of dead workers, pass the connections on.

    `receivers()` gives the handoff sockets of the workers that can take connections now."""

    def __init__(self, loop: asyncio.AbstractEventLoop, receivers: Callable[[], list[socket.socket]]) -> None:
        self.loop = loop
        self.receivers = receivers
        self.adopted: dict[int, list[socket.socket]] = {}  # slot -> listening sockets accepted on
        self.passed: dict[int, int] = {}  # slot -> connections handed to other workers for it
        self._next = 0
        self._waiting = False  # no worker could take connections: not accepting until one is ready

    def watch(self, slot: int, socks: Iterable[socket.socket]) -> None:
        if slot in self.adopted:
            return
        socks = list(socks)
        self.adopted[slot] = socks
        self.passed[slot] = 0
        if not self._waiting:
            self._listen(slot, socks)

    def _listen(self, slot: int, socks: list[socket.socket]) -> None:
        for sock in socks:
            self.loop.add_reader(sock.fileno(), self._accept, slot, sock)

    def _unlisten(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())

    def release(self, slot: int) -> None:
        """The slot's new worker is ready: it accepts on its socket itself."""
        self._unlisten(self.adopted.pop(slot, []))
        if self._waiting:  # a worker is ready again: the other dead slots' connections can go to it
            self._waiting = False
            for other, socks in self.adopted.items():
                self._listen(other, socks)
        passed = self.passed.pop(slot, 0)
        if passed:
            log.info(
                "worker %d is back; the other workers served the %d connections that came for it",
                slot,
                passed,
            )

    def close(self) -> None:
        for socks in self.adopted.values():
            self._unlisten(socks)
        self.adopted.clear()

    def _accept(self, slot: int, listener: socket.socket) -> None:
        if not self.receivers():  # every worker is down: connections wait in the backlogs meanwhile
            self._waiting = True
            for socks in self.adopted.values():
                self._unlisten(socks)
            return
        for _ in range(_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: leave it queued, try at the next wake-up
                log.warning("accepting for a restarting worker failed: %s", exc)
                return
            with conn:  # our copy closes; the worker's stays open
                if self._pass(conn):
                    self.passed[slot] = self.passed.get(slot, 0) + 1

    def _pass(self, conn: socket.socket) -> bool:
        receivers = self.receivers()
        for i in range(len(receivers)):
            receiver = receivers[(self._next + i) % len(receivers)]
            try:
                socket.send_fds(receiver, [b"c"], [conn.fileno()])
            except OSError:
                continue  # that worker is going away or is flooded: the next one
            self._next += i + 1
            return True
        log.warning("no live worker could take a connection while a worker restarts; it is closed")
        return False


def adopt(
    loop: asyncio.AbstractEventLoop, receiver: socket.socket, serve: Callable[[socket.socket], None]
) -> None:
    """Worker side: serve every connection the supervisor passes over `receiver`."""
    receiver.setblocking(False)

    def on_readable() -> None:
        for _ in range(_BATCH):
            try:
                _, fds, _, _ = socket.recv_fds(receiver, 16, _BATCH)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                loop.remove_reader(receiver.fileno())
                return
            if not fds:
                loop.remove_reader(receiver.fileno())  # the supervisor is gone
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                serve(sock)

    loop.add_reader(receiver.fileno(), on_readable)
