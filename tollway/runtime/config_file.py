"""Reading the config file for a reload: only once it is stable, and never to apply an empty config.

An editor or a script that truncates the file and writes it in place leaves moments where the file is
empty or cut short; a reload that reads it then would apply "no routes" (every request 404) or a
prefix of the route list. So a reload reads the file until two reads `SETTLE` seconds apart agree, and
refuses a config without routes unless it says `gateway.allow_empty_routes: true`. Replacing the file
atomically (write a new file, rename it over the old one) avoids half-written reads altogether.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tollway.config.apart import run_apart
from tollway.config.loader import PluginCheck, load_file, load_text
from tollway.config.schema import GatewayConfig
from tollway.errors import ConfigError

SETTLE = 0.1  # seconds between the two reads that must agree
SETTLE_MAX = 5.0  # a file still changing after this is not reloaded

Stat = tuple[int, int, int]
T = TypeVar("T")


def stat(path: Path) -> Stat | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


async def read_stable(path: Path) -> tuple[bytes | None, Stat | None]:
    """The file's bytes once two reads `SETTLE` apart agree (None if it cannot be read), and its stat
    as of then. ConfigError if it is still changing after `SETTLE_MAX`."""
    previous = read(path)
    deadline = time.monotonic() + SETTLE_MAX
    while True:
        await asyncio.sleep(SETTLE)
        current_stat = stat(path)
        current = read(path)
        if current == previous:
            return current, current_stat
        if time.monotonic() > deadline:
            raise ConfigError([f"{path}: the file kept changing for {SETTLE_MAX:g}s; not applied"], str(path))
        previous = current


def load_for_reload(
    path: Path,
    data: bytes | None,
    plugins: PluginCheck,
    entities: Callable[[GatewayConfig], GatewayConfig] | None = None,
) -> GatewayConfig:
    """Validate the file (`data`: its bytes as read, or None to read it now) for a reload, with the
    entities of a config store when there is one (`entities`, tollway.store): ConfigError if it is
    invalid, empty, or has no routes without `gateway.allow_empty_routes`. The parse runs in a forked
    child (tollway.config.apart)."""
    config = run_apart(lambda: _load(path, data, plugins))
    if entities is not None:
        config = entities(config)
    _check_routes(config, str(path))
    return config


def hold_for_reload(
    path: Path, data: bytes | None, plugins: PluginCheck, finish: Callable[[GatewayConfig], T]
) -> T:
    """`load_for_reload` without a config store, and `finish(config)` too, all in the forked child:
    only what `finish` returns (the supervisor's held config) reaches this process."""
    return run_apart(lambda: finish(_check_routes(_load(path, data, plugins), str(path))))


def _load(path: Path, data: bytes | None, plugins: PluginCheck) -> GatewayConfig:
    source = str(path)
    if data is not None and not data.strip():
        raise ConfigError([f"{source}: the file is empty (being written?); not applied"], source)
    if data is None:
        return load_file(path, plugins)
    try:
        return load_text(data.decode("utf-8"), source, plugins)
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], source) from None


def _check_routes(config: GatewayConfig, source: str) -> GatewayConfig:
    if not config.routes and not config.gateway.allow_empty_routes:
        raise ConfigError(
            [f"{source}: {NO_ROUTES}; not applied (gateway.allow_empty_routes: true allows it)"], source
        )
    return config


NO_ROUTES = "the config has no routes, so every request would get 404"
