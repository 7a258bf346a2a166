"""Pick the backend a config's `gateway.store` names."""

from __future__ import annotations

from pathlib import Path

from tollway.config.store_settings import StoreSettings
from tollway.store.base import ConfigStore


def make_store(settings: StoreSettings, base_dir: Path, listen: bool = True) -> ConfigStore:
    """An unopened store. `base_dir` anchors a relative SQLite path (the config file's directory)."""
    if settings.backend == "sqlite":
        from tollway.store.sqlite import SQLiteStore

        return SQLiteStore(base_dir / settings.path)
    if settings.backend == "postgres":
        from tollway.store.postgres import PostgresStore

        assert settings.dsn is not None  # StoreSettings checks it
        return PostgresStore(settings.dsn, settings.connect_timeout, listen=listen)
    raise ValueError(f"gateway.store.backend {settings.backend!r} is not a store")
