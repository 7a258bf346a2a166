"""Shared fixtures: real gateway processes and scriptable backends, all on 127.0.0.1 port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.state_support import SHARED_REDIS, RedisServer, ping
from tests.support import Backend, Gateway, LoopThread, Responder
from tollway._build import stale_modules


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_modules()
    if stale:
        pytest.exit(
            "compiled modules are older than their source (the old code would be tested): "
            + ", ".join(stale)
            + "\nrebuild with: pip install -e '.[test]'  (or delete the .so files to test pure Python)",
            returncode=3,
        )


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture
def backend(loop_thread: LoopThread) -> Iterator[Callable[..., Backend]]:
    """backend(respond=None) -> a started Backend (echo by default)."""
    started: list[Backend] = []

    def start(respond: Responder | None = None) -> Backend:
        b = Backend(respond).start(loop_thread)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """gateway(config_dict, workers=1, env=None) -> a started Gateway, stopped after the test."""
    started: list[Gateway] = []

    def start(config: dict[str, Any] | str, workers: int = 1, env: dict[str, str] | None = None) -> Gateway:
        gw = Gateway(tmp_path / f"gateway{len(started)}.yaml", workers, env)
        gw.write_config(config)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The shared Redis at 127.0.0.1:6379, or — when none answers there — one started for the session
    (fails, never skips, when neither is possible)."""
    if ping(*SHARED_REDIS):
        yield SHARED_REDIS
        return
    server = RedisServer(tmp_path_factory.mktemp("redis-session"))
    try:
        server.start()
    except Exception as exc:
        pytest.fail(f"no Redis at 127.0.0.1:6379 and starting redis-server failed: {exc}")
    yield server.address
    server.stop()
