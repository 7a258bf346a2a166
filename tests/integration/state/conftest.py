"""Fixtures for the tollway.state integration tests: Redis (the shared server, or one of our own),
per-test key prefixes, and our own redis-server processes for tests that stop, pause or fail them over."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.state_support import ServerSet, cleanup_prefix
from tollway.state.redis_backends import Standalone
from tollway.state.redis_client import RedisClient
from tollway.state.shared import SharedTable


@pytest.fixture
def prefix(redis_address: tuple[str, int]) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (the server is shared)."""
    value = f"twtest:{uuid.uuid4().hex[:12]}:"
    yield value
    cleanup_prefix(*redis_address, value)


@pytest.fixture
async def redis_backend(redis_address: tuple[str, int]) -> AsyncIterator[Standalone]:
    b = Standalone(RedisClient(*redis_address, timeout=2.0, connect_timeout=2.0))
    yield b
    await b.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerSet]:
    """servers.start(args) -> a RedisServer of this test's own; all stopped at teardown."""
    started = ServerSet(tmp_path)
    yield started
    started.stop_all()


@pytest.fixture
def table() -> Iterator[SharedTable]:
    t = SharedTable.create(1 << 12)
    yield t
    t.close()
