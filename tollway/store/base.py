"""The store interface every backend implements, and what it returns.

Reads give whole `Rows` (a node's full resync) or the changes since a version (a node catching up:
only the entities that changed travel). Writes take a list of operations and apply them in one
transaction that bumps the global config version — or refuse them whole (`WriteRefused`, `Conflict`).
The admin API and `tollway config apply` both write through `write()`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tollway.store.model import Change, Op, Rows
from tollway.store.secrets import redact


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


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who makes a write, for the audit log: the admin token's name, the client address, the request id."""

    actor: str | None
    address: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One changed entity in the audit log; `before`/`after` with secrets redacted (None: absent)."""

    seq: int
    version: int
    at: float
    actor: str | None
    address: str | None
    request_id: str | None
    action: str
    kind: str
    key: str
    entity_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters of `audit_log`: newest first, `before_seq` pages back."""

    kind: str | None = None
    key: str | None = None
    actor: str | None = None
    since: float | None = None
    before_seq: int | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class AdminToken:
    """An admin API token: only its SHA-256 is stored."""

    name: str
    role: str  # "admin" | "read-only"
    token_hash: str
    created_at: float


def audit_rows(
    current: Rows, changes: Sequence[Change], version: int, ctx: AuditContext
) -> list[tuple[Any, ...]]:
    """The audit log's rows for a write: (version, at, actor, address, request_id, action, kind, key,
    entity_id, before, after), before/after redacted."""
    now = time.time()
    out = []
    for change in changes:
        old = current.by_kind[change.kind].get(change.key)
        before = redact(change.kind, old.data) if old is not None else None
        after = redact(change.kind, change.row.data) if change.row is not None else None
        entity_id = change.row.id if change.row is not None else old.id if old is not None else None
        row = [version, now, ctx.actor, ctx.address, ctx.request_id, change.action, change.kind]
        out.append((*row, change.key, entity_id, before, after))
    return out


AUDIT_COLUMNS = "seq, version, at, actor, address, request_id, action, kind, key, entity_id, before, after"


def audit_filters(query: AuditQuery, numbered: bool) -> tuple[str, list[object]]:
    """The WHERE clause of an audit query and its arguments (placeholders `$1`… when `numbered`, else ?)."""
    clauses: list[str] = []
    args: list[object] = []
    for column, op, value in (
        ("kind", "=", query.kind),
        ("key", "=", query.key),
        ("actor", "=", query.actor),
        ("at", ">=", query.since),
        ("seq", "<", query.before_seq),
    ):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} {op} {f'${len(args)}' if numbered else '?'}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


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
    async def write(
        self, ops: Sequence[Op], author: str | None = None, audit: AuditContext | None = None
    ) -> WriteResult:
        """Apply `ops` in one transaction; with `audit`, the audit log's rows go in the same one."""

    @abc.abstractmethod
    async def wait_for_change(self, timeout: float) -> None:
        """Return when the store says something changed, or after `timeout` (poll either way)."""

    @abc.abstractmethod
    async def heartbeat(self, node: NodeInfo) -> None:
        """Register or refresh this node in the cluster view."""

    @abc.abstractmethod
    async def nodes(self) -> list[NodeInfo]: ...

    # -- admin API: tokens and audit log ------------------------------------------------------------------
    @abc.abstractmethod
    async def put_admin_token(self, token: AdminToken) -> None:
        """Create or replace the token of that name."""

    @abc.abstractmethod
    async def delete_admin_token(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def admin_tokens(self) -> list[AdminToken]: ...

    @abc.abstractmethod
    async def audit_log(self, query: AuditQuery) -> list[AuditEntry]: ...

    @abc.abstractmethod
    async def trim_audit(self, older_than: float) -> int:
        """Delete audit entries written before the time `older_than`; returns how many."""
