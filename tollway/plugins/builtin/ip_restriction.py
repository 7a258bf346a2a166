"""ip-restriction: allow or deny clients by address (CIDR blocks, IPv4 and IPv6) → 403.

The address is the real client IP (`tollway.plugins.builtin.netutil.real_client_ip`): X-Forwarded-For counts
only through `gateway.trusted_proxies`. Deny wins over allow; with an allow list, everything not on it
is denied. Decisions are cached per address (bounded), so a busy client costs one dict lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from tollway.config.types import Cidr
from tollway.plugins.base import Plugin, PluginConfig, PluginContext
from tollway.plugins.builtin.netutil import IpSet, parse_ip, real_client_ip
from tollway.proxy.pdk import Response, error_response

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

_CACHE_LIMIT = 4096


class IpRestrictionConfig(PluginConfig):
    allow: list[Cidr] = Field(default_factory=list, description="only these addresses/blocks may pass")
    deny: list[Cidr] = Field(
        default_factory=list, description="these addresses/blocks may not (wins over allow)"
    )
    status: int = Field(403, ge=400, le=599, description="status of a refusal")
    message: str = Field("forbidden", max_length=200, description="message of a refusal")

    @model_validator(mode="after")
    def _some_rule(self) -> IpRestrictionConfig:
        if not self.allow and not self.deny:
            raise ValueError("at least one of `allow` or `deny` is required")
        return self


class IpRestriction(Plugin[IpRestrictionConfig]):
    name = "ip-restriction"
    priority = 1900

    def __init__(self, config: IpRestrictionConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._allow = IpSet(config.allow)
        self._deny = IpSet(config.deny)
        self._has_allow = bool(config.allow)
        self._cache: dict[str, bool] = {}

    def access(self, ex: RequestContext) -> Response | None:
        ip = real_client_ip(ex)
        allowed = self._cache.get(ip)
        if allowed is None:
            allowed = self._decide(ip)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[ip] = allowed
        if allowed:
            return None
        return error_response(self.config.status, self.config.message, ex.request_id.decode("latin-1"))

    def _decide(self, ip: str) -> bool:
        address = parse_ip(ip)
        if address is None:
            return False  # an address we cannot read never passes
        if self._deny.contains(address):
            return False
        return not self._has_allow or self._allow.contains(address)
