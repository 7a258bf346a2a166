"""A config snapshot compiled for the hot path: built once per config version, then only read.

`build_snapshot` turns a validated `GatewayConfig` into plain slotted objects: services with their
cluster and pre-encoded header values, routes with their plugin pipeline, a compiled router. Requests
in flight keep the snapshot they started with, so swapping in a new one is a single assignment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tollway.config.schema import Consumer, GatewayConfig, GatewaySettings, Route, Service
from tollway.proxy.forwarded import Forwarded
from tollway.proxy.pipeline import Pipeline
from tollway.router import Router
from tollway.upstream.cluster import Cluster
from tollway.upstream.pool import Pool
from tollway.upstream.tls import client_context, server_name
from tollway.upstream.worker_registry import UpstreamRegistry

if TYPE_CHECKING:  # built by the layers above (observability), handed in by the worker
    from tollway.counters.metrics import RouteMetrics
    from tollway.observability.tracecontext import TraceSettings
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.match_memo import KnownMatch

# (host, port, tls context, tls server name[, pool settings, owner upstream]) -> the worker's pool
PoolFactory = Callable[..., Pool]

HOST_BACKEND, HOST_PRESERVE, HOST_LITERAL = 0, 1, 2


class CompiledService:
    __slots__ = (
        "base_path",
        "cluster",
        "connect_timeout",
        "host_mode",
        "host_value",
        "name",
        "read_timeout",
        "replay_non_idempotent",
        "write_timeout",
    )

    def __init__(self, service: Service, cluster: Cluster, base_path: str) -> None:
        self.name = service.name
        self.cluster = cluster
        self.base_path = base_path.rstrip("/").encode("latin-1")
        mode = service.host_header
        self.host_mode = {"backend": HOST_BACKEND, "preserve": HOST_PRESERVE}.get(mode, HOST_LITERAL)
        self.host_value = mode.encode("latin-1")
        self.connect_timeout = service.connect_timeout
        self.read_timeout = service.read_timeout
        self.write_timeout = service.write_timeout
        self.replay_non_idempotent = service.replay_non_idempotent

    def __repr__(self) -> str:
        return f"<CompiledService {self.name} -> {self.cluster.name}>"


class CompiledRoute:
    __slots__ = ("metrics", "name", "pipeline", "retry_non_idempotent", "service", "strips_prefix")

    def __init__(
        self,
        name: str,
        service: CompiledService,
        pipeline: Pipeline | None = None,
        retry_non_idempotent: bool = False,
        strips_prefix: bool = False,
    ) -> None:
        self.name = name
        self.service = service
        self.pipeline = pipeline
        self.retry_non_idempotent = retry_non_idempotent
        self.strips_prefix = strips_prefix  # strip_path, no rewrite: X-Forwarded-Prefix tells what went
        self.metrics: RouteMetrics | None = None  # bound on first use (tollway.observability.recorder)

    def __repr__(self) -> str:
        return f"<CompiledRoute {self.name} -> {self.service.name}>"


class Snapshot:
    __slots__ = (
        "clusters",
        "forwarded",
        "forwarded_header",
        "matches",
        "request_finished",
        "router",
        "routes",
        "seen_once",
        "server_header",
        "services",
        "settings",
        "trace",
        "trusted_networks",
        "version",
    )

    def __init__(
        self,
        version: int,
        config: GatewayConfig,
        services: dict[str, CompiledService],
        routes: list[CompiledRoute],
        router: Router[CompiledRoute],
        trace: TraceSettings,
    ) -> None:
        self.version = version
        # The config itself is not kept: a worker holds its snapshot for as long as it serves, and the
        # validated models of 10,000 routes and consumers (~16 MB) are not needed once compiled.
        self.clusters: list[Cluster] = []  # every upstream's and service URL's cluster
        self.settings: GatewaySettings = config.gateway
        self.services = services
        self.routes = routes
        self.router = router
        header = config.gateway.server_header
        self.server_header = header.encode("latin-1") if header else None
        self.forwarded_header = config.gateway.forwarded_headers.forwarded
        self.trusted_networks = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config.gateway.trusted_proxies
        )
        self.trace = trace  # gateway.tracing, compiled: W3C trace context on every forwarded request
        self.forwarded: Forwarded | None = Forwarded.from_config(config.gateway.forwarded_headers)
        # Called when a request ends (metrics, access log, span), set by the worker once it applied the
        # observability settings; None when all three are off, so a request runs none of their code.
        self.request_finished: Callable[[Exchange], None] | None = None
        # The match memo (tollway.proxy.match_memo): routing results of requests seen before, valid for
        # this config version only; bounded (match_memo.MEMO_SIZE).
        self.matches: dict[tuple[bytes, bytes, bytes], KnownMatch] = {}
        self.seen_once: set[bytes] = set()  # URLs routed once: the memo's admission (match_memo.MEMO_SIZE)

    def __repr__(self) -> str:
        return f"<Snapshot v{self.version} routes={len(self.routes)} services={len(self.services)}>"

    def is_trusted_proxy(self, ip: str) -> bool:
        if not self.trusted_networks or not ip:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_networks)


# (config, compiled routes) -> None: gives each route its plugin pipeline (tollway.plugins.build)
AttachPipelines = Callable[[GatewayConfig, list[CompiledRoute]], None]


def build_snapshot(
    config: GatewayConfig,
    version: int,
    pool_for: PoolFactory,
    upstreams: UpstreamRegistry | None = None,
    *,
    trace: TraceSettings,
    attach_pipelines: AttachPipelines | None = None,
) -> Snapshot:
    """Compile a config. `upstreams` is the worker's registry (state that outlives snapshots); without
    one (tests, tools) the clusters get a private registry. The caller activates the registry's new
    clusters once it adopts the snapshot (`upstreams.activate`). What belongs to the layers above the
    proxy comes from the caller: `trace` (gateway.tracing, compiled) and `attach_pipelines` (builds the
    routes' plugin pipelines; required when the config uses plugins)."""
    if upstreams is None:
        upstreams = UpstreamRegistry(None)
    clusters = {u.name: upstreams.upstream_cluster(u, pool_for) for u in config.upstreams}
    services: dict[str, CompiledService] = {}
    for service in config.services:
        if service.upstream is not None:
            cluster, base_path = clusters[service.upstream], service.path
        else:
            cluster, base_path = _url_cluster(service, pool_for, upstreams)
        services[service.name] = CompiledService(service, cluster, base_path)
    routes = [
        CompiledRoute(r.name, services[r.service], None, r.retry_non_idempotent, _strips(r))
        for r in config.routes
    ]
    # The router before the pipelines: what its build leaves (~6 MB of sort keys at 10,000 routes) is
    # then reused by the consumers and credentials, instead of adding to the worker's peak (its RSS).
    router = Router([(spec, compiled) for spec, compiled in zip(config.routes, routes, strict=True)])
    if _uses_plugins(config):
        if attach_pipelines is None:
            raise ValueError("the config uses plugins: build_snapshot needs attach_pipelines")
        attach_pipelines(config, routes)
    snapshot = Snapshot(version, config, services, routes, router, trace)
    snapshot.clusters = list(clusters.values()) + [
        s.cluster for s in services.values() if s.cluster.name not in clusters
    ]
    return snapshot


def _strips(route: Route) -> bool:
    return route.strip_path and route.rewrite is None


def _uses_plugins(config: GatewayConfig) -> bool:
    if config.plugins or any(r.https_redirect or r.hsts is not None for r in config.routes):
        return True
    entities: list[Service | Route | Consumer] = [*config.services, *config.routes, *config.consumers]
    return any(entity.plugins for entity in entities)


def _url_cluster(service: Service, pool_for: PoolFactory, upstreams: UpstreamRegistry) -> tuple[Cluster, str]:
    assert service.url is not None
    parts = urlsplit(service.url)
    tls = parts.scheme == "https"
    default_port = 443 if tls else 80
    host = parts.hostname or ""
    port = parts.port or default_port
    context = client_context(service.tls) if tls else None
    pool = pool_for(host, port, context, server_name(service.tls, host) if tls else None)
    return upstreams.url_cluster(service.name, host, port, pool, default_port), parts.path
