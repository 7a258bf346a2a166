"""The store's data model, free of any database: entities as rows, writes as operations, and the one
function that turns the current rows plus a write into the next rows — validated by the same code as
`tollway check` (tollway.config.loader.validate), so a write is accepted or refused whole.

An entity is identified by its kind and its key: the name of a service, route or upstream, the username
of a consumer, and for a top-level plugin its name plus the scope it narrows to (a config may hold one
instance of a plugin per scope). Nested plugins and credentials are part of their parent's row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tollway.config.loader import validate
from tollway.config.schema import GatewayConfig
from tollway.errors import ConfigError, TollwayError
from tollway.plugins.registry import PLUGIN_CHECK

# Kinds in the order a document lists them; referenced kinds first, so a fresh store fills in order.
KINDS = ("upstreams", "services", "routes", "consumers", "plugins")
_KEY_FIELD = {"upstreams": "name", "services": "name", "routes": "name", "consumers": "username"}
_SCOPES = ("route", "service", "consumer")


class StoreError(TollwayError):
    """The store cannot be reached or used (connection refused, schema missing or too new)."""

    status = 503
    message = "config store unavailable"


class WriteRefused(TollwayError):
    """A write that would leave an invalid config: nothing of it was applied. `issues` are the same
    lines `tollway check` prints."""

    status = 400

    def __init__(self, issues: list[str]) -> None:
        super().__init__("; ".join(issues) if issues else "invalid configuration")
        self.issues = issues


class Conflict(TollwayError):
    """A write's expected version did not match the entity's (a lost update)."""

    status = 412


class NotFound(TollwayError):
    """A delete of an entity the store does not hold."""

    status = 404


def entity_key(kind: str, data: Mapping[str, Any]) -> str:
    """The identity of an entity inside its kind (see the module docstring)."""
    if kind == "plugins":
        scope = ",".join(f"{s}={data[s]}" for s in _SCOPES if data.get(s))
        return f"{data.get('name')}@{scope}" if scope else str(data.get("name"))
    value = data.get(_KEY_FIELD[kind]) if kind in _KEY_FIELD else None
    if not isinstance(value, str) or not value:
        raise WriteRefused([f"{kind}: an entity without a {_KEY_FIELD.get(kind, 'name')}"])
    return value


@dataclass(frozen=True, slots=True)
class Row:
    """One stored entity: `version` is the config version that last wrote it (its ETag)."""

    kind: str
    key: str
    data: dict[str, Any]
    id: str
    version: int
    position: int


@dataclass(frozen=True, slots=True)
class Put:
    """Create or replace an entity. `expect_version`: 0 = must not exist yet, N = must be at version N."""

    kind: str
    data: dict[str, Any]
    expect_version: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    kind: str
    key: str
    expect_version: int | None = None


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Change:
    """What one write did to one entity: `row` is the new row, None when it was deleted."""

    kind: str
    key: str
    action: str  # "create" | "update" | "delete"
    row: Row | None


@dataclass(slots=True)
class Rows:
    """Every entity of a store at one version, by kind then key, in document order."""

    version: int = 0
    by_kind: dict[str, dict[str, Row]] = field(default_factory=lambda: {k: {} for k in KINDS})

    @classmethod
    def from_rows(cls, version: int, rows: Iterable[Row]) -> Rows:
        out = cls(version)
        for row in sorted(rows, key=lambda r: r.position):
            out.by_kind[row.kind][row.key] = row
        return out

    def document(self) -> dict[str, Any]:
        """The entities as a config document (no `gateway` section: that stays in the node's file)."""
        return {kind: [row.data for row in self.by_kind[kind].values()] for kind in KINDS}

    def count(self) -> int:
        return sum(len(rows) for rows in self.by_kind.values())

    def apply_changes(self, version: int, changes: Iterable[Change]) -> Rows:
        """A copy with `changes` applied (a node catching up from the change log)."""
        changes = list(changes)
        touched = {change.kind for change in changes}
        out = Rows(
            version, {kind: dict(rows) if kind in touched else rows for kind, rows in self.by_kind.items()}
        )
        # An update keeps its row's place; a new row has a position above every existing one (plan_write),
        # so appending new rows in position order keeps document order without sorting 10,000 rows.
        for change in sorted(changes, key=lambda c: c.row.position if c.row is not None else -1):
            rows = out.by_kind[change.kind]
            old = rows.get(change.key)
            if change.row is None or (old is not None and old.position != change.row.position):
                rows.pop(change.key, None)  # deleted, or deleted and created again: it moves to the end
            if change.row is not None:
                rows[change.key] = change.row
        return out


def plan_write(current: Rows, ops: Iterable[Op], new_version: int) -> tuple[Rows, list[Change]]:
    """Apply `ops` to `current`, validate the result as a whole, and return it with what changed.

    Raises WriteRefused (validation, dangling references) or Conflict (version expectations); a Put
    that changes nothing is not a change, so re-applying the same data bumps no version."""
    staged = {kind: dict(rows) for kind, rows in current.by_kind.items()}
    next_position = max((r.position for rows in staged.values() for r in rows.values()), default=0) + 1
    changes: dict[tuple[str, str], Change] = {}
    for op in ops:
        _check_kind(op.kind)
        if isinstance(op, Put):
            key = entity_key(op.kind, op.data)
            old = staged[op.kind].get(key)
            _check_expected(op.kind, key, old, op.expect_version)
            if old is not None and old.data == op.data:
                continue
            position = old.position if old is not None else next_position
            next_position += old is None
            row = Row(op.kind, key, op.data, old.id if old else str(uuid.uuid4()), new_version, position)
            staged[op.kind][key] = row
            action = "update" if key in current.by_kind[op.kind] else "create"
            changes[(op.kind, key)] = Change(op.kind, key, action, row)
        else:
            old = staged[op.kind].get(op.key)
            _check_expected(op.kind, op.key, old, op.expect_version)
            if old is None:
                raise NotFound(f"{op.kind} {op.key!r} does not exist")
            del staged[op.kind][op.key]
            if op.key in current.by_kind[op.kind]:
                changes[(op.kind, op.key)] = Change(op.kind, op.key, "delete", None)
            else:
                changes.pop((op.kind, op.key), None)  # created and deleted in the same write
    # No sort needed: updates keep their place, new rows were appended with ever higher positions.
    result = Rows(new_version, staged)
    if changes:
        validate_rows(result)
    return result, list(changes.values())


def validate_rows(rows: Rows, source: str = "store") -> GatewayConfig:
    """The same validation as `tollway check`, on the store's entities."""
    try:
        return validate(rows.document(), source=source, plugins=PLUGIN_CHECK)
    except ConfigError as exc:
        raise WriteRefused(exc.issues) from None


def ops_from_document(doc: Mapping[str, Any]) -> list[Op]:
    """A Put for every entity of a declarative document (`tollway config apply`)."""
    ops: list[Op] = []
    for kind in KINDS:
        items = doc.get(kind) or []
        if not isinstance(items, list):
            raise WriteRefused([f"{kind}: must be a list"])
        for item in items:
            if not isinstance(item, dict):
                raise WriteRefused([f"{kind}: every entry must be a mapping"])
            ops.append(Put(kind, item))
    return ops


def prune_ops(current: Rows, doc: Mapping[str, Any]) -> list[Op]:
    """A Delete for every stored entity the document does not hold (`apply --prune`)."""
    wanted = {(kind, entity_key(kind, item)) for kind in KINDS for item in doc.get(kind) or []}
    return [
        Delete(kind, key)
        for kind in reversed(KINDS)
        for key in current.by_kind[kind]
        if (kind, key) not in wanted
    ]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise WriteRefused([f"unknown entity kind {kind!r} (one of {', '.join(KINDS)})"])


def _check_expected(kind: str, key: str, old: Row | None, expected: int | None) -> None:
    if expected is None:
        return
    actual = old.version if old is not None else 0
    if actual != expected:
        raise Conflict(f"{kind} {key!r} is at version {actual}, not {expected}")


@dataclass(frozen=True, slots=True)
class Difference:
    """One entity a declarative document would change: `fields` lists the top-level fields that differ."""

    action: str  # "create" | "update" | "delete" | "keep" (in the store, not in the document, no --prune)
    kind: str
    key: str
    fields: tuple[str, ...] = ()


def diff(current: Rows, doc: Mapping[str, Any], prune: bool) -> list[Difference]:
    """What applying `doc` would do, entity by entity (`tollway config diff`, the admin API's dry run)."""
    out: list[Difference] = []
    wanted: set[tuple[str, str]] = set()
    for op in ops_from_document(doc):
        assert isinstance(op, Put)
        key = entity_key(op.kind, op.data)
        wanted.add((op.kind, key))
        old = current.by_kind[op.kind].get(key)
        if old is None:
            out.append(Difference("create", op.kind, key))
        elif old.data != op.data:
            fields = sorted(f for f in {*old.data, *op.data} if old.data.get(f) != op.data.get(f))
            out.append(Difference("update", op.kind, key, tuple(fields)))
    for kind in KINDS:
        for key in current.by_kind[kind]:
            if (kind, key) not in wanted:
                out.append(Difference("delete" if prune else "keep", kind, key))
    return out
