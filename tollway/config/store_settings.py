"""Where the entities come from: the config file itself (default), or a config store (`tollway.store`).

Only the data lives here (config is below store in the layering); the store package reads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tollway.config.types import Duration


class StoreSettings(BaseModel):
    """`gateway.store`: the source of services, routes, upstreams, consumers and plugins."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    backend: Literal["file", "sqlite", "postgres"] = Field(
        "file",
        description='"file": entities are read from this file (no database); "sqlite": an embedded '
        'store in one local file; "postgres": a shared store for a cluster of nodes',
    )
    path: str = Field(
        "tollway.db", description="sqlite: the database file (relative paths are from the config file)"
    )
    dsn: str | None = Field(None, description='postgres: "postgresql://user@host:5432/dbname"')
    poll_interval: Duration = Field(
        2.0,
        gt=0,
        description="how often a node checks the store's version: the safety net under postgres "
        "notifications and sqlite's data_version watch",
    )
    last_known_good: str | None = Field(
        None,
        description="the file each node writes the config it applied to, and boots from when the store "
        "is unreachable (default: <config file>.last-good.json)",
    )
    node_id: str | None = Field(
        None, description="this node's name in the cluster view (default: hostname and listen port)"
    )
    connect_timeout: Duration = Field(5.0, gt=0, description="time to reach the store before giving up")

    @model_validator(mode="after")
    def _needs_dsn(self) -> StoreSettings:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError('backend "postgres" needs a dsn ("postgresql://user@host:5432/dbname")')
        return self
