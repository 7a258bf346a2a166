"""The last-known-good file: the entities a node last applied, written atomically after every apply.

A node that starts while its store is unreachable boots from this file instead of refusing to start
(APISIX cannot start without etcd). Atomic: written to a temporary file in the same directory, fsynced,
then renamed over the old one, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

_FORMAT = 1


@dataclass(frozen=True, slots=True)
class LastGood:
    store_version: int
    written_at: float
    document: dict[str, Any]


def write(path: Path, store_version: int, document: dict[str, Any]) -> None:
    body = orjson.dumps(
        {"format": _FORMAT, "store_version": store_version, "written_at": time.time(), "entities": document}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the directory is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read(path: Path) -> LastGood:
    """The file's content; ValueError (with why) when it is missing or unreadable."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"no last-known-good file at {path}") from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the last-known-good file {path}: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("entities"), dict)
    ):
        raise ValueError(f"{path} is not a last-known-good file of this tollway")
    return LastGood(int(data.get("store_version", 0)), float(data.get("written_at", 0)), data["entities"])
