"""The supervisor's sockets and child processes: listening sockets shared by every worker
(SO_REUSEPORT), and reaping or killing a worker process without blocking the event loop."""

from __future__ import annotations

import asyncio
import socket
import subprocess


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def reap(process: subprocess.Popen[bytes]) -> int | None:
    for _ in range(200):
        code = process.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.01)
    return process.poll()


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
