"""What the two limit plugins (`rate-limiting`, `concurrency-limit`) share: the key a request is counted
under, the response-header options, and the decision metrics.

Keys. A limit counts per key, built from parts of the request — `consumer`, `credential`, `ip`,
`header`, `path`, `route`, `service` — joined when several are named (`[consumer, route]`: each consumer
per route). A part the request does not have (no consumer on an anonymous request, no such header)
falls back to the client IP, as Kong does: one shared bucket for every anonymous client would let one
of them lock out all the others. The client IP is the real one (`netutil.real_client_ip`: through
trusted proxies only). The getters are chosen once per config; a one-part key costs one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from tollway.observability import metrics
from tollway.plugins.base import PluginConfig
from tollway.plugins.netutil import real_client_ip

if TYPE_CHECKING:
    from tollway.observability.metrics import Counter
    from tollway.proxy.exchange import Exchange

KeyPart = Literal["consumer", "credential", "ip", "header", "path", "route", "service"]
KEY_PARTS: tuple[str, ...] = ("consumer", "credential", "ip", "header", "path", "route", "service")
_CACHE_LIMIT = 4096


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


KeyParts = Annotated[list[KeyPart], BeforeValidator(_as_list)]


class HeaderSettings(PluginConfig):
    ietf: bool = Field(True, description="send the IETF RateLimit and RateLimit-Policy fields")
    legacy: bool = Field(False, description="send X-RateLimit-Limit, -Remaining and -Reset")
    per_limit: bool = Field(
        False, description="with `legacy`: also X-RateLimit-Limit-<Name> and X-RateLimit-Remaining-<Name>"
    )


KEY_DESCRIPTION = (
    "what is counted separately: one or more of consumer, credential, ip, header, path, route, service "
    "(joined); a part the request lacks falls back to the client IP"
)
HEADER_NAME_DESCRIPTION = "the request header whose value is the key's `header` part"


class KeyBuilder:
    """Builds a request's limit key from the configured parts (chosen once per config)."""

    __slots__ = ("_credentials", "_getters", "_header", "_single")

    def __init__(self, parts: list[str], header_name: str | None) -> None:
        if "header" in parts and not header_name:
            raise ValueError("the `header` key part needs `header_name`")
        self._header = header_name or ""
        self._credentials: dict[int, tuple[Any, str]] = {}
        getters: dict[str, Callable[[Exchange], str]] = {
            "consumer": self._consumer,
            "credential": self._credential,
            "ip": real_client_ip,
            "header": self._header_value,
            "path": _path,
            "route": _route,
            "service": _service,
        }
        self._getters = tuple(getters[part] for part in dict.fromkeys(parts))
        self._single = self._getters[0] if len(self._getters) == 1 else None

    def __repr__(self) -> str:
        return f"<KeyBuilder {len(self._getters)} parts>"

    def key(self, ex: Exchange) -> str:
        single = self._single
        if single is not None:
            return single(ex)
        return "|".join([getter(ex) for getter in self._getters])

    def _consumer(self, ex: Exchange) -> str:
        consumer = ex.consumer
        if consumer is None:
            return "ip:" + real_client_ip(ex)
        return "consumer:" + consumer.id

    def _credential(self, ex: Exchange) -> str:
        credential = ex.credential
        if credential is None:
            return "ip:" + real_client_ip(ex)
        # Credentials live as long as the config version, like this builder: id() is stable for them.
        cached = self._credentials.get(id(credential))
        if cached is None or cached[0] is not credential:
            identity = getattr(credential, "identity", None)
            text = str(identity()) if identity is not None else repr(credential)
            if len(self._credentials) >= _CACHE_LIMIT:
                self._credentials.clear()
            cached = self._credentials[id(credential)] = (credential, "credential:" + text)
        return cached[1]

    def _header_value(self, ex: Exchange) -> str:
        value = ex.get_header(self._header)
        if value is None:
            return "ip:" + real_client_ip(ex)
        return "header:" + value


def _path(ex: Exchange) -> str:
    return ex.path


def _route(ex: Exchange) -> str:
    route = ex.route
    return route.name if route is not None else ""


def _service(ex: Exchange) -> str:
    service = ex.service
    return service.name if service is not None else ""


class DecisionCounters:
    """tollway_rate_limit_decisions_total{plugin, route, decision}: a counter handle per (route,
    decision), made on first use (routes are bounded by the config)."""

    __slots__ = ("_handles", "_plugin")

    def __init__(self, plugin: str) -> None:
        self._plugin = plugin
        self._handles: dict[str, dict[str, Counter]] = {}  # decision -> route -> handle

    def __repr__(self) -> str:
        return f"<DecisionCounters {self._plugin}>"

    def count(self, ex: Exchange, decision: str) -> None:
        route = ex.route.name if ex.route is not None else ""
        handles = self._handles.get(decision)
        if handles is None:
            handles = self._handles[decision] = {}
        handle = handles.get(route)
        if handle is None:
            handle = handles[route] = metrics.counter(
                "rate_limit_decisions_total", plugin=self._plugin, route=route, decision=decision
            )
        handle.value += 1
