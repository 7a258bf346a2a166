"""The configuration schema: one definition of every entity, used by the YAML loader, `tollway check`,
the worker that compiles a snapshot, and (later) the config store and the admin API.

Entities follow Kong's vocabulary: services (where traffic goes), routes (which requests go there),
upstreams (named groups of targets), consumers (who is calling) and plugins (what happens on the way).
Node settings (listeners, limits, timeouts, logs) live under ``gateway:``.

These models are validated once per config load; the hot path never touches them. The worker compiles
them into plain slotted objects (see ``tollway.proxy.snapshot``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from tollway.config.model import (
    _BAD_ESCAPE,
    _ESCAPED_DOT,
    _HEADER_NAME,
    _HOST,
    _METHOD,
    _PARAM,
    _PARAM_NAME,
    Model,
)
from tollway.config.settings import (
    DEFAULT_GATEWAY_BUCKETS,
    DEFAULT_LATENCY_BUCKETS,
    AccessLog,
    Buckets,
    DnsSettings,
    ForwardedHeaders,
    GatewaySettings,
    Limits,
    Metrics,
    Timeouts,
    Tracing,
    parse_nameserver,
    syslog_target,
)
from tollway.config.tls import Certificate, UpstreamTls
from tollway.config.types import Duration, Name
from tollway.config.upstreams import (
    ActiveHealthcheck,
    Backoff,
    CircuitBreaker,
    Healthchecks,
    PassiveHealthcheck,
    PoolOptions,
    RecordType,
    Retries,
    RetryBudget,
    RetryOn,
    StatusList,
    Target,
    Upstream,
    UpstreamDns,
)

# The whole schema, the sections in settings.py and upstreams.py included: one import path.
__all__ = [
    "DEFAULT_GATEWAY_BUCKETS",
    "DEFAULT_LATENCY_BUCKETS",
    "AccessLog",
    "ActiveHealthcheck",
    "Backoff",
    "Buckets",
    "CircuitBreaker",
    "Consumer",
    "DnsSettings",
    "ForwardedHeaders",
    "GatewayConfig",
    "GatewaySettings",
    "Healthchecks",
    "HostPattern",
    "Limits",
    "Method",
    "Metrics",
    "Model",
    "PassiveHealthcheck",
    "PathPattern",
    "PluginInstance",
    "PoolOptions",
    "RecordType",
    "Retries",
    "RetryBudget",
    "RetryOn",
    "Route",
    "Service",
    "StatusList",
    "Target",
    "Timeouts",
    "Tracing",
    "Upstream",
    "UpstreamDns",
    "parse_nameserver",
    "syslog_target",
]


# -- plugins ---------------------------------------------------------------------------------------------
class PluginInstance(Model):
    """A plugin with its configuration. Inside a route, service or consumer it applies there; at the top
    level it applies globally unless `route`, `service` or `consumer` narrows it."""

    name: str = Field(
        min_length=1,
        description='a built-in plugin ("key-auth"), the name of an installed entry point, or '
        '"package.module:Class"',
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="the plugin's options, validated by its own schema (docs/plugins)"
    )
    tags: list[str] = Field(
        default_factory=list, description="labels to find it by (admin API `?tags=`); no effect on traffic"
    )
    enabled: bool = Field(
        True,
        description="false: the plugin does not run where this instance applies, even if a less specific "
        "instance of it would",
    )
    route: str | None = Field(None, description="top level only: apply to this route only (a route name)")
    service: str | None = Field(
        None, description="top level only: apply to this service's routes only (a service name)"
    )
    consumer: str | None = Field(
        None,
        description="top level only: apply to this consumer's requests only, once authenticated (a username)",
    )


# -- services, routes, upstreams, consumers -------------------------------------------------------------
class Service(Model):
    """Where traffic goes: a backend URL, or an upstream (a named group of targets) plus a base path."""

    name: Name = Field(description="unique; routes refer to it, logs and metrics show it")
    tags: list[str] = Field(
        default_factory=list, description="labels to find it by (admin API `?tags=`); no effect on traffic"
    )
    url: str | None = Field(None, description="http://host:port/base-path")
    upstream: str | None = Field(None, description="name of an upstream")
    path: str = Field("", description="base path prepended to the forwarded path (with `upstream`)")
    host_header: str = Field(
        "backend",
        description='"backend" (the target\'s host:port), "preserve" (the client\'s Host) or a literal value',
    )
    connect_timeout: Duration = Field(
        5.0, gt=0, description="time to open a new connection to the backend, TLS handshake included [504]"
    )
    read_timeout: Duration = Field(60.0, gt=0, description="time between bytes from the backend [504]")
    write_timeout: Duration = Field(60.0, gt=0, description="time between bytes to the backend [504]")
    replay_non_idempotent: bool = Field(
        False,
        description="when a reused keep-alive connection is closed without an answer, send POST/PATCH "
        "(and other non-idempotent) requests once more too; off: only idempotent ones",
    )
    plugins: list[PluginInstance] = Field(
        default_factory=list, description="plugins on every route of this service"
    )
    tls: UpstreamTls = Field(
        default_factory=UpstreamTls, description="TLS to an https:// url: verification, SNI, client cert"
    )

    @model_validator(mode="after")
    def _one_destination(self) -> Service:
        if (self.url is None) == (self.upstream is None):
            raise ValueError("exactly one of `url` or `upstream` is required")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("must name a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError("has an invalid port") from exc
        return url

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if path and not path.startswith("/"):
            raise ValueError('must start with "/"')
        return path


def _check_host(host: str) -> str:
    host = host.lower()
    if ":" in host:
        raise ValueError("must not include a port")
    if not _HOST.match(host) or (host.startswith("*.") and host.endswith(".*")):
        raise ValueError('must be a host name, "*.example.com" or "example.*"')
    return host


def _check_path_pattern(path: str) -> str:
    if path.startswith("~"):
        try:
            re.compile(path[1:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return path
    exact = path.startswith("=")
    plain = path[1:] if exact else path
    if not plain.startswith("/"):
        raise ValueError('must start with "/" (or "=/" for an exact path, "~" for a regular expression)')
    if exact and ("{" in plain or "}" in plain):
        raise ValueError('an exact path ("=") cannot have {parameters}; a template already matches exactly')
    _check_normalized(plain)
    _check_template(plain)
    return path


def _check_normalized(path: str) -> None:
    """Requests are routed by their normalized path (docs/routing.md), so a configured path that is
    not normalized could never match: refuse it instead of ignoring it silently."""
    if _BAD_ESCAPE.search(path):
        raise ValueError('has a malformed %-escape ("%" must be followed by two hex digits)')
    if "//" in path:
        raise ValueError('must not contain "//" (request paths are matched with slashes merged)')
    for segment in _ESCAPED_DOT.sub(".", path).split("/"):
        if segment in (".", ".."):
            raise ValueError('must not contain "." or ".." segments (request paths are matched resolved)')


def _check_method(method: str) -> str:
    method = method.upper()
    if not _METHOD.match(method):
        raise ValueError("not an HTTP method")
    return method


HostPattern = Annotated[str, AfterValidator(_check_host)]
PathPattern = Annotated[str, AfterValidator(_check_path_pattern)]
Method = Annotated[str, AfterValidator(_check_method)]


class Route(Model):
    """Which requests go to a service. Every matcher given must match; lists match any of their items.

    Paths: ``/api`` matches by prefix, ``=/api`` exactly, ``/users/{id}`` is a template (each ``{name}``
    one segment; a final ``{name*}`` the rest of the path), ``~^/v[0-9]+/`` a regular expression
    (matched at the start of the path; named groups become parameters).
    """

    name: Name = Field(
        description="unique; top-level plugins refer to it (`route`), logs and metrics show it"
    )
    tags: list[str] = Field(
        default_factory=list, description="labels to find it by (admin API `?tags=`); no effect on traffic"
    )
    service: str = Field(description="name of the service matched requests go to")
    hosts: list[HostPattern] = Field(
        default_factory=list,
        description='request hosts: "api.example.com", "*.example.com" or "example.*" (no port); empty = any',
    )
    paths: list[PathPattern] = Field(
        default_factory=list,
        description='"/prefix", "=/exact", "/users/{id}" template or "~regex" (see above); empty = any path, '
        'but a route needs one matcher: ["/"] is the catch-all',
    )
    methods: list[Method] = Field(
        default_factory=list, description="HTTP methods (HEAD is not implied by GET); empty = any"
    )
    headers: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description='header name -> value, "~regex" or a list of them (any matches); an absent header never '
        "matches",
    )
    query: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description='query parameter -> value, "~regex" or a list of them (any matches); an absent parameter '
        "never matches",
    )
    strip_path: bool = Field(False, description="remove the matched path prefix before forwarding")
    rewrite: str | None = Field(None, description="forwarded path template, e.g. /v2/users/{id}")
    priority: int = Field(0, description="higher wins over every other precedence rule")
    plugins: list[PluginInstance] = Field(default_factory=list, description="plugins on this route")
    plugin_order: list[str] | None = Field(None, description="explicit plugin order for this route")
    retry_non_idempotent: bool = Field(
        False, description="let the upstream retry POST/PATCH (and other non-idempotent) requests once sent"
    )
    # TLS (docs/tls.md)
    protocols: list[Literal["http", "https"]] = Field(
        default_factory=list, description="client schemes this route matches; empty = both"
    )
    snis: list[HostPattern] = Field(
        default_factory=list,
        description='TLS server names (SNI) this route matches, like hosts ("*.example.com"); empty = any',
    )
    https_redirect: bool | Annotated[int, Field(ge=1, le=65535)] = Field(
        False,
        description="answer clear-text requests with a redirect to https (301 for GET/HEAD, else 308); a "
        "number instead of true is the HTTPS port to send clients to",
    )
    hsts: str | None = Field(
        None,
        description='Strict-Transport-Security value added to answers over https, e.g. "max-age=31536000"',
    )

    @field_validator("headers", "query", mode="before")
    @classmethod
    def _numbers_are_text(cls, matchers: Any) -> Any:
        """`query: {v: 2}` means the text "2" (YAML reads it as a number)."""
        if not isinstance(matchers, dict):
            return matchers
        return {name: _number_as_text(name, value) for name, value in matchers.items()}

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, Any]) -> dict[str, Any]:
        lowered: dict[str, Any] = {}
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r}: not a valid header name")
            if name.lower() in lowered:
                raise ValueError(f"{name!r}: listed twice (header names are case-insensitive)")
            _check_value_patterns(name, value)
            lowered[name.lower()] = value
        return lowered

    @field_validator("query")
    @classmethod
    def _check_query(cls, query: dict[str, Any]) -> dict[str, Any]:
        for name, value in query.items():
            _check_value_patterns(name, value)
        return query

    @model_validator(mode="after")
    def _check_route(self) -> Route:
        if not (self.hosts or self.paths or self.methods or self.headers or self.query):
            raise ValueError("needs at least one of hosts, paths, methods, headers or query")
        if self.rewrite is not None:
            if not self.rewrite.startswith("/"):
                raise ValueError('rewrite: must start with "/"')
            if "{" in _PARAM.sub("", self.rewrite) or "}" in _PARAM.sub("", self.rewrite):
                raise ValueError("rewrite: unbalanced braces")
            known = _path_params(self.paths)
            for name in _PARAM.findall(self.rewrite):
                if not _PARAM_NAME.match(name):
                    raise ValueError(f"rewrite: {{{name}}} is not a valid parameter name")
                if name.rstrip("*") not in known:
                    raise ValueError(f"rewrite: {{{name}}} is not a parameter of every path of this route")
        return self


def _check_template(path: str) -> None:
    names = []
    segments = path.split("/")
    for pos, segment in enumerate(segments):
        params = _PARAM.findall(segment)
        if not params:
            if "{" in segment or "}" in segment:
                raise ValueError(f"unbalanced braces in {segment!r}")
            continue
        if segment != "{" + params[0] + "}" or len(params) != 1:
            raise ValueError("a parameter must be a whole segment, like /users/{id}")
        if not _PARAM_NAME.match(params[0]):
            raise ValueError(f"{{{params[0]}}} is not a valid parameter name")
        if params[0].endswith("*") and pos != len(segments) - 1:
            raise ValueError(f"{{{params[0]}}} must be the last segment")
        names.append(params[0].rstrip("*"))
    if len(names) != len(set(names)):
        raise ValueError("parameter names must be unique")


def _path_params(paths: list[str]) -> set[str]:
    """Parameters every path of a route provides (a rewrite may only use those)."""
    sets = []
    for path in paths:
        if path.startswith("~"):
            sets.append(set(re.compile(path[1:]).groupindex))
        else:
            sets.append({name.rstrip("*") for name in _PARAM.findall(path)})
    return set.intersection(*sets) if sets else set()


def _number_as_text(name: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_number_as_text(name, item) for item in value]
    if isinstance(value, bool):  # YAML reads yes/no/on/off/true/false as booleans
        raise ValueError(f"{name!r}: {str(value).lower()} is read as a boolean; quote it to match text")
    if isinstance(value, int | float):
        return str(value)
    return value


def _check_value_patterns(name: str, value: str | list[str]) -> None:
    if isinstance(value, list) and not value:
        raise ValueError(f"{name!r}: an empty list matches nothing")
    for item in value if isinstance(value, list) else [value]:
        if item.startswith("~"):
            try:
                re.compile(item[1:])
            except re.error as exc:
                raise ValueError(f"{name!r}: invalid regular expression {item!r}: {exc}") from exc


class Consumer(Model):
    """Who is calling: identified by a credential of an authentication plugin."""

    username: Name = Field(
        description="unique; top-level plugins refer to it (`consumer`); backends get X-Consumer-Username"
    )
    tags: list[str] = Field(
        default_factory=list, description="labels to find it by (admin API `?tags=`); no effect on traffic"
    )
    id: str | None = Field(None, description="sent to backends as X-Consumer-Id (default: the username)")
    groups: list[str] = Field(default_factory=list, description="ACL groups")
    credentials: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="per authentication plugin, e.g. key-auth: [{key: ...}]"
    )
    plugins: list[PluginInstance] = Field(
        default_factory=list,
        description="plugins on this consumer's requests, once an authentication plugin identified it",
    )


class GatewayConfig(Model):
    """A whole configuration: node settings plus every entity."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings, description="node settings")
    services: list[Service] = Field(default_factory=list, description="where traffic goes")
    routes: list[Route] = Field(default_factory=list, description="which requests go to which service")
    upstreams: list[Upstream] = Field(
        default_factory=list, description="named groups of targets services send to"
    )
    consumers: list[Consumer] = Field(default_factory=list, description="who is calling")
    plugins: list[PluginInstance] = Field(
        default_factory=list, description="global plugins, unless route, service or consumer narrows one"
    )
    certificates: list[Certificate] = Field(
        default_factory=list, description="certificates served by TLS listeners, chosen by SNI (docs/tls.md)"
    )
