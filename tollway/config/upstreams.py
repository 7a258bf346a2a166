"""Upstreams: targets, balancing, health checks, retries, circuit breaking and DNS discovery
(docs/upstreams.md). Part of the one schema (tollway.config.schema re-exports every model)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from tollway.config.model import _HEADER_NAME, Model
from tollway.config.tls import UpstreamTls
from tollway.config.types import Duration, Name, Size, parse_hostport

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
    tags: list[str] = Field(
        default_factory=list, description="labels to find it by (admin API `?tags=`); no effect on traffic"
    )
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
    scheme: Literal["http", "https"] = Field("http", description="https: talk TLS to every target")
    tls: UpstreamTls = Field(
        default_factory=UpstreamTls, description="TLS to targets (scheme https): verify, SNI, client cert"
    )

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
