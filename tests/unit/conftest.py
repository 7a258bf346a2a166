"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tollway.config.loader import load_text
from tollway.proxy.server import ClientConnection
from tollway.runtime.worker import Worker


@pytest.fixture(scope="module")
def client() -> Iterator[ClientConnection]:
    """A client connection without a socket, on a worker with the default config: exchanges are compiled
    classes and need a real one."""
    loop = asyncio.new_event_loop()
    worker = Worker(loop, 0, None, [])  # type: ignore[arg-type]
    worker.apply_config(1, load_text("gateway: {access_log: {enabled: false}}"))
    yield ClientConnection(worker)
    loop.close()
