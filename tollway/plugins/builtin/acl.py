"""acl: allow or deny consumers by group (`consumers[].groups`) → 403.

Runs after authentication (authorization band). With `allow`, a consumer needs at least one of the
groups; with `deny`, none of them (a refusal is 403 "forbidden" unless `status` and `message` say
otherwise). A request with no consumer at all (no authentication plugin ran, or it let the request
through without one) is answered 401. The backend gets the consumer's groups in
X-Consumer-Groups unless `hide_groups_header` is set. Decisions are cached per consumer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from tollway.plugins.base import Plugin, PluginConfig, PluginContext
from tollway.plugins.consumers import Consumer
from tollway.proxy.pdk import Response, error_response

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class AclConfig(PluginConfig):
    allow: list[str] = Field(default_factory=list, description="groups allowed (any one suffices)")
    deny: list[str] = Field(default_factory=list, description="groups denied (any one refuses)")
    hide_groups_header: bool = Field(False, description="do not send X-Consumer-Groups to the backend")
    status: int = Field(403, ge=400, le=599, description="status of a refusal")
    message: str = Field("forbidden", min_length=1, max_length=200, description="message of a refusal")

    @model_validator(mode="after")
    def _one_list(self) -> AclConfig:
        if bool(self.allow) == bool(self.deny):
            raise ValueError("exactly one of `allow` or `deny` is required")
        return self


class Acl(Plugin[AclConfig]):
    name = "acl"
    priority = 1800

    def __init__(self, config: AclConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._allow = frozenset(config.allow)
        self._deny = frozenset(config.deny)
        self._send_groups = not config.hide_groups_header
        self._decisions: dict[Consumer, bool] = {}  # consumers are per config version, like this plugin

    def access(self, ex: RequestContext) -> Response | None:
        consumer = ex.consumer
        if not isinstance(consumer, Consumer):
            return error_response(401, "authentication required", ex.request_id.decode("latin-1"))
        allowed = self._decisions.get(consumer)
        if allowed is None:
            allowed = self._decisions[consumer] = self._decide(consumer.groups)
        if not allowed:
            return error_response(self.config.status, self.config.message, ex.request_id.decode("latin-1"))
        if self._send_groups and consumer.groups:
            ex.headers.append((b"X-Consumer-Groups", consumer.groups_value))
        return None

    def _decide(self, groups: frozenset[str]) -> bool:
        if self._allow:
            return not self._allow.isdisjoint(groups)
        return self._deny.isdisjoint(groups)
