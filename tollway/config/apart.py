"""Parse and validate a config in a short-lived forked child, so the parser's memory never enters the
long-lived process.

Loading a YAML file builds a node tree (with a position mark per node) and a plain document before
the validated models exist: at 10,000 routes and 10,000 consumers that is ~150 MB at the peak for a
~30 MB result. Freed, that memory mostly stays in the process (the survivors are scattered over the
allocator's arenas), so the supervisor, which lives for months and reloads many times, would keep the
peak of every parse. A forked child does the work and sends back the pickled result; the parent
unpickles it into compact memory. The fork itself costs a few milliseconds; without fork (not POSIX)
the work runs in-process.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tollway.config.loader import PluginCheck, load_file, load_text
from tollway.config.schema import GatewayConfig
from tollway.errors import ConfigError

T = TypeVar("T")


def load_file_apart(path: str | Path, plugins: PluginCheck | None = None) -> GatewayConfig:
    """`load_file` in a forked child: the same config, or the same ConfigError."""
    return run_apart(lambda: load_file(path, plugins))


def load_text_apart(text: str, source: str = "<config>", plugins: PluginCheck | None = None) -> GatewayConfig:
    """`load_text` in a forked child: the same config, or the same ConfigError."""
    return run_apart(lambda: load_text(text, source, plugins))


def run_apart(work: Callable[[], T]) -> T:
    """`work()` run in a forked child: its (picklable) result, or the ConfigError it raised. Work that
    fails otherwise is run again here, so the error is seen as it would have been."""
    if not hasattr(os, "fork"):
        return work()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(work, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        return work()
    kind, *rest = pickle.loads(data)
    if kind == "error":
        raise ConfigError(rest[0], rest[1])
    return rest[0]  # type: ignore[no-any-return]


def _child(work: Callable[[], object], write_fd: int) -> None:
    code = 0
    try:
        try:
            result: tuple[object, ...] = ("ok", work())
        except ConfigError as exc:
            result = ("error", exc.issues, exc.source)
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:  # the parent runs the work in-process and sees the error there
        code = 1
    finally:
        os._exit(code)
