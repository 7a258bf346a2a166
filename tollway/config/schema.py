"""The configuration schema: one definition of every entity, used by the YAML loader, `tollway check`,
the worker that compiles a snapshot, and (later) the config store and the admin API.

Entities follow Kong's vocabulary: services (where traffic goes), routes (which requests go there),
upstreams (named groups of targets), consumers (who is calling) and plugins (what happens on the way).
Node settings (listeners, limits, timeouts, logs) live under ``gateway:``.

These models are validated once per config load; the hot path never touches them. The worker compiles
them into plain slotted objects (see ``tollway.proxy.snapshot``).
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from tollway.config.types import Cidr, Duration, ListenAddress, Name, Size, parse_hostport
from tollway.observability.fields import DEFAULT_FIELDS, check_field

_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}(\.\*)?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PARAM = re.compile(r"\{([^{}]*)\}")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPED_DOT = re.compile(r"%2[eE]")


class Model(BaseModel):
    """Strict, immutable base: unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


# -- node settings ---------------------------------------------------------------------------------------
class Limits(Model):
    """Request limits. Exceeding one answers the status in brackets and closes the connection."""

    max_request_line: Size = Field(8192, ge=64, description="request line length [414]")
    max_header_size: Size = Field(32768, ge=256, description="total size of the request head [431]")
    max_headers: int = Field(100, ge=1, le=10000, description="number of request header fields [431]")
    max_body_size: Size = Field(100 * 1024 * 1024, ge=0, description="request body size, 0 = unlimited [413]")
    max_response_header_size: Size = Field(
        65536, ge=256, description="size of a backend's response head; larger is a backend error [502]"
    )


class Timeouts(Model):
    """Client-side timeouts. Upstream timeouts are set per service."""

    client_header: Duration = Field(10.0, gt=0, description="time to receive a request head [408]")
    client_body: Duration = Field(60.0, gt=0, description="idle time between request body reads [408]")
    client_send: Duration = Field(60.0, gt=0, description="idle time writing to a client that stops reading")
    keepalive: Duration = Field(
        60.0, ge=0, description="idle keep-alive connection lifetime; 0 = no keep-alive"
    )


# -- observability: access log, metrics, tracing (docs/monitoring.md) ------------------------------------
class AccessLog(Model):
    """One JSON line per request, written off the event loop: a slow or full sink drops lines (counted in
    tollway_access_log_dropped_lines_total) instead of slowing traffic."""

    enabled: bool = Field(True, description="write an access log")
    sink: Literal["stdout", "file", "syslog"] | None = Field(
        None, description='where lines go; default: "stdout" if path is "-", else "file"'
    )
    path: str = Field(
        "-", description='file path (reopened on SIGUSR1, for logrotate), or "-" for standard output'
    )
    fields: list[Annotated[str, AfterValidator(check_field)]] = Field(
        default_factory=lambda: list(DEFAULT_FIELDS),
        min_length=1,
        description="fields of each JSON line (see docs/monitoring.md), plus request_header.<name> and "
        "response_header.<name>",
    )
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of requests logged (1 = all)")
    always_log_errors: bool = Field(True, description="log every 5xx answer even when sampling leaves it out")
    syslog_address: str = Field(
        "unix:///dev/log", description='syslog sink: "udp://host:port" or "unix:///path" (RFC 5424 datagrams)'
    )
    syslog_facility: int = Field(16, ge=0, le=23, description="syslog facility number (16 = local0)")
    syslog_app_name: str = Field("tollway", min_length=1, max_length=48, description="RFC 5424 APP-NAME")
    buffer_size: Size = Field(65536, ge=0, description="bytes buffered before a write (flushed every 0.5 s)")

    @model_validator(mode="after")
    def _check_sink(self) -> AccessLog:
        if self.sink == "file" and self.path == "-":
            raise ValueError('sink "file" needs a path')
        if self.sink == "syslog":
            syslog_target(self.syslog_address)
        return self

    @property
    def resolved_sink(self) -> str:
        return self.sink or ("stdout" if self.path == "-" else "file")


def syslog_target(address: str) -> tuple[str, Any]:
    """``udp://host:port`` → ("udp", (host, port)); ``unix:///dev/log`` → ("unix", "/dev/log")."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError("syslog_address: unix:// needs an absolute path, e.g. unix:///dev/log")
        return "unix", path
    if address.startswith("udp://"):
        return "udp", parse_hostport(address[len("udp://") :], 514)
    raise ValueError('syslog_address: must be "udp://host:port" or "unix:///path"')


# Latency buckets (seconds). Request and upstream latencies span milliseconds to a minute; the
# gateway's own share is usually well under a millisecond, so its histogram starts lower.
# (Kept one line per list: easier to compare than one value per line.)
# fmt: off
DEFAULT_LATENCY_BUCKETS = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
]
DEFAULT_GATEWAY_BUCKETS = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0
]
# fmt: on


def _check_buckets(buckets: list[float]) -> list[float]:
    if any(b <= a for a, b in itertools.pairwise(buckets)):
        raise ValueError("buckets must be strictly increasing")
    return buckets


Buckets = Annotated[list[Annotated[float, Field(gt=0)]], AfterValidator(_check_buckets)]


class Metrics(Model):
    """Prometheus metrics on the status listener, merged across workers (docs/monitoring.md)."""

    enabled: bool = Field(True, description="count requests and serve /metrics on the status listener")
    status_codes: bool = Field(
        False, description="label requests with the exact status code instead of its class (2xx, 4xx, …)"
    )
    latency_buckets: Buckets = Field(
        default_factory=lambda: list(DEFAULT_LATENCY_BUCKETS),
        min_length=1,
        description="request and upstream latency histogram buckets, seconds (applies at start only)",
    )
    gateway_latency_buckets: Buckets = Field(
        default_factory=lambda: list(DEFAULT_GATEWAY_BUCKETS),
        min_length=1,
        description="gateway-only latency histogram buckets, seconds (applies at start only)",
    )
    max_series: int = Field(
        5000, ge=10, description="label sets per metric name; more are counted under label value 'other'"
    )
    collect_timeout: Duration = Field(
        2.0, gt=0, description="how long a scrape waits for a worker before using its last numbers"
    )


class Tracing(Model):
    """W3C trace context on every request, and OpenTelemetry spans over OTLP/HTTP for sampled ones."""

    enabled: bool = Field(False, description="export spans (traceparent is propagated even when false)")
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", description="OTLP/HTTP (protobuf) traces endpoint of a collector"
    )
    sample_ratio: float = Field(
        0.01, ge=0.0, le=1.0, description="share of new traces recorded; a client's sampled flag is followed"
    )
    service_name: str = Field("tollway", min_length=1, description="service.name resource attribute")
    propagate: bool = Field(
        True, description="send traceparent/tracestate to backends: continue the client's trace or start one"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra headers on export requests (auth)"
    )
    export_timeout: Duration = Field(5.0, gt=0, description="per export request; spans are dropped after it")
    max_queue_size: int = Field(
        2048, ge=1, description="spans waiting for export; more are dropped and counted, never waited for"
    )
    max_export_batch_size: int = Field(512, ge=1, description="spans per export request")

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_endpoint(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return url


class DnsSettings(Model):
    """The resolver used for hostname targets of upstreams (docs/upstreams.md)."""

    nameservers: list[str] = Field(
        default_factory=list, description='"ip" or "ip:port"; empty = the system\'s (/etc/resolv.conf)'
    )
    hosts_file: str | None = Field("/etc/hosts", description="names looked up here first; null = none")
    timeout: Duration = Field(2.0, gt=0, description="time for one resolution")

    @field_validator("nameservers")
    @classmethod
    def _check_nameservers(cls, servers: list[str]) -> list[str]:
        for server in servers:
            parse_nameserver(server)
        return servers


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"10.0.0.2"``, ``"127.0.0.1:5353"``, ``"::1"``, ``"[::1]:5353"`` → (ip, port)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: must be an IP address, optionally with :port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: must be an IP address, optionally with :port")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: must be an IP address, optionally with :port") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: invalid port")
    return host, port


class GatewaySettings(Model):
    """Settings of the gateway node. `listen`, `status_listen` and `workers` apply at start only."""

    listen: list[ListenAddress] = Field(
        default_factory=lambda: ["0.0.0.0:8000"],
        min_length=1,
        description='addresses clients connect to: "host:port", "[::1]:port", ":port" (all interfaces); '
        "every worker listens on each; `tollway run --listen` replaces them",
    )
    status_listen: ListenAddress | None = Field(
        "127.0.0.1:8100", description="the status listener (/live, /ready, /status); null turns it off"
    )
    workers: int | Literal["auto"] = Field(
        "auto",
        description='worker processes; "auto" = one per CPU core; `tollway run --workers` overrides it',
    )
    backlog: int = Field(
        4096, ge=1, description="queue length of connections not yet accepted, per listening socket"
    )
    trusted_proxies: list[Cidr] = Field(
        default_factory=list,
        description="clients whose X-Forwarded-For / -Proto / -Host are believed and extended",
    )
    drain_timeout: Duration = Field(30.0, ge=0, description="SIGTERM: time in-flight requests get to finish")
    drain_delay: Duration = Field(
        0.0, ge=0, description="SIGTERM: time /ready answers 503 before listeners close"
    )
    watch_interval: Duration = Field(1.0, ge=0, description="config file change polling; 0 = SIGHUP only")
    server_header: str | None = Field(None, description="Server header on gateway answers; null = none")
    limits: Limits = Field(default_factory=Limits, description="request size limits")
    timeouts: Timeouts = Field(default_factory=Timeouts, description="client-side timeouts")
    access_log: AccessLog = Field(
        default_factory=AccessLog, description="the JSON access log (one line per request)"
    )
    dns: DnsSettings = Field(default_factory=DnsSettings, description="resolver of upstreams' hostnames")
    metrics: Metrics = Field(
        default_factory=Metrics, description="Prometheus metrics at /metrics on the status listener"
    )
    tracing: Tracing = Field(default_factory=Tracing, description="W3C trace context and OTLP span export")


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
    plugins: list[PluginInstance] = Field(
        default_factory=list, description="plugins on every route of this service"
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


# -- upstreams: targets, balancing, health, retries, circuit breaking (docs/upstreams.md) -------------
_STATUS_CLASS = re.compile(r"^[1-5]xx$")


def _expand_statuses(items: list[int | str]) -> list[int]:
    """``[200, "3xx"]`` → the status codes; ``"Nxx"`` stands for a whole class."""
    out: set[int] = set()
    for item in items:
        if isinstance(item, str):
            if not _STATUS_CLASS.match(item.lower()):
                raise ValueError(f'{item!r}: use a status code (like 503) or a class (like "5xx")')
            base = int(item[0]) * 100
            out.update(range(base, base + 100))
        elif 100 <= item <= 599:
            out.add(item)
        else:
            raise ValueError(f"{item}: a status code is from 100 to 599")
    return sorted(out)


StatusList = Annotated[list[int | str], AfterValidator(_expand_statuses)]
RetryOn = Literal["error", "timeout"]
RecordType = Literal["A", "AAAA"]


def _statuses(*items: int | str) -> list[int | str]:
    return list(items)


def _retry_on(*items: RetryOn) -> list[RetryOn]:
    return list(items)


def _record_types(*items: RecordType) -> list[RecordType]:
    return list(items)


class Target(Model):
    """One backend instance of an upstream. A hostname is resolved through DNS and every address it
    resolves to becomes a target (with this weight); with `srv: true` the name is an SRV record."""

    target: str = Field(
        description='"host:port"; with `srv: true`, the SRV name (like "_http._tcp.api.internal")',
    )
    weight: int = Field(
        100,
        ge=0,
        le=65535,
        description="share of traffic relative to the other targets; 0 = none",
    )
    backup: bool = Field(
        False,
        description="takes traffic only while every primary (non-backup) target is down",
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="a name for status and logs (default: the target); lets one address be listed twice",
    )
    srv: bool = Field(
        False,
        description="resolve `target` as a DNS SRV name: records give addresses, ports, weights",
    )

    @model_validator(mode="after")
    def _check_target(self) -> Target:
        if self.srv:
            if ":" in self.target.strip("[]") and not self.target.startswith("["):
                raise ValueError("target: an SRV name has no port (the records give it)")
        else:
            try:
                parse_hostport(self.target)
            except ValueError as exc:
                raise ValueError(f"target: {exc}") from None
        return self

    @property
    def key(self) -> str:
        return self.name or self.target


class ActiveHealthcheck(Model):
    """Probes every target from the supervisor (once per node, whatever the number of workers)."""

    type: Literal["http", "tcp"] = Field(
        "http",
        description="http: a GET whose status is checked; tcp: a connect",
    )
    http_path: str = Field("/", description="path of the HTTP probe")
    host: str | None = Field(
        None,
        description="Host header of the HTTP probe (default: the target's host:port)",
    )
    expected_statuses: StatusList = Field(
        default_factory=lambda: _statuses("2xx", "3xx"),
        validate_default=True,
        description='statuses that pass, e.g. [200, "3xx"]',
    )
    interval: Duration = Field(5.0, gt=0, description="time between probes of a healthy target")
    unhealthy_interval: Duration | None = Field(
        None, gt=0, description="time between probes of an unhealthy target (default: `interval`)"
    )
    timeout: Duration = Field(1.0, gt=0, description="a probe not answered in time fails")
    healthy_threshold: int = Field(
        2,
        ge=1,
        le=1000,
        description="consecutive passes that make a target healthy",
    )
    unhealthy_threshold: int = Field(
        3,
        ge=1,
        le=1000,
        description="consecutive failures that make it unhealthy",
    )

    @field_validator("http_path")
    @classmethod
    def _check_http_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError('must start with "/"')
        return path


class PassiveHealthcheck(Model):
    """Outlier detection on live traffic, per worker; an ejection is shared with every worker."""

    enabled: bool = Field(True, description="count failures on live traffic and eject failing targets")
    consecutive_failures: int = Field(
        5, ge=1, le=10000, description="connect failures, timeouts or `statuses` in a row that eject a target"
    )
    statuses: StatusList = Field(
        default_factory=lambda: _statuses(500, 502, 503, 504),
        validate_default=True,
        description="backend statuses counted as failures",
    )
    base_ejection_time: Duration = Field(
        30.0,
        gt=0,
        description="first ejection; the n-th lasts n times this",
    )
    max_ejection_time: Duration = Field(300.0, gt=0, description="cap on a growing ejection time")
    max_ejection_percent: int = Field(
        50, ge=0, le=100, description="share of an upstream's targets ejected at once (at least one)"
    )

    @model_validator(mode="after")
    def _check_times(self) -> PassiveHealthcheck:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time: must not be less than base_ejection_time")
        return self


class Healthchecks(Model):
    """Active probes (from the supervisor) and passive outlier detection (on live traffic)."""

    active: ActiveHealthcheck | None = Field(None, description="active probes; null (default) = none")
    passive: PassiveHealthcheck = Field(
        default_factory=PassiveHealthcheck, description="outlier detection on live traffic (on by default)"
    )


class RetryBudget(Model):
    """Retries in the last `window` may be at most `ratio` * requests in it, plus `min_per_second` *
    `window` (so a quiet upstream can still retry). Retries never multiply an outage."""

    ratio: float = Field(0.2, ge=0, le=10, description="retries allowed per request over the window")
    min_per_second: float = Field(10.0, ge=0, description="retries always allowed, per second of window")
    window: Duration = Field(10.0, ge=1, le=300, description="the sliding window (1-second buckets)")


class Backoff(Model):
    """Delay before retry n: a random time up to min(max, base * 2^(n-1)) ("full jitter")."""

    base: Duration = Field(0.025, ge=0, description="the delay cap of the first retry")
    max: Duration = Field(0.25, ge=0, description="the largest delay cap")

    @model_validator(mode="after")
    def _check_max(self) -> Backoff:
        if self.max < self.base:
            raise ValueError("max: must not be less than base")
        return self


class Retries(Model):
    """Which failed tries are tried again, on a different target. Requests whose method is not
    idempotent are retried only when nothing was sent (a connect failure) unless the route sets
    `retry_non_idempotent`."""

    attempts: int = Field(3, ge=0, le=100, description="retries after the first try; 0 = none")
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: _retry_on("error", "timeout"),
        description="error: connect failure, reset or bad response before its head; timeout: connect or read",
    )
    statuses: StatusList = Field(
        default_factory=list,
        description="backend statuses that are retried, e.g. [502, 503]",
    )
    budget: RetryBudget = Field(
        default_factory=RetryBudget, description="retries allowed relative to requests"
    )
    backoff: Backoff = Field(default_factory=Backoff, description="random delay before each retry")
    replay_limit: Size = Field(
        65536, ge=0, description="largest request body kept to be sent again; a larger one is never retried"
    )


class CircuitBreaker(Model):
    """Limits per worker process (as nginx's `max_conns`); beyond them requests get an immediate 503 with
    `X-Tollway-Circuit-Breaker` naming the limit."""

    max_connections: int = Field(
        0,
        ge=0,
        description="open connections to the upstream's targets; 0 = unlimited",
    )
    max_pending_requests: int = Field(
        0,
        ge=0,
        description="requests waiting for a new connection; 0 = unlimited",
    )


class PoolOptions(Model):
    """Keep-alive connections to each target."""

    max_idle: int = Field(256, ge=0, description="idle connections kept per target")
    idle_timeout: Duration = Field(60.0, gt=0, description="an idle connection older than this is closed")
    max_requests: int = Field(
        10000,
        ge=0,
        description="requests per connection before it is retired; 0 = unlimited",
    )


class UpstreamDns(Model):
    """How hostname targets are resolved (in the supervisor, in the background)."""

    record_types: list[RecordType] = Field(
        default_factory=lambda: _record_types("A", "AAAA"),
        min_length=1,
        description="address records asked for",
    )
    min_ttl: Duration = Field(1.0, gt=0, description="shortest time an answer is used before asking again")
    max_ttl: Duration = Field(300.0, gt=0, description="longest time an answer is used before asking again")
    error_ttl: Duration = Field(
        5.0,
        gt=0,
        description="time before asking again after a failed or empty answer (the last good set stays)",
    )


_HASH_ON = Literal["ip", "header", "cookie", "consumer", "path"]


class Upstream(Model):
    """A named group of targets that services send traffic to, with how to balance, check and retry."""

    name: Name = Field(description="unique; services refer to it (`upstream`), metrics show it")
    algorithm: Literal["round-robin", "random", "least-connections", "consistent-hashing", "latency"] = Field(
        "round-robin", description="how a target is picked (docs/upstreams.md)"
    )
    hash_on: _HASH_ON = Field(
        "ip",
        description="consistent-hashing key: ip, header, cookie, consumer or path",
    )
    hash_key: str | None = Field(
        None,
        description="the header or cookie name when hash_on is header or cookie",
    )
    targets: list[Target] = Field(min_length=1, description="the backend instances (at least one)")
    healthchecks: Healthchecks = Field(default_factory=Healthchecks, description="active and passive checks")
    retries: Retries = Field(default_factory=Retries, description="which failed tries are tried again")
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker, description="per-worker limits")
    pool: PoolOptions = Field(default_factory=PoolOptions, description="keep-alive connections to targets")
    dns: UpstreamDns = Field(default_factory=UpstreamDns, description="how hostname targets are resolved")

    @model_validator(mode="after")
    def _check_upstream(self) -> Upstream:
        if self.hash_on in ("header", "cookie") and not self.hash_key:
            raise ValueError(f"hash_key: required when hash_on is {self.hash_on!r}")
        if self.hash_key is not None and self.hash_on == "header" and not _HEADER_NAME.match(self.hash_key):
            raise ValueError("hash_key: not a valid header name")
        seen: set[str] = set()
        for i, target in enumerate(self.targets):
            if target.key in seen:
                raise ValueError(f"targets[{i}]: duplicate target {target.key!r} (give one a distinct name)")
            seen.add(target.key)
        return self


class Consumer(Model):
    """Who is calling: identified by a credential of an authentication plugin."""

    username: Name = Field(
        description="unique; top-level plugins refer to it (`consumer`); backends get X-Consumer-Username"
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
