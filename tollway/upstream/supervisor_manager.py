"""The supervisor's side of upstreams: DNS resolution, active health checks, shared ejections, and the
status JSON — the control plane that workers' clusters follow (tollway.upstream.worker_registry is the
other end).

- DNS: one background loop per hostname (or SRV) target; answers go to every worker as target sets.
- Active checks: one probe loop per checked target address, once per node; verdicts go to every worker.
- Ejections: when one worker's passive detection ejects a target, the others are told at once, so a
  dead target stops getting traffic from the whole node, not just from the worker that saw it fail.
- Status: ``/upstreams`` on the status listener merges the supervisor's own knowledge (health, DNS,
  ejections) with every worker's counters (in-flight, failures, retries, connections) collected over the
  channel — the same answer whichever worker a client's request would have reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tollway.config.types import parse_hostport
from tollway.counters import metrics
from tollway.upstream.supervisor_health import CheckResult, CheckState, probe
from tollway.upstream.worker_registry import Record, TargetKey, address_label, is_ip, target_records

if TYPE_CHECKING:
    from tollway.config.schema import ActiveHealthcheck, GatewayConfig, Upstream, UpstreamDns
    from tollway.config.schema import Target as TargetSpec
    from tollway.upstream.supervisor_dns import Resolver

log = logging.getLogger("tollway.upstream")
Message = tuple[Any, ...]
_STATS_TIMEOUT = 1.0
_FIRST_DNS_TIMEOUT_EXTRA = 0.5


@dataclass
class Ejection:
    until: float  # time.monotonic()
    count: int
    reason: str
    time: float  # wall clock, when it started
    successes: int = 0  # active probes passed since the ejection


class UpstreamManager:
    def __init__(
        self,
        broadcast: Callable[[Message, int | None], None],
        channels: Callable[[], list[Any]],
    ) -> None:
        self._broadcast = broadcast  # (message, slot to skip or None)
        self._channels = channels  # live worker channels
        self.config: GatewayConfig | None = None
        self.upstreams: dict[str, Upstream] = {}
        self.resolver: Resolver | None = None
        self.resolved: dict[tuple[str, str], list[Record]] = {}  # (upstream, target name) -> addresses
        self.dns_info: dict[tuple[str, str], dict[str, Any]] = {}
        self.checks: dict[TargetKey, CheckState] = {}
        self.ejections: dict[TargetKey, Ejection] = {}
        self._check_tasks: dict[TargetKey, tuple[asyncio.Task[None], tuple[Any, ...]]] = {}
        self._dns_tasks: dict[tuple[str, str], tuple[asyncio.Task[None], tuple[Any, ...]]] = {}
        self._dns_first: dict[tuple[str, str], asyncio.Event] = {}
        self._stats: dict[int, tuple[asyncio.Future[None], int, list[dict[str, Any]]]] = {}
        self._token = 0
        self._running = False

    def __repr__(self) -> str:
        return (
            f"<UpstreamManager upstreams={len(self.upstreams)} checks={len(self._check_tasks)} "
            f"dns={len(self._dns_tasks)} ejections={len(self.ejections)}>"
        )

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self, config: GatewayConfig) -> None:
        """Start checks and DNS; waits (bounded) for first DNS answers so workers start with addresses."""
        self._running = True
        self.config = config
        self.upstreams = {u.name: u for u in config.upstreams}
        self._sync_dns()
        waits = [event.wait() for event in self._dns_first.values()]
        if waits:
            timeout = config.gateway.dns.timeout * 2 + _FIRST_DNS_TIMEOUT_EXTRA
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits)
        self._sync_checks()

    def apply(self, config: GatewayConfig) -> None:
        """A (new) config: start, restart or stop DNS loops and probes to match it."""
        self.config = config
        self.upstreams = {u.name: u for u in config.upstreams}
        if self._running:
            self._sync_dns()
            self._sync_checks()

    async def stop(self) -> None:
        self._running = False
        tasks = [t for t, _ in self._check_tasks.values()] + [t for t, _ in self._dns_tasks.values()]
        for task in tasks:
            task.cancel()
        self._check_tasks.clear()
        self._dns_tasks.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    def state_message(self) -> Message:
        """Everything a starting worker must know before its first config."""
        now = time.monotonic()
        health = {key: state.healthy for key, state in self.checks.items()}
        ejections = {
            key: (e.until - now, e.count, e.reason) for key, e in self.ejections.items() if e.until > now
        }
        return ("upstream_state", dict(self.resolved), health, ejections)

    def on_worker_message(self, slot: int, message: Message) -> None:
        kind = message[0]
        if kind == "upstream_ejected":
            self._on_ejected(slot, *message[1:])
        elif kind == "upstream_stats":
            self._on_stats(message[1], message[2])

    # -- ejections ------------------------------------------------------------------------------------------
    def _on_ejected(
        self, slot: int, upstream: str, name: str, address: str, duration: float, count: int, reason: str
    ) -> None:
        key = (upstream, name, address)
        self.ejections[key] = Ejection(time.monotonic() + duration, count, reason, time.time())
        metrics.count("upstream_ejections_total", upstream=upstream, target=name, address=address)
        self._broadcast(("upstream_eject", upstream, name, address, duration, count, reason), slot)

    def ejection(self, key: TargetKey) -> Ejection | None:
        ejection = self.ejections.get(key)
        if ejection is not None and ejection.until <= time.monotonic():
            del self.ejections[key]
            return None
        return ejection

    # -- active health checks ------------------------------------------------------------------------------
    def _sync_checks(self) -> None:
        desired: dict[TargetKey, tuple[Any, ...]] = {}
        for upstream in self.upstreams.values():
            active = upstream.healthchecks.active
            if active is None:
                continue
            for spec in upstream.targets:
                probe_host = _probe_host(spec)
                for host, port, _, _ in self._records(upstream.name, spec):
                    key = (upstream.name, spec.key, address_label(host, port))
                    if not probe_host:
                        default_host = address_label(host, port)
                    else:
                        default_host = probe_host if port == 80 else f"{probe_host}:{port}"
                    desired[key] = (host, port, active, default_host)
        for key, (task, signature) in list(self._check_tasks.items()):
            if desired.get(key) != signature:
                task.cancel()
                del self._check_tasks[key]
        for key in [k for k in self.checks if k not in desired]:
            state = self.checks.pop(key)
            if not state.healthy:  # checks turned off: the target is no longer held unhealthy
                self._broadcast(("upstream_health", *key, True), None)
        for key, signature in desired.items():
            if key not in self._check_tasks:
                task = asyncio.get_running_loop().create_task(self._check_loop(key, *signature))
                self._check_tasks[key] = (task, signature)

    async def _check_loop(
        self, key: TargetKey, host: str, port: int, settings: ActiveHealthcheck, default_host: str
    ) -> None:
        state = self.checks.setdefault(key, CheckState())
        while True:
            result = await probe(host, port, settings, default_host)
            self.record_check(key, state, result, settings)
            await asyncio.sleep(state.next_interval(settings, self.ejection(key) is not None))

    def record_check(
        self, key: TargetKey, state: CheckState, result: CheckResult, settings: ActiveHealthcheck
    ) -> None:
        upstream, name, address = key
        change = state.record(result, settings.healthy_threshold, settings.unhealthy_threshold)
        if change is False:
            log.warning(
                "upstream %s: target %s (%s) is unhealthy after %d failed checks: %s",
                upstream,
                name,
                address,
                state.failures,
                result.describe(),
            )
        elif change is True:
            log.warning("upstream %s: target %s (%s) is healthy again", upstream, name, address)
        if change is not None:
            self._broadcast(("upstream_health", upstream, name, address, change), None)
        ejection = self.ejection(key)
        if ejection is None:
            return
        if result.ok:
            ejection.successes += 1
            if ejection.successes >= settings.healthy_threshold and state.healthy:
                del self.ejections[key]
                log.warning("upstream %s: %s (%s) passes its checks: ejection over", upstream, name, address)
                self._broadcast(("upstream_uneject", upstream, name, address), None)
        elif not result.ok:
            ejection.successes = 0

    def health(self, key: TargetKey) -> bool | None:
        state = self.checks.get(key)
        return state.healthy if state is not None else None

    # -- DNS -----------------------------------------------------------------------------------------------
    def _records(self, upstream: str, spec: TargetSpec) -> list[Record]:
        return target_records(spec, self.resolved.get((upstream, spec.key)))

    def _sync_dns(self) -> None:
        assert self.config is not None
        desired: dict[tuple[str, str], tuple[Any, ...]] = {}
        for upstream in self.upstreams.values():
            for spec in upstream.targets:
                if spec.srv or not is_ip(parse_hostport(spec.target)[0]):
                    desired[(upstream.name, spec.key)] = (spec.target, spec.srv, upstream.dns)
        for key, (task, signature) in list(self._dns_tasks.items()):
            if desired.get(key) != signature:
                task.cancel()
                del self._dns_tasks[key]
                self._dns_first.pop(key, None)
                if self.resolved.pop(key, None) is not None:
                    self._broadcast(("upstream_dns", *key, None), None)
                self.dns_info.pop(key, None)
        if desired and (self.resolver is None or self.resolver.settings != self.config.gateway.dns):
            from tollway.upstream.supervisor_dns import Resolver

            self.resolver = Resolver(self.config.gateway.dns)
        for key, signature in desired.items():
            if key not in self._dns_tasks:
                first = self._dns_first[key] = asyncio.Event()
                target, srv, options = signature
                task = asyncio.get_running_loop().create_task(
                    self._dns_loop(key, target, srv, options, first)
                )
                self._dns_tasks[key] = (task, signature)

    async def _dns_loop(
        self, key: tuple[str, str], target: str, srv: bool, options: UpstreamDns, first: asyncio.Event
    ) -> None:
        last_error = None
        while True:
            resolver = self.resolver
            assert resolver is not None
            try:
                records, ttl = await self.resolve(resolver, target, srv, options)
            except Exception as exc:  # ResolveError, or a resolver bug: either way the last set stays
                error = str(exc) or type(exc).__name__
                kept = len(self.resolved.get(key, ()))
                if error != last_error:
                    log.warning(
                        "upstream %s: resolving %s failed (%s); keeping the last good set (%d addresses)",
                        key[0],
                        target,
                        error,
                        kept,
                    )
                last_error = error
                self.dns_info[key] = {**self.dns_info.get(key, {}), "error": error, "failed_at": time.time()}
                delay = options.error_ttl
            else:
                last_error = None
                self._dns_answer(key, target, records, ttl)
                delay = min(options.max_ttl, max(options.min_ttl, ttl))
            first.set()
            await asyncio.sleep(delay)

    @staticmethod
    async def resolve(
        resolver: Resolver, target: str, srv: bool, options: UpstreamDns
    ) -> tuple[list[Record], float]:
        from tollway.upstream.supervisor_dns import ResolveError

        types = list(options.record_types)
        if srv:
            services = await resolver.services(target, types)
            if not services:
                raise ResolveError(f"{target}: no usable SRV records")
            top = min(s.priority for s in services)
            records = [(s.ip, s.port, max(1, s.weight), s.priority > top) for s in services]
            ttl = min(s.ttl for s in services)
        else:
            host, port = parse_hostport(target)
            addresses = await resolver.addresses(host, types)
            if not addresses:
                raise ResolveError(f"{host}: empty answer")
            records = [(a.ip, port, -1, False) for a in addresses]
            ttl = min(a.ttl for a in addresses)
        return sorted(set(records)), ttl

    def _dns_answer(self, key: tuple[str, str], target: str, records: list[Record], ttl: float) -> None:
        self.dns_info[key] = {"error": None, "resolved_at": time.time(), "ttl": ttl}
        if self.resolved.get(key) == records:
            return
        self.resolved[key] = records
        addresses = ", ".join(address_label(h, p) for h, p, _, _ in records)
        log.info("upstream %s: %s resolved to %s", key[0], target, addresses)
        self._broadcast(("upstream_dns", key[0], key[1], records), None)
        self._sync_checks()

    # -- status --------------------------------------------------------------------------------------------
    async def collect(self) -> list[dict[str, Any]]:
        """Every live worker's counters (those that answer within a second)."""
        channels = self._channels()
        if not channels:
            return []
        self._token += 1
        token = self._token
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        results: list[dict[str, Any]] = []
        self._stats[token] = (future, len(channels), results)
        for channel in channels:
            channel.send(("upstream_stats", token))
        try:
            async with asyncio.timeout(_STATS_TIMEOUT):
                await future
        except TimeoutError:
            pass
        finally:
            self._stats.pop(token, None)
        return results

    def _on_stats(self, token: int, data: dict[str, Any]) -> None:
        entry = self._stats.get(token)
        if entry is None:
            return
        future, expected, results = entry
        results.append(data)
        if len(results) >= expected and not future.done():
            future.set_result(None)

    async def status_json(self) -> dict[str, Any]:
        stats = await self.collect()
        return {
            "upstreams": [self._upstream_json(u, stats) for u in self.upstreams.values()],
            "workers_reporting": len(stats),
        }

    def target_states(self) -> list[tuple[str, str, str, str]]:
        """(upstream, target, address, state) of every target; state is healthy, unhealthy or ejected
        (tollway_upstream_target_health)."""
        out = []
        for upstream in self.upstreams.values():
            for key in self._target_keys(upstream):
                ejected = self.ejection(key) is not None
                state = "unhealthy" if self.health(key) is False else "ejected" if ejected else "healthy"
                out.append((*key, state))
        return out

    def summary(self) -> dict[str, Any]:
        """Per upstream: targets, and how many are available, unhealthy, ejected (for /status)."""
        out = {}
        for upstream in self.upstreams.values():
            total = unhealthy = ejected = 0
            for key in self._target_keys(upstream):
                total += 1
                if self.health(key) is False:
                    unhealthy += 1
                elif self.ejection(key) is not None:
                    ejected += 1
            out[upstream.name] = {
                "targets": total,
                "available": total - unhealthy - ejected,
                "unhealthy": unhealthy,
                "ejected": ejected,
            }
        return out

    def _target_keys(self, upstream: Upstream) -> list[TargetKey]:
        return [
            (upstream.name, spec.key, address_label(host, port))
            for spec in upstream.targets
            for host, port, _, _ in self._records(upstream.name, spec)
        ]

    def _upstream_json(self, upstream: Upstream, stats: list[dict[str, Any]]) -> dict[str, Any]:
        mine = [s[upstream.name] for s in stats if upstream.name in s]
        targets = []
        for spec in upstream.targets:
            for host, port, weight, backup in self._records(upstream.name, spec):
                targets.append(self._target_json(upstream, spec, host, port, weight, backup, mine))
        limits = upstream.circuit_breaker
        available = sum(1 for t in targets if t["available"])
        body: dict[str, Any] = {
            "name": upstream.name,
            "algorithm": upstream.algorithm,
            "available_targets": available,
            "total_targets": len(targets),
            "targets": targets,
            "active_checks": upstream.healthchecks.active is not None,
            "passive_checks": upstream.healthchecks.passive.enabled,
            "connections": {
                "active": sum(s["active_connections"] for s in mine),
                "idle": sum(s["idle_connections"] for s in mine),
                "pending_requests": sum(s["pending_requests"] for s in mine),
            },
            "circuit_breaker": {
                "max_connections": limits.max_connections,
                "max_pending_requests": limits.max_pending_requests,
                "rejected": {
                    "max_connections": sum(s["circuit_breaker_rejections"]["max_connections"] for s in mine),
                    "max_pending_requests": sum(
                        s["circuit_breaker_rejections"]["max_pending_requests"] for s in mine
                    ),
                },
            },
            "retries": {
                "retried": sum(s["retries"] for s in mine),
                "refused_by_budget": sum(s["retries_refused_by_budget"] for s in mine),
                "budget_left": sum(s["retry_budget_left"] for s in mine),
            },
            "no_target": sum(s["no_target"] for s in mine),
        }
        if upstream.algorithm == "consistent-hashing":
            body["hash_on"] = upstream.hash_on
            body["hash_key"] = upstream.hash_key
        dns = {
            spec.key: self.dns_info[(upstream.name, spec.key)]
            for spec in upstream.targets
            if (upstream.name, spec.key) in self.dns_info
        }
        if dns:
            body["dns"] = dns
        return body

    def _target_json(
        self,
        upstream: Upstream,
        spec: TargetSpec,
        host: str,
        port: int,
        weight: int,
        backup: bool,
        stats: list[dict[str, Any]],
    ) -> dict[str, Any]:
        address = address_label(host, port)
        key = (upstream.name, spec.key, address)
        counters = [s["targets"][(spec.key, address)] for s in stats if (spec.key, address) in s["targets"]]
        check = self.checks.get(key)
        ejection = self.ejection(key)
        if ejection is None:  # a worker's own ejection the supervisor has not heard of yet
            worker_ejected = [c for c in counters if c["ejected"]]
            if worker_ejected:
                longest = max(worker_ejected, key=lambda c: c["ejection_remaining"])
                ejection = Ejection(
                    time.monotonic() + longest["ejection_remaining"],
                    longest["ejections"],
                    longest["ejection_reason"] or "",
                    time.time(),
                )
        healthy = check.healthy if check is not None else None
        state = "unhealthy" if healthy is False else "ejected" if ejection is not None else "healthy"
        ewmas = [c["response_time_ewma_ms"] for c in counters if c["response_time_ewma_ms"] is not None]
        return {
            "target": spec.key,
            "address": address,
            "weight": weight if weight >= 0 else spec.weight,
            "backup": backup,
            "state": state,
            "available": state == "healthy",
            "health": None
            if check is None
            else {
                "healthy": check.healthy,
                "consecutive_successes": check.successes,
                "consecutive_failures": check.failures,
                "last_check": check.last.as_json() if check.last is not None else None,
            },
            "ejection": None
            if ejection is None
            else {
                "reason": ejection.reason,
                "remaining_seconds": round(max(0.0, ejection.until - time.monotonic()), 3),
                "count": ejection.count,
            },
            "in_flight": sum(c["in_flight"] for c in counters),
            "requests": sum(c["requests"] for c in counters),
            "failed": sum(c["failed"] for c in counters),
            "consecutive_failures": max((c["consecutive_failures"] for c in counters), default=0),
            "response_time_ewma_ms": round(sum(ewmas) / len(ewmas), 3) if ewmas else None,
        }


def _probe_host(spec: TargetSpec) -> str:
    """The Host header of a probe: the target's name as configured (its IP when it is one)."""
    if spec.srv:
        return ""
    host, _ = parse_hostport(spec.target)
    return f"[{host}]" if ":" in host else host
