"""`gateway.admin`: the admin API listener's settings (the API itself is `tollway.admin`).

Only the data lives here (config is below admin in the layering); `tollway.admin` reads it.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from tollway.config.model import Model
from tollway.config.types import Duration, ListenAddress, Size, parse_hostport


class AdminTls(Model):
    """HTTPS on the admin listener: one certificate, no SNI (operators and CI connect to it by one name)."""

    cert: str = Field(description="PEM certificate chain file (relative paths are from the config file)")
    key: str = Field(description="PEM private key file")


class AdminSettings(Model):
    """`gateway.admin`: the admin REST API (docs/admin-api.md). Needs a config store: it writes to it."""

    enabled: bool = Field(False, description="serve the admin API (store mode only: sqlite or postgres)")
    listen: ListenAddress = Field(
        "127.0.0.1:8001", description="the admin listener, separate from traffic; keep it private"
    )
    auth: Literal["none", "token"] = Field(
        "none",
        description='"token": every request needs `Authorization: Bearer <token>` (tollway admin token '
        'create); "none" is allowed on a loopback address only',
    )
    tls: AdminTls | None = Field(None, description="serve HTTPS with this certificate")
    max_body: Size = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body (a bulk config); larger gets 413"
    )
    audit_retention: Duration = Field(
        90 * 86400.0, gt=0, description="audit log entries older than this are deleted (default 90 days)"
    )

    @model_validator(mode="after")
    def _auth_off_the_loopback(self) -> AdminSettings:
        host, _ = parse_hostport(self.listen)
        if self.auth == "none" and not is_loopback(host):
            raise ValueError(
                f"listen {self.listen!r} is not a loopback address: set auth: token "
                "(tokens from `tollway admin token create`) or listen on 127.0.0.1"
            )
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or 0.0.0.0 after parse_hostport: not loopback
