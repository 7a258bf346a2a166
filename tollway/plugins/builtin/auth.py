"""What every authentication plugin shares: the anonymous fallback, hiding credentials, the 401.

- Success: `self.accept(ex, consumer, credential)` — the backend gets X-Consumer-Id and
  X-Consumer-Username (and any such headers the client sent are dropped first).
- Failure: `return self.reject(ex)` (or `self.reject(ex, "missing")` when no credential was sent) — a
  401 with the scheme's WWW-Authenticate challenge and the same JSON message whatever was wrong
  (missing, unknown, expired, bad signature: a client learns nothing about which part failed), counted
  in tollway_auth_failures_total{plugin, route, reason} — or, when `anonymous` names a consumer, the
  request goes on as that consumer with X-Anonymous-Consumer: true.
- Several authentication plugins with `anonymous` set form a logical OR (Kong's convention): once one
  has identified a real consumer, the next ones let the request through without looking.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, unquote_plus

from pydantic import Field

from tollway.counters import metrics
from tollway.plugins.base import Loc, Plugin, PluginConfig, PluginContext
from tollway.plugins.consumers import Consumer, identify
from tollway.proxy.pdk import Response, error_response

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig
    from tollway.proxy.pdk import RequestContext

UNAUTHORIZED_MESSAGE = "missing or invalid credentials"


class AuthConfig(PluginConfig):
    anonymous: str | None = Field(
        None,
        description="username of a consumer to use when authentication fails (null: answer 401)",
    )
    hide_credentials: bool = Field(True, description="remove the credential before the request is forwarded")
    realm: str = Field("tollway", pattern=r'^[^"\\\x00-\x1f\x7f]*$', description="realm in WWW-Authenticate")


AuthConfigT = TypeVar("AuthConfigT", bound=AuthConfig)


class AuthPlugin(Plugin[AuthConfigT]):
    """Base of authentication plugins (they run in the access phase, authentication band)."""

    consumer_scoped = False  # a consumer is what they find out: they cannot be configured per consumer
    scheme: ClassVar[str] = ""  # WWW-Authenticate scheme; empty: no challenge header

    def __init__(self, config: AuthConfigT, context: PluginContext) -> None:
        super().__init__(config, context)
        anonymous = config.anonymous
        self.anonymous: Consumer | None = context.consumers.by_username[anonymous] if anonymous else None
        challenge = f'{self.scheme} realm="{config.realm}"'.encode("latin-1") if self.scheme else b""
        self._challenge = [(b"WWW-Authenticate", challenge)] if challenge else None

    def already_authenticated(self, ex: RequestContext) -> bool:
        """In an OR of authentication plugins (all with `anonymous`), an earlier one succeeded."""
        return self.anonymous is not None and ex.credential is not None

    def accept(self, ex: RequestContext, consumer: Consumer, credential: Any) -> None:
        identify(ex, consumer, credential)

    def reject(self, ex: RequestContext, reason: str = "invalid") -> Response | None:
        anonymous = self.anonymous
        if anonymous is not None:
            if ex.consumer is None:  # an earlier plugin of the OR may have set the anonymous consumer
                identify(ex, anonymous, None, anonymous=True)
            return None
        route = ex.route.name if ex.route is not None else ""
        metrics.count("auth_failures_total", plugin=self.name, route=route, reason=reason)
        return error_response(401, UNAUTHORIZED_MESSAGE, ex.request_id.decode("latin-1"), self._challenge)

    @classmethod
    def check(cls, config: AuthConfigT, gateway: GatewayConfig) -> Iterable[tuple[Loc, str]]:
        if config.anonymous is not None and config.anonymous not in {c.username for c in gateway.consumers}:
            yield ("anonymous",), f"unknown consumer {config.anonymous!r}"


def query_params(ex: RequestContext, names: frozenset[str], hide: bool) -> list[tuple[str, str]]:
    """Every query parameter named one of `names`, decoded, in order; with `hide`, all of them are
    removed from the request. More than one is ambiguous: which one would the client mean?"""
    found = [(name, value) for name, value in parse_qsl(ex.query, keep_blank_values=True) if name in names]
    if found and hide:
        kept = [p for p in ex.query.split("&") if unquote_plus(p.partition("=")[0]) not in names]
        ex.set_query("&".join(kept))
    return found
