"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from tollway.config.loader import load_text
from tollway.proxy.exchange import Exchange
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


@pytest.fixture
def exchange(client: ClientConnection) -> Callable[..., Exchange]:
    """exchange(traceparent=b"", tracestate=b"") -> an exchange on the offline client, with the trace
    headers a client sent (empty: none)."""

    def make(traceparent: bytes = b"", tracestate: bytes = b"") -> Exchange:
        ex = Exchange(client, client.worker.snapshot)
        ex.traceparent = traceparent
        ex.tracestate = tracestate
        return ex

    return make
