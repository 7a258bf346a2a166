"""What the two limit plugins (`rate-limiting`, `concurrency-limit`) share: their common options
(`LimitPluginConfig`), the key a request is counted under (`KeyBuilder`), and what becomes of a decision
(`LimitAnswers`: RateLimit headers, the 429/503, the decision metrics).

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

from pydantic import BeforeValidator, Field, model_validator

from tollway.counters import metrics
from tollway.plugins.base import HeaderName, PluginConfig
from tollway.plugins.builtin.netutil import real_client_ip
from tollway.proxy.pdk import Response
from tollway.state import headers as rl_headers

if TYPE_CHECKING:
    from tollway.counters.metrics import Counter
    from tollway.plugins.consumers import Consumer
    from tollway.proxy.pdk import RequestContext
    from tollway.state.spec import Decision, LimitSpec

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


class LimitPluginConfig(PluginConfig):
    """The options every limit plugin has: the key, the headers, the counters' scope."""

    key: KeyParts = Field(
        ["consumer"],
        description="what is counted separately: one or more of consumer, credential, ip, header, path, "
        "route, service (joined); a part the request lacks falls back to the client IP",
    )
    header_name: HeaderName | None = Field(None, description="the request header of the `header` key part")
    headers: HeaderSettings = Field(default_factory=HeaderSettings, description="response headers sent")
    status: int = Field(429, ge=400, le=599, description="status of a refusal over the limit")
    message: str = Field(
        "rate limit exceeded", min_length=1, max_length=200, description="message of a refusal over the limit"
    )
    scope: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="counts belong to the plugin instance (where it is attached); instances with the same "
        "scope share them",
    )

    @model_validator(mode="after")
    def _header_part_named(self) -> LimitPluginConfig:
        if "header" in self.key and not self.header_name:
            raise ValueError("the `header` key part needs `header_name`")
        return self


class KeyBuilder:
    """Builds a request's limit key from the configured parts (chosen once per config)."""

    __slots__ = ("_credentials", "_getters", "_header", "_single")

    def __init__(self, parts: list[str], header_name: str | None) -> None:
        self._header = header_name or ""
        self._credentials: dict[int, tuple[Any, str]] = {}
        getters: dict[str, Callable[[RequestContext], str]] = {
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

    def key(self, ex: RequestContext) -> str:
        single = self._single
        if single is not None:
            return single(ex)
        return "|".join([getter(ex) for getter in self._getters])

    def _consumer(self, ex: RequestContext) -> str:
        consumer: Consumer | None = ex.consumer
        if consumer is None:
            return "ip:" + real_client_ip(ex)
        return "consumer:" + consumer.id

    def _credential(self, ex: RequestContext) -> str:
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

    def _header_value(self, ex: RequestContext) -> str:
        value = ex.get_header(self._header)
        if value is None:
            return "ip:" + real_client_ip(ex)
        return "header:" + value


def _path(ex: RequestContext) -> str:
    return ex.path


def _route(ex: RequestContext) -> str:
    route = ex.route
    return route.name if route is not None else ""


def _service(ex: RequestContext) -> str:
    service = ex.service
    return service.name if service is not None else ""


class LimitAnswers:
    """What a limit plugin does with its decisions, built once per config: the RateLimit headers on
    every response, the 429 (or the configured status; 503 when a limit could not be checked), and
    tollway_rate_limit_decisions_total{plugin, route, decision} — a counter handle per (decision, route),
    made on first use (routes are bounded by the config)."""

    __slots__ = (
        "_handles",
        "_ietf",
        "_legacy",
        "_message",
        "_per_limit",
        "_plugin",
        "_policy_field",
        "_status",
    )

    def __init__(
        self,
        plugin: str,
        specs: list[LimitSpec],
        settings: HeaderSettings,
        status: int = 429,
        message: str = "rate limit exceeded",
    ) -> None:
        self._plugin = plugin
        self._status, self._message = status, message
        self._ietf, self._legacy, self._per_limit = settings.ietf, settings.legacy, settings.per_limit
        self._policy_field = (b"RateLimit-Policy", rl_headers.ratelimit_policy(specs).encode("latin-1"))
        self._handles: dict[str, dict[str, Counter]] = {}  # decision -> route -> handle

    def __repr__(self) -> str:
        return f"<LimitAnswers {self._plugin}>"

    def decided(self, ex: RequestContext, decisions: list[Decision]) -> Response | None:
        """Headers for this request's response; the denial if any limit denied, else None."""
        if self._ietf:
            value = rl_headers.ratelimit(decisions).encode("latin-1")
            ex.add_response_fields([self._policy_field, (b"RateLimit", value)])
        if self._legacy:
            ex.add_response_fields(rl_headers.legacy_headers(decisions, self._per_limit))
        for decision in decisions:
            if not decision.allowed:
                return self._deny(ex, decisions)
        self.count(ex, "allowed")
        return None

    def _deny(self, ex: RequestContext, decisions: list[Decision]) -> Response:
        rid = ex.request_id.decode("latin-1")
        status, body = rl_headers.denial_body(decisions, rid, self._status, self._message)
        self.count(ex, "error" if any(d.unavailable for d in decisions if not d.allowed) else "limited")
        headers = [(b"Content-Type", b"application/json"), (b"X-Request-Id", ex.request_id)]
        headers.append((b"Retry-After", rl_headers.retry_after(decisions).encode("latin-1")))
        return Response(status, body, headers)

    def count(self, ex: RequestContext, decision: str) -> None:
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
