"""Every metric Tollway exposes: name (without the ``tollway_`` prefix), type, labels and help.

Features that report through `tollway.counters.metrics` declare their metrics here (one entry
each), so the type, help text and label names are fixed in one place and docs/monitoring.md can list
them. A plugin from outside the tree may instead call `metrics.REGISTRY.family(...)` once, or just
use a name: its first use declares it (help text empty, labels as given).

`merge` says how the supervisor combines a gauge across workers: "sum" (connections), "max" (a
state every worker reports the same way, such as a health flag) or "min".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: list[float] = field(default_factory=list)  # histograms; empty = the default buckets
    merge: str = "sum"
    source: str = "worker"  # who reports it (documentation only): worker, supervisor, request path


# The request path (tollway.observability.recorder) fills these per (service, route); listed for the
# docs and the exposition. Requests answered before a route matched have empty service and route.
REQUEST_METRICS: dict[str, Entry] = {
    "http_requests_total": Entry(
        "counter",
        "Requests answered, by service, route, method (GET … OPTIONS, other) and status "
        "(class such as 2xx, or the code with metrics.status_codes)",
        ("service", "route", "method", "code"),
        source="request path",
    ),
    "http_request_duration_seconds": Entry(
        "histogram",
        "Total time from the request head to the last response byte",
        ("service", "route"),
        source="request path",
    ),
    "http_upstream_duration_seconds": Entry(
        "histogram",
        "Time from sending the request to a backend (connect included) to its response head",
        ("service", "route"),
        source="request path",
    ),
    "http_gateway_duration_seconds": Entry(
        "histogram",
        "Time the gateway held a request before sending it upstream (routing, plugins, queueing), "
        "or the whole request when the gateway answered itself",
        ("service", "route"),
        source="request path",
    ),
    "http_received_bytes_total": Entry(
        "counter", "Request body bytes received from clients", ("service", "route"), source="request path"
    ),
    "http_sent_bytes_total": Entry(
        "counter",
        "Response bytes (head and body) sent to clients",
        ("service", "route"),
        source="request path",
    ),
}

CATALOG: dict[str, Entry] = {
    # -- workers -------------------------------------------------------------------------------------------
    "connections_active": Entry("gauge", "Open client connections"),
    "connections_accepted_total": Entry("counter", "Client connections accepted"),
    "upstream_connections": Entry(
        "gauge", "Backend connections in the workers' pools, by state (active, idle)", ("target", "state")
    ),
    "upstream_connections_opened_total": Entry("counter", "Backend connections opened", ("target",)),
    "upstream_errors_total": Entry(
        "counter",
        "Requests answered with a gateway error because the backend failed (after any retries), by error "
        "(connect, tls, timeout, reset, protocol, no_target, circuit_open, other)",
        ("service", "target", "error"),
    ),
    "access_log_written_lines_total": Entry("counter", "Access log lines written to the sink"),
    "access_log_dropped_lines_total": Entry(
        "counter", "Access log lines dropped because the sink was slow, full or failing"
    ),
    "tracing_spans_total": Entry(
        "counter",
        "Spans of sampled requests, by result (exported; failed: the collector refused them or was "
        "unreachable; dropped: the export queue was full, or the collector was down at the time and the span "
        "was not built)",
        ("result",),
    ),
    # -- reported by other features, one call each (see docs/monitoring.md) --------------------------------
    "upstream_target_health": Entry(
        "gauge",
        "1 for a target's current health state (healthy, unhealthy: failing active checks, ejected: taken "
        "out by passive checks), 0 for the others",
        ("upstream", "target", "address", "state"),
        merge="max",
        source="supervisor",
    ),
    "tls_certificate_expiry_timestamp_seconds": Entry(
        "gauge",
        "When each configured certificate expires (UNIX time of its notAfter); alert well before it",
        ("certificate",),
        merge="max",
        source="supervisor",
    ),
    "upstream_ejections_total": Entry(
        "counter",
        "Targets taken out of rotation by passive health checks (outlier detection)",
        ("upstream", "target", "address"),
        source="supervisor",
    ),
    "upstream_target_requests_total": Entry(
        "counter",
        "Tries sent to each target (a retried request counts once per target tried)",
        ("upstream", "target", "address"),
    ),
    "upstream_target_failures_total": Entry(
        "counter",
        "Tries that failed at a target (connect error, timeout, reset, or a status passive checks count), "
        "retried or not: the per-target view of a failing backend",
        ("upstream", "target", "address"),
    ),
    "upstream_retries_total": Entry(
        "counter",
        "Retries by the upstream's retry policy: retried (another try was made), refused_by_budget (the "
        "retry budget said no: the failure reached the client)",
        ("upstream", "result"),
    ),
    "upstream_circuit_breaker_rejections_total": Entry(
        "counter",
        "Requests refused (503) because an upstream's circuit breaker limit was reached, by limit "
        "(max_connections, max_pending_requests)",
        ("upstream", "limit"),
    ),
    "rate_limit_decisions_total": Entry(
        "counter",
        "Rate-limit decisions by plugin, route and decision (allowed, limited, error)",
        ("plugin", "route", "decision"),
    ),
    "rate_limit_redis_up": Entry(
        "gauge",
        "1 while the rate limiter's Redis answers, 0 during an outage (the lowest over workers: 0 as soon "
        "as one worker sees it down); decisions then fall back per plugin (fail-open or fail-closed)",
        ("backend",),
        merge="min",
    ),
    "rate_limit_redis_outages_total": Entry(
        "counter", "Redis outages begun (each is logged once, not once per request)", ("backend",)
    ),
    "rate_limit_redis_fallbacks_total": Entry(
        "counter", "Rate-limit decisions taken without Redis because it was unreachable", ("backend",)
    ),
    "rate_limit_redis_commands_total": Entry(
        "counter",
        "Commands sent to the rate limiter's Redis (divide by rate_limit_decisions_total for commands "
        "per request: about 1 for the redis policy, far less for batched)",
        ("backend",),
    ),
    "rate_limit_redis_errors_total": Entry(
        "counter", "Redis calls that failed (refused, reset, timed out, error reply)", ("backend",)
    ),
    "rate_limit_table_evictions_total": Entry(
        "counter",
        "Live keys pushed out of the node's shared limit table because their bucket was full: those keys "
        "restart from zero (enlarge TOLLWAY_STATE_SLOTS)",
    ),
    "proxy_cache_requests_total": Entry(
        "counter",
        "Requests a proxy-cache handled, by result: hit, stale (served stale: max-stale, "
        "stale-while-revalidate, stale-if-error), miss (went to the backend), revalidated (a 304 refreshed "
        "the copy), coalesced (waited for another request's response), bypass (the store failed)",
        ("result",),
    ),
    "proxy_cache_stored_bytes_total": Entry("counter", "Body bytes proxy-caches wrote to their stores"),
    "proxy_cache_evictions_total": Entry(
        "counter", "Copies pushed out of a node or worker store by its byte budget (least recently used)"
    ),
    "proxy_cache_invalidations_total": Entry(
        "counter", "Keys invalidated by unsafe requests (their URI, Location and Content-Location)"
    ),
    "auth_failures_total": Entry(
        "counter",
        "Requests rejected (401) by an authentication plugin, by reason (missing: no credential; invalid: "
        "unknown, expired or badly signed; ambiguous: two different credentials in one request)",
        ("plugin", "route", "reason"),
    ),
    # -- the supervisor ------------------------------------------------------------------------------------
    "build_info": Entry(
        "gauge",
        "Always 1; the labels name the build",
        ("version", "python"),
        merge="max",
        source="supervisor",
    ),
    "start_time_seconds": Entry("gauge", "Unix time the gateway started", merge="max", source="supervisor"),
    "config_version": Entry(
        "gauge",
        "Version of the config being served (1 at start, +1 per reload)",
        merge="max",
        source="supervisor",
    ),
    "config_last_reload_timestamp_seconds": Entry(
        "gauge", "Unix time of the last reload attempt (or of the start)", merge="max", source="supervisor"
    ),
    "config_last_reload_success": Entry(
        "gauge",
        "1 if the last reload attempt applied, 0 if the file was rejected",
        merge="max",
        source="supervisor",
    ),
    "config_reloads_total": Entry(
        "counter", "Reload attempts by result (ok, failed)", ("result",), source="supervisor"
    ),
    "workers": Entry(
        "gauge",
        "Worker processes by state (alive, ready: serving the current config)",
        ("state",),
        merge="max",
        source="supervisor",
    ),
    "worker_restarts_total": Entry(
        "counter", "Workers restarted after exiting unexpectedly", ("worker",), source="supervisor"
    ),
    "worker_resident_memory_bytes": Entry(
        "gauge", "Resident memory of each worker process", ("worker",), merge="max", source="supervisor"
    ),
    "metrics_collect_timeouts_total": Entry(
        "counter",
        "Scrapes for which a worker did not answer in time (its previous numbers were used)",
        ("worker",),
        source="supervisor",
    ),
}


def declare(name: str, kind: str, help_text: str, labels: tuple[str, ...] = (), merge: str = "sum") -> None:
    """Add a metric to the catalogue (at import time, before its first use)."""
    existing = CATALOG.get(name)
    if existing is not None and (existing.kind, existing.labels) != (kind, labels):
        raise ValueError(f"metric {name!r} is already declared differently")
    CATALOG[name] = Entry(kind, help_text, labels, merge=merge)
