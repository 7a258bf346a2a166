"""Where access log lines go: a writer thread per worker, and the sinks it writes to.

The event loop hands over whole batches of complete lines (`submit`, never blocking); the thread
writes each batch and counts what it wrote and what it had to drop. Guarantees:

- **No torn lines.** A file is opened with O_APPEND and each batch is one ``write`` of whole lines,
  so the workers' lines never interleave mid-line. A pipe (stdout under a process manager) only
  keeps writes of up to PIPE_BUF bytes whole, so batches going to a pipe are cut at line boundaries
  into pieces of at most PIPE_BUF.
- **Reopen for logrotate.** `reopen()` (SIGUSR1, relayed by the supervisor) makes the thread open
  the path again before its next batch: lines already submitted go to the renamed file, later ones
  to the new file, none to both and none lost.
- **Never stall traffic.** The sink is opened by the thread too (opening a FIFO nobody reads blocks).
  A slow sink fills the bounded queue and later batches are dropped and counted; a failing write (a
  full disk, a vanished syslog daemon) drops its batch and is counted.
- **Syslog** (RFC 5424 over UDP or a Unix datagram socket such as /dev/log): one datagram per line,
  ``<PRI>1 TIMESTAMP HOST APP PROCID - - {json}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollway.config.schema import AccessLog as AccessLogSettings

log = logging.getLogger("tollway.access_log")
QUEUE_BATCHES = 64
_SEVERITY_INFO = 6


class Sink:
    """Writes whole batches; raises OSError when it cannot (the batch is then counted as dropped)."""

    def write(self, batch: list[bytes]) -> None:
        raise NotImplementedError

    def reopen(self) -> None:
        """Open the destination again (files only)."""

    def close(self) -> None:
        """Release the destination."""


class FdSink(Sink):
    """A file (opened O_APPEND) or standard output."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd = -1
        self.pipe = False
        self._open()

    def _open(self) -> None:
        if self.path is None:
            self.fd = sys.stdout.fileno()
        else:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self.pipe = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
        except OSError:
            self.pipe = False

    def write(self, batch: list[bytes]) -> None:
        if self.pipe:
            for piece in _pipe_pieces(batch, select.PIPE_BUF):
                _write_all(self.fd, piece)
        else:
            _write_all(self.fd, b"".join(batch))

    def reopen(self) -> None:
        if self.path is None:
            return
        old = self.fd
        self._open()  # if this fails, the old descriptor stays in use
        os.close(old)

    def close(self) -> None:
        if self.path is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SyslogSink(Sink):
    """RFC 5424 messages over UDP or a Unix datagram socket, one per line."""

    def __init__(self, settings: AccessLogSettings) -> None:
        from tollway.config.schema import syslog_target

        kind, address = syslog_target(settings.syslog_address)
        self.address = address
        family = socket.AF_UNIX if kind == "unix" else _inet_family(address[0])
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)  # a stuck syslog daemon costs the writer thread a second, not traffic
        host, app = _syslog_token(socket.gethostname()), _syslog_token(settings.syslog_app_name)
        self.prefix_tail = f" {host} {app} {os.getpid()} - - ".encode()
        self.pri = b"<%d>1 " % (settings.syslog_facility * 8 + _SEVERITY_INFO)

    def write(self, batch: list[bytes]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
        prefix = self.pri + stamp + self.prefix_tail
        failed = 0
        error: OSError | None = None
        for line in batch:
            try:
                self.sock.sendto(prefix + line.rstrip(b"\n"), self.address)
            except OSError as exc:  # no daemon, a full buffer, a line too big for a datagram
                failed += 1
                error = exc
        if error is not None:
            raise PartialWrite(failed) from error

    def close(self) -> None:
        self.sock.close()


class PartialWrite(OSError):
    def __init__(self, failed: int) -> None:
        super().__init__(f"{failed} lines not sent")
        self.failed = failed


class LogWriter:
    """The writer thread of one access log, and its counters (read from the event loop)."""

    def __init__(self, settings: AccessLogSettings) -> None:
        self.kind = settings.resolved_sink
        self.path = settings.path
        self.written_lines = 0
        self.dropped_lines = 0  # counted by this thread only
        self._reopen = threading.Event()
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(QUEUE_BATCHES)
        self._settings = settings
        self.sink: Sink | None = None
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        return self.path if self.kind == "file" else self.kind

    def _make_sink(self, settings: AccessLogSettings) -> Sink:
        if self.kind == "syslog":
            return SyslogSink(settings)
        return FdSink(settings.path if self.kind == "file" else None)

    def submit(self, batch: list[bytes]) -> bool:
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            return False
        return True

    def reopen(self) -> None:
        self._reopen.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait([])  # wake the thread so an idle log reopens now, not at its next line

    def close(self, timeout: float = 2.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _open(self) -> Sink | None:
        try:
            return self._make_sink(self._settings)
        except OSError as exc:  # an unwritable path: count every line as dropped, keep serving
            where, reason = self.describe(), exc.strerror or exc
            log.error("cannot open the access log (%s): %s; its lines are dropped and counted", where, reason)
            return None

    def _run(self) -> None:
        sink = self.sink = self._open()
        while True:
            batch = self._queue.get()
            if batch is None:
                break
            if self._reopen.is_set():
                self._reopen.clear()
                if sink is None:
                    sink = self.sink = self._open()  # the path may be writable now
                else:
                    try:
                        sink.reopen()
                    except OSError as exc:
                        where, reason = self.describe(), exc.strerror or exc
                        log.error("cannot reopen the access log (%s): %s", where, reason)
            if not batch:
                continue
            if sink is None:
                self.dropped_lines += len(batch)
                continue
            try:
                sink.write(batch)
                self.written_lines += len(batch)
            except PartialWrite as exc:
                self.dropped_lines += exc.failed
                self.written_lines += len(batch) - exc.failed
            except OSError:
                self.dropped_lines += len(batch)  # a full disk or a closed pipe: count, never stall
        if sink is not None:
            sink.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pipe_pieces(batch: list[bytes], limit: int) -> list[bytes]:
    """Join lines into pieces of at most `limit` bytes, cut only between lines."""
    pieces: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in batch:
        if current and size + len(line) > limit:
            pieces.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append(b"".join(current))
    return pieces


def _inet_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _syslog_token(text: str) -> str:
    """RFC 5424 header fields are printable ASCII without spaces; '-' when empty."""
    token = "".join(c for c in text if 33 <= ord(c) <= 126)
    return token or "-"
