"""Node settings: the ``gateway:`` section (listeners, limits, timeouts, access log, metrics, tracing,
DNS). Part of the one schema (tollway.config.schema re-exports every model)."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from tollway.config.admin_settings import AdminSettings
from tollway.config.log_fields import DEFAULT_FIELDS, check_field
from tollway.config.model import Model
from tollway.config.store_settings import StoreSettings
from tollway.config.tls import ListenerTls
from tollway.config.types import Cidr, Duration, ListenAddress, Size, TrafficListen, parse_hostport


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


class ForwardedHeaders(Model):
    """Forwarding headers sent to backends besides X-Forwarded-For/-Proto/-Host (which are always sent).
    Each costs nothing while off; when on, a trusted proxy's own value is kept, anyone else's replaced."""

    x_real_ip: bool = Field(
        False,
        description="send X-Real-IP: the client's address (through `trusted_proxies`, like plugins see it)",
    )
    x_forwarded_port: bool = Field(
        False, description="send X-Forwarded-Port: the port the client connected to"
    )
    x_forwarded_prefix: bool = Field(
        False, description="send X-Forwarded-Prefix: the path prefix a `strip_path` route removed"
    )
    forwarded: bool = Field(
        False, description="send the standard Forwarded header (RFC 7239: for, proto, host)"
    )


class GatewaySettings(Model):
    """Settings of the gateway node. `listen`, `status_listen` and `workers` apply at start only."""

    listen: list[TrafficListen] = Field(
        default_factory=lambda: ["0.0.0.0:8000"],
        min_length=1,
        description='addresses clients connect to: "host:port", "[::1]:port", ":port" (all interfaces), '
        'followed by "tls" for HTTPS or "mtls" for HTTPS with client certificates (docs/tls.md); every '
        "worker listens on each; `tollway run --listen` replaces them",
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
        description="clients whose X-Forwarded-For / -Proto / -Host and Forwarded are believed and extended "
        "(and whose X-Real-IP / X-Forwarded-Port / -Prefix are kept, see forwarded_headers)",
    )
    forwarded_headers: ForwardedHeaders = Field(
        default_factory=ForwardedHeaders,
        description="X-Real-IP, X-Forwarded-Port, X-Forwarded-Prefix to backends",
    )
    drain_timeout: Duration = Field(30.0, ge=0, description="SIGTERM: time in-flight requests get to finish")
    drain_delay: Duration = Field(
        0.0, ge=0, description="SIGTERM: time /ready answers 503 before listeners close"
    )
    watch_interval: Duration = Field(1.0, ge=0, description="config file change polling; 0 = SIGHUP only")
    allow_empty_routes: bool = Field(
        False,
        description="let a reload apply a config without routes (every request then gets 404); off: "
        "such a reload is refused and the running config stays",
    )
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
    tls: ListenerTls = Field(default_factory=ListenerTls, description="TLS listeners' policy (docs/tls.md)")
    store: StoreSettings = Field(
        default_factory=StoreSettings, description="where entities come from (docs/config-store.md)"
    )
    admin: AdminSettings = Field(
        default_factory=AdminSettings, description="the admin REST API listener (docs/admin-api.md)"
    )
