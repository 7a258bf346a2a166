"""The worker's side of upstreams: builds clusters from config, keeps the state that outlives them, and
applies what the supervisor sends (DNS answers, active health verdicts, other workers' ejections).

One `UpstreamRegistry` per worker. It holds an `UpstreamState` per upstream (keyed by name) and, in it,
a `TargetState` per target (keyed by target name and address), so in-flight counts, response-time
averages, ejections and health survive config rebuilds and DNS changes. It is the clusters' `hooks`:
passive ejections decided in `Cluster.release` come here to get a timer and to be told to the supervisor.

Messages (tollway.runtime.channel), supervisor → worker:
  ("upstream_state", dns, health, ejections)        everything, before a new worker's first config
  ("upstream_dns", upstream, target, records|None)  a hostname target's current addresses
  ("upstream_health", upstream, target, address, healthy)
  ("upstream_eject", upstream, target, address, duration, count, reason)
  ("upstream_uneject", upstream, target, address)
  ("upstream_stats", token)                          → reply ("upstream_stats", token, stats)
worker → supervisor:
  ("upstream_ejected", upstream, target, address, duration, count, reason)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tollway.config.types import parse_hostport
from tollway.upstream.balancers import make_balancer
from tollway.upstream.cluster import Breaker, Cluster, UpstreamState
from tollway.upstream.outlier import Outlier
from tollway.upstream.pool import Pool, PoolSettings
from tollway.upstream.retry import ON_ERROR, ON_TIMEOUT, RetryPolicy
from tollway.upstream.target import Target, TargetState
from tollway.upstream.tls import client_context, server_name

if TYPE_CHECKING:
    from tollway.config.schema import Target as TargetSpec
    from tollway.config.schema import Upstream

log = logging.getLogger("tollway.upstream")

# A resolved address of a target: (host, port, weight, backup). For A/AAAA answers weight is -1 and
# backup False: the target's own weight and backup flag apply. SRV answers carry their own.
Record = tuple[str, int, int, bool]
# (host, port, tls context, server name, pool settings, owner upstream) -> the worker's pool
PoolFactory = Callable[..., Pool]
TargetKey = tuple[str, str, str]  # (upstream, target name, address)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address_label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def target_records(spec: TargetSpec, resolved: list[Record] | None) -> list[Record]:
    """The addresses a target stands for: itself if it is an IP address; what DNS answered for a
    hostname (and, until DNS answers, the hostname itself, connected to through the system resolver);
    nothing for an SRV name DNS has not answered yet."""
    if spec.srv:
        records = resolved or []
        return [(h, p, w if w >= 0 else spec.weight, b or spec.backup) for h, p, w, b in records]
    host, port = parse_hostport(spec.target)
    if is_ip(host) or resolved is None:
        return [(host, port, spec.weight, spec.backup)]
    return [(h, p, spec.weight if w < 0 else w, spec.backup or b) for h, p, w, b in resolved]


def tls_for(spec: Upstream, target: TargetSpec, address: str) -> tuple[ssl.SSLContext | None, str | None]:
    """The TLS context and SNI name for a target of an https upstream: the target's own host name (even
    once DNS turned it into addresses; the address for SRV answers) unless `tls.server_name` is set."""
    if spec.scheme != "https":
        return None, None
    host = address if target.srv else parse_hostport(target.target)[0]
    return client_context(spec.tls), server_name(spec.tls, host)


def retry_policy(spec: Upstream) -> RetryPolicy:
    retries = spec.retries
    conditions = retries.retry_on
    on = (ON_ERROR if "error" in conditions else 0) | (ON_TIMEOUT if "timeout" in conditions else 0)
    return RetryPolicy(
        attempts=retries.attempts,
        on=on,
        statuses=frozenset(int(s) for s in retries.statuses),
        backoff_base=retries.backoff.base,
        backoff_max=retries.backoff.max,
        replay_limit=retries.replay_limit,
    )


def outlier_policy(spec: Upstream) -> Outlier | None:
    passive = spec.healthchecks.passive
    if not passive.enabled:
        return None
    return Outlier(
        threshold=passive.consecutive_failures,
        statuses=frozenset(int(s) for s in passive.statuses),
        base_time=passive.base_ejection_time,
        max_time=passive.max_ejection_time,
        max_percent=passive.max_ejection_percent,
    )


class UpstreamRegistry:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,
        send: Callable[[tuple[Any, ...]], Any] | None = None,
        on_targets_changed: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.send = send or (lambda message: None)
        self.on_targets_changed = on_targets_changed or (lambda: None)
        self.states: dict[str, UpstreamState] = {}
        self.clusters: dict[str, Cluster] = {}  # the current snapshot's clusters, by name
        self._specs: dict[str, tuple[Upstream, PoolFactory]] = {}  # how to rebuild targets on DNS changes
        self._building: dict[str, tuple[Upstream, PoolFactory]] = {}
        self.resolved: dict[tuple[str, str], list[Record]] = {}  # (upstream, target name) -> DNS answer
        self.health: dict[TargetKey, bool] = {}  # verdicts of the supervisor's active checks
        self._ticker: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<UpstreamRegistry upstreams={len(self.states)} clusters={len(self.clusters)}>"

    # -- building (called by build_snapshot) ------------------------------------------------------------
    def upstream_state(self, name: str) -> UpstreamState:
        state = self.states.get(name)
        if state is None:
            state = self.states[name] = UpstreamState(name)
            state.hooks = self
        self._start_ticker()
        return state

    def upstream_cluster(self, spec: Upstream, pool_for: PoolFactory) -> Cluster:
        state = self.upstream_state(spec.name)
        budget = spec.retries.budget
        state.budget.configure(budget.ratio, budget.min_per_second, int(budget.window))
        limits = spec.circuit_breaker
        if limits.max_connections or limits.max_pending_requests:
            if state.breaker is None:
                state.breaker = Breaker()
            state.breaker.max_connections = limits.max_connections
            state.breaker.max_pending = limits.max_pending_requests
        else:
            state.breaker = None
        cluster = Cluster(
            spec.name,
            self._targets(spec, pool_for),
            state,
            make_balancer(spec.algorithm, spec.hash_on, spec.hash_key),
            make_balancer(spec.algorithm, spec.hash_on, spec.hash_key),
            retry_policy(spec),
            outlier_policy(spec),
        )
        self._building[spec.name] = (spec, pool_for)
        return cluster

    def url_cluster(self, service: str, host: str, port: int, pool: Pool, default_port: int) -> Cluster:
        """The one-target cluster of a service with a plain `url`."""
        name = f"service:{service}"
        state = self.upstream_state(name)
        label = address_label(host, port)
        target = Target(host, port, 1, pool, default_port, False, state.target_state(label, label), label)
        return Cluster(name, [target], state)

    def activate(self, clusters: list[Cluster]) -> None:
        """The snapshot built with these clusters is now the worker's: DNS and health updates go to
        them, and state no cluster uses any more is dropped."""
        self.clusters = {c.name: c for c in clusters}
        self._specs = {name: spec for name, spec in self._building.items() if name in self.clusters}
        self._building = {}
        for name in list(self.states):
            if name not in self.clusters:
                self._drop_state(self.states.pop(name))
        for cluster in clusters:
            used = {(t.key, t.label) for t in cluster.targets}
            state = cluster.upstream
            for key in [k for k in state.targets if k not in used]:
                self._cancel_timer(state.targets.pop(key))

    def _targets(self, spec: Upstream, pool_for: PoolFactory) -> list[Target]:
        state = self.states[spec.name]
        options = spec.pool
        settings = PoolSettings(options.max_idle, options.idle_timeout, options.max_requests)
        targets = []
        default_port = 443 if spec.scheme == "https" else 80
        for target_spec in spec.targets:
            records = target_records(target_spec, self.resolved.get((spec.name, target_spec.key)))
            for host, port, weight, backup in records:
                label = address_label(host, port)
                target_state = state.target_state(target_spec.key, label)
                healthy = self.health.get((spec.name, target_spec.key, label), True)
                if target_state.healthy != healthy:
                    target_state.healthy = healthy
                    if target_state.update_available():
                        state.changed()
                pool = pool_for(host, port, *tls_for(spec, target_spec, host), settings, spec.name)
                targets.append(
                    Target(host, port, weight, pool, default_port, backup, target_state, target_spec.key)
                )
        return targets

    # -- hooks used by clusters ----------------------------------------------------------------------------
    def now(self) -> float:
        return self.loop.time() if self.loop is not None else time.monotonic()

    def eject(self, upstream: UpstreamState, state: TargetState, duration: float, reason: str) -> None:
        """Passive detection in this worker ejected a target: apply it, and tell the other workers."""
        log.warning(
            "upstream %s: target %s (%s) ejected for %.1fs: %s",
            upstream.name,
            state.name,
            state.address,
            duration,
            reason,
        )
        self._apply_ejection(upstream, state, duration, reason)
        name, address, count = state.name, state.address, state.ejections
        self.send(("upstream_ejected", upstream.name, name, address, duration, count, reason))

    def _apply_ejection(
        self, upstream: UpstreamState, state: TargetState, duration: float, reason: str
    ) -> None:
        self._cancel_timer(state)
        state.ejected = True
        state.ejected_until = self.now() + duration
        state.ejection_reason = reason
        if self.loop is not None:
            state.ejection_timer = self.loop.call_later(duration, self._ejection_over, upstream, state)
        if state.update_available():
            upstream.changed()

    def _ejection_over(self, upstream: UpstreamState, state: TargetState) -> None:
        state.ejection_timer = None
        self._restore(upstream, state)

    def _restore(self, upstream: UpstreamState, state: TargetState) -> None:
        self._cancel_timer(state)
        if not state.ejected:
            return
        state.ejected = False
        state.failures = 0
        state.last_ejection_end = self.now()
        state.ejection_reason = ""
        if state.update_available():
            upstream.changed()

    @staticmethod
    def _cancel_timer(state: TargetState) -> None:
        timer = state.ejection_timer
        if timer is not None:
            timer.cancel()
            state.ejection_timer = None

    def _drop_state(self, upstream: UpstreamState) -> None:
        for state in upstream.targets.values():
            self._cancel_timer(state)

    # -- messages from the supervisor ---------------------------------------------------------------------
    def on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "upstream_dns":
            self.on_dns(message[1], message[2], message[3])
        elif kind == "upstream_health":
            self.on_health(message[1], message[2], message[3], message[4])
        elif kind == "upstream_eject":
            self.on_eject(*message[1:])
        elif kind == "upstream_uneject":
            self.on_uneject(message[1], message[2], message[3])
        elif kind == "upstream_state":
            self.on_state(message[1], message[2], message[3])
        elif kind == "upstream_stats":
            self.send(("upstream_stats", message[1], self.stats()))

    def on_state(
        self,
        dns: dict[tuple[str, str], list[Record]],
        health: dict[TargetKey, bool],
        ejections: dict[TargetKey, tuple[float, int, str]],
    ) -> None:
        """Everything the supervisor knows, for a worker that just started (or restarted)."""
        self.resolved = dict(dns)
        self.health = dict(health)
        for (upstream, name, address), (duration, count, reason) in ejections.items():
            self.on_eject(upstream, name, address, duration, count, reason)
        for name in list(self._specs):
            self._rebuild_targets(name)

    def on_dns(self, upstream: str, target: str, records: list[Record] | None) -> None:
        key = (upstream, target)
        if records is None:
            self.resolved.pop(key, None)
        else:
            self.resolved[key] = records
        self._rebuild_targets(upstream)

    def on_health(self, upstream: str, target: str, address: str, healthy: bool) -> None:
        self.health[(upstream, target, address)] = healthy
        state = self.states.get(upstream)
        if state is None:
            return
        target_state = state.targets.get((target, address))
        if target_state is not None:
            target_state.healthy = healthy
            if target_state.update_available():
                state.changed()

    def on_eject(
        self, upstream: str, target: str, address: str, duration: float, count: int, reason: str
    ) -> None:
        """Another worker ejected a target (or a new worker learns of a running ejection)."""
        state = self.states.get(upstream) or self.upstream_state(upstream)
        target_state = state.target_state(target, address)
        target_state.ejections = max(target_state.ejections, count)
        self._apply_ejection(state, target_state, duration, reason)

    def on_uneject(self, upstream: str, target: str, address: str) -> None:
        """Active checks passed on an ejected target: back in rotation before its time is up."""
        state = self.states.get(upstream)
        target_state = state.targets.get((target, address)) if state is not None else None
        if state is not None and target_state is not None:
            self._restore(state, target_state)

    def _rebuild_targets(self, upstream: str) -> None:
        cluster = self.clusters.get(upstream)
        entry = self._specs.get(upstream)
        if cluster is None or entry is None:
            return
        spec, pool_for = entry
        cluster.set_targets(self._targets(spec, pool_for))
        used = {(t.key, t.label) for t in cluster.targets}
        for key in [k for k in cluster.upstream.targets if k not in used]:
            self._cancel_timer(cluster.upstream.targets.pop(key))
        self.on_targets_changed()

    # -- the retry budget's clock ------------------------------------------------------------------------
    def _start_ticker(self) -> None:
        if self._ticker is None and self.loop is not None:
            self._ticker = self.loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        for state in self.states.values():
            state.budget.tick()
        self._ticker = None
        self._start_ticker()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for state in self.states.values():
            self._drop_state(state)

    # -- status ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """This worker's share of the status JSON (the supervisor adds up every worker's)."""
        now = self.now()
        out: dict[str, Any] = {}
        for name, cluster in self.clusters.items():
            state = cluster.upstream
            breaker = state.breaker
            targets = {}
            for target in cluster.targets:
                ts = target.state
                targets[(target.key, target.label)] = {
                    "in_flight": ts.inflight,
                    "requests": ts.requests,
                    "failed": ts.failed,
                    "consecutive_failures": ts.failures,
                    "ejected": ts.ejected,
                    "ejection_remaining": round(max(0.0, ts.ejected_until - now), 3) if ts.ejected else 0,
                    "ejections": ts.ejections,
                    "ejection_reason": ts.ejection_reason or None,
                    "healthy": ts.healthy,
                    "response_time_ewma_ms": round(ts.ewma * 1000, 3) if ts.ewma_stamp else None,
                }
            out[name] = {
                "targets": targets,
                "active_connections": sum(p.active for p in cluster.pools),
                "idle_connections": sum(len(p.idle) for p in cluster.pools),
                "pending_requests": breaker.pending if breaker is not None else 0,
                "circuit_breaker_rejections": {
                    "max_connections": breaker.overflow_connections if breaker is not None else 0,
                    "max_pending_requests": breaker.overflow_pending if breaker is not None else 0,
                },
                "retries": state.retries,
                "retries_refused_by_budget": state.retries_refused,
                "retry_budget_left": state.budget.allowed(),
                "no_target": state.no_target,
            }
        return out
