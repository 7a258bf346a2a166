"""The store interface every backend implements, and what it returns.

Reads give whole `Rows` (a node's full resync) or the changes since a version (a node catching up:
only the entities that changed travel). Writes take a list of operations and apply them in one
transaction that bumps the global config version — or refuse them whole (`WriteRefused`, `Conflict`).
The admin API and `tollway config apply` both write through `write()`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from tollway.store.model import Change, Op, Rows


@dataclass(frozen=True, slots=True)
class WriteResult:
    """`version` is the config version after the write; unchanged (and `changes` empty) when the write
    changed nothing."""

    version: int
    changes: list[Change]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One gateway node as it reports itself to the store (the cluster view)."""

    node_id: str
    address: str
    software_version: str
    config_version: int
    source: str  # "store" | "last-known-good"
    error: str | None
    started_at: float
    last_seen: float = 0.0


# The change log keeps this many versions; a node further behind reloads everything. Trimmed every
# _TRIM_EVERY versions, so the delete is amortised over writes.
CHANGE_LOG_KEEP = 10_000
TRIM_EVERY = 100


# A node not heard from for a day has left the cluster view (any node's heartbeat removes it).
NODE_FORGET_AFTER = 86_400.0


def trim_floor(version: int) -> int | None:
    """The version up to which a write at `version` trims the change log, when it is its turn."""
    floor = version - CHANGE_LOG_KEEP
    return floor if floor > 0 and version % TRIM_EVERY == 0 else None


class ConfigStore(abc.ABC):
    backend: str = "?"

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and check the schema is the one this tollway knows (StoreError otherwise)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Create or upgrade the schema; returns the migrations applied."""

    @abc.abstractmethod
    async def version(self) -> int:
        """The current config version (cheap: one row)."""

    @abc.abstractmethod
    async def load(self) -> Rows:
        """Every entity at the current version."""

    @abc.abstractmethod
    async def changes_since(self, version: int) -> tuple[int, list[Change] | None]:
        """The current version and the entities changed after `version` (their current rows); None
        instead of the changes when the change log no longer reaches back to `version` (load all)."""

    @abc.abstractmethod
    async def write(self, ops: Sequence[Op], author: str | None = None) -> WriteResult: ...

    @abc.abstractmethod
    async def wait_for_change(self, timeout: float) -> None:
        """Return when the store says something changed, or after `timeout` (poll either way)."""

    @abc.abstractmethod
    async def heartbeat(self, node: NodeInfo) -> None:
        """Register or refresh this node in the cluster view."""

    @abc.abstractmethod
    async def nodes(self) -> list[NodeInfo]: ...
