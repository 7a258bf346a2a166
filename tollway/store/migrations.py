"""Versioned schema migrations, one list per dialect. A migration is never edited once released: a
change to the schema is a new entry at the end. A database whose schema is newer than the newest entry
here was migrated by a newer tollway; this one refuses to touch it.
"""

from __future__ import annotations

from tollway.store.model import StoreError

# (version, what it does, statements). {json} is the column type of entity data in the dialect, {serial}
# an ever-increasing integer key.
_V1 = [
    "CREATE TABLE tollway_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO tollway_meta (key, value) VALUES ('config_version', 0)",
    """CREATE TABLE tollway_entities (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        id TEXT NOT NULL UNIQUE,
        version BIGINT NOT NULL,
        position BIGINT NOT NULL,
        data {json} NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, key)
    )""",
    """CREATE TABLE tollway_changes (
        version BIGINT NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        action TEXT NOT NULL,
        author TEXT,
        at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX tollway_changes_version ON tollway_changes (version)",
    """CREATE TABLE tollway_nodes (
        node_id TEXT PRIMARY KEY,
        address TEXT,
        software_version TEXT,
        config_version BIGINT NOT NULL,
        source TEXT NOT NULL,
        error TEXT,
        started_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL
    )""",
]

# The admin API's tokens (only their SHA-256 is kept) and its audit log (one row per changed entity,
# secrets redacted before they are written).
_V2 = [
    """CREATE TABLE tollway_admin_tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE tollway_audit (
        seq {serial},
        version BIGINT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        actor TEXT,
        address TEXT,
        request_id TEXT,
        action TEXT NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        entity_id TEXT,
        before {json},
        after {json}
    )""",
    "CREATE INDEX tollway_audit_at ON tollway_audit (at)",
]

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "entities, config version, change log, cluster nodes", _V1),
    (2, "admin API tokens and audit log", _V2),
]
LATEST = MIGRATIONS[-1][0]
SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS tollway_schema "
    "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


def statements(version: int, dialect: str) -> list[str]:
    json_type = "JSONB" if dialect == "postgres" else "TEXT"
    serial = "BIGSERIAL PRIMARY KEY" if dialect == "postgres" else "INTEGER PRIMARY KEY AUTOINCREMENT"
    for number, _, stmts in MIGRATIONS:
        if number == version:
            return [s.replace("{json}", json_type).replace("{serial}", serial) for s in stmts]
    raise KeyError(version)


def pending(current: int) -> list[tuple[int, str]]:
    """The migrations to run on a database at schema `current`; refuses a newer schema."""
    if current > LATEST:
        raise StoreError(
            f"the store's schema is version {current}, newer than this tollway knows ({LATEST}): "
            "upgrade tollway on this node"
        )
    return [(number, description) for number, description, _ in MIGRATIONS if number > current]


def check_current(current: int) -> None:
    """A node may only use a store at exactly the schema it knows."""
    if current < LATEST:
        raise StoreError(
            f"the store's schema is version {current}, this tollway needs {LATEST}: run `tollway db migrate`"
        )
    pending(current)
