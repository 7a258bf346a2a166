"""Test support for tollway.state: real redis-server processes (standalone, replica, sentinel, cluster)
on free loopback ports, started from the installed binary and always torn down; a reachability probe
for the shared server at 127.0.0.1:6379; child processes that share a node table.

Nothing here skips: a test that needs Redis and finds none fails with what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_REDIS = ("127.0.0.1", 6379)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free too (ephemeral ports are too high)."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ping(host: str, port: int, timeout: float = 0.5, password: str | None = None) -> bool:
    """True when a Redis answers PING (+PONG, or -NOAUTH when it wants a password)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if password:
                sock.sendall(b"AUTH %s\r\n" % password.encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
    except OSError:
        return False


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None and os.path.exists("/usr/bin/redis-server"):
        path = "/usr/bin/redis-server"
    if path is None:
        pytest.fail(
            "this test starts its own redis-server, and none is installed "
            "(apt-get install redis-server, or put redis-server on PATH)"
        )
    return path


def redis_cli_binary() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        pytest.fail("this test needs redis-cli (apt-get install redis-tools) to form a cluster")
    return path


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout}s")


class RedisServer:
    """A redis-server of our own on a free port (or a given one), bounded in time, torn down after."""

    def __init__(self, directory: Path, args: list[str] | None = None, port: int | None = None) -> None:
        self.directory = directory
        self.args = args or []
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        for i, arg in enumerate(self.args):
            if arg == "--requirepass":
                self.password = self.args[i + 1]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    sentinel = False  # run as a sentinel (its config file is written by `start`)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log_file = str(self.directory / f"redis-{self.port}.log")
        if self.sentinel:
            conf = self.directory / "sentinel.conf"
            if not conf.exists():
                conf.write_text("\n".join(self.args) + "\n")
            cmd = [redis_server_binary(), str(conf), "--sentinel", "--port", str(self.port)]
            cmd += ["--bind", "127.0.0.1", "--dir", str(self.directory), "--logfile", log_file]
        else:
            cmd = [
                redis_server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", log_file,
                *self.args,
            ]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ping("127.0.0.1", self.port, password=self.password):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on {self.port} did not answer within {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.stopped_signal:
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    stopped_signal = False

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (kernel backlog) but never answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.stopped_signal = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.stopped_signal = False

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / f"redis-{self.port}.log").read_text(errors="replace")
        return ""

    def client(self, **kwargs):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5, **kwargs
        )


class ServerSet:
    """Every server a test started; all stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[RedisServer] = []

    def start(self, args: list[str] | None = None, port: int | None = None, name: str = "") -> RedisServer:
        directory = self.root / (name or f"redis{len(self.servers)}")
        server = RedisServer(directory, args, port)
        self.servers.append(server)
        return server.start()

    def start_sentinel(self, config_lines: list[str], name: str = "sentinel") -> RedisServer:
        """A sentinel whose config file holds `config_lines` (sentinel monitor ..., etc.)."""
        server = RedisServer(self.root / name, config_lines)
        server.sentinel = True
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def cleanup_prefix(host: str, port: int, prefix: str) -> None:
    """Delete the keys a test made (only its own prefix: other engineers share this server)."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@contextlib.contextmanager
def processes(
    specs: list[tuple[list[str], dict[str, str], tuple[int, ...]]],
) -> Iterator[list[subprocess.Popen[str]]]:
    """Child Python processes (fresh interpreters, like the supervisor's workers), killed at exit.
    Each spec is (argv, extra environment, file descriptors to pass)."""
    children = [
        subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
            pass_fds=fds,
            cwd=ROOT,
        )
        for cmd, env, fds in specs
    ]
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(Exception):
                child.communicate(timeout=5)


PYTHON = sys.executable
