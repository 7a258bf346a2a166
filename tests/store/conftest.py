"""Fixtures of the config store tests: a fresh PostgreSQL database per test on the server at
127.0.0.1:5432 (dropped afterwards), SQLite files in tmp dirs, and a TCP relay in front of PostgreSQL
that a test can cut to play a store outage without stopping a server other people use."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.store.pg_server import OwnServer, answers, find_bindir
from tests.store.relay import Relay
from tests.support import LoopThread

PG_HOST = os.environ.get("TOLLWAY_TEST_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("TOLLWAY_TEST_PG_USER", "postgres")
_server = {"port": int(os.environ.get("TOLLWAY_TEST_PG_PORT", "5432"))}


def pg_dsn(database: str, port: int | None = None) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{port or _server['port']}/{database}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[int]:
    """The port of a PostgreSQL server: the machine's, or one of our own from the installed binaries."""
    if not os.environ.get("TOLLWAY_TEST_PG_START") and answers(PG_HOST, _server["port"]):
        yield _server["port"]
        return
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_HOST}:{_server['port']} and no PostgreSQL binaries are "
            "installed to start one (apt-get install postgresql): the store tests need a real server"
        )
    own = OwnServer(bindir)
    try:
        own.start()
    except (OSError, subprocess.SubprocessError) as exc:
        own.stop()
        pytest.fail(f"PostgreSQL is not reachable and starting one from {bindir} failed: {exc}")
    previous, _server["port"] = _server["port"], own.port
    try:
        yield own.port
    finally:
        _server["port"] = previous
        own.stop()


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(pg_dsn("postgres"), timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_HOST}:{_server['port']} ({exc}): the store tests need a "
            "real server (set TOLLWAY_TEST_PG_HOST/PORT/USER)"
        )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run_admin(sql: str) -> None:
    """In a thread of its own: fixtures may be set up while a test's event loop runs."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_admin(sql))
        except BaseException as exc:  # pytest.fail's exception too: re-raised in the caller
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if failure:
        raise failure[0]


def _create_database() -> str:
    name = f"tollway_test_{secrets.token_hex(6)}"
    _run_admin(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(name: str) -> None:
    _run_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_server: int) -> Iterator[str]:
    """The name of a fresh, empty database; dropped after the test."""
    name = _create_database()
    yield name
    _drop_database(name)


@pytest.fixture
def pg_dsn_fresh(pg_database: str) -> str:
    return pg_dsn(pg_database)


@pytest.fixture
def relay(pg_server: int) -> Iterator[Relay]:
    """A TCP relay to PostgreSQL on a port of its own: `relay.cut()` drops every connection and refuses
    new ones (the store is down), `relay.restore()` brings it back on the same port."""
    thread = LoopThread()
    r = Relay(thread, PG_HOST, _server["port"])
    r.restore()
    yield r
    r.cut()
    thread.close()


@pytest.fixture
async def sqlite_path(tmp_path: Path) -> AsyncIterator[Path]:
    yield tmp_path / "store" / "tollway.db"
