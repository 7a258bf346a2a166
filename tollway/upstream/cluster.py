"""A cluster: the targets of one upstream (or of one service URL) and how to pick among them.

Routes and plugins never pick hosts; they ask a cluster (Envoy's ThreadLocalCluster idea). A cluster is
rebuilt with every config snapshot; what must outlive a rebuild — per-target state (in-flight counts,
response-time averages, passive failures, ejections, health), the retry budget and the circuit breaker —
lives in the worker's `UpstreamState` (tollway.upstream.worker_registry keeps them), and connection
pools belong to the worker too, so a reload keeps warm connections and in-flight counts.

Picking: the balancer of the primary tier picks among available primaries; only when none is available
does the backup tier's balancer pick. A retry picks the same way but never a target it already tried.

Compiled with mypyc (setup.py): `pick` and `release` run once per try.
"""

from __future__ import annotations

from typing import Any

from tollway.upstream.balancers.base import Balancer
from tollway.upstream.balancers.round_robin import RoundRobin
from tollway.upstream.outlier import Outlier
from tollway.upstream.pool import Pool
from tollway.upstream.retry import RetryBudget, RetryPolicy
from tollway.upstream.target import FAILED, NEUTRAL, OK, Target, TargetState


class Breaker:
    """Circuit breaking limits of one upstream in one worker (0 = unlimited)."""

    __slots__ = ("max_connections", "max_pending", "overflow_connections", "overflow_pending", "pending")

    def __init__(self, max_connections: int = 0, max_pending: int = 0) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.pending = 0  # requests waiting for a new connection to open
        self.overflow_connections = 0
        self.overflow_pending = 0

    def __repr__(self) -> str:
        return (
            f"<Breaker pending={self.pending} max_connections={self.max_connections} "
            f"max_pending={self.max_pending}>"
        )

    def admit(self, pools: list[Pool], pool: Pool) -> str:
        """The empty string if a new connection to `pool` may open now, else the name of the limit in the
        way. At the connection limit an idle connection to another target is closed to make room, if there
        is one."""
        if self.max_pending and self.pending >= self.max_pending:
            self.overflow_pending += 1
            return "max-pending-requests"
        if self.max_connections:
            open_now = self.pending
            for p in pools:
                open_now += p.active + len(p.idle)
            if open_now >= self.max_connections:
                for p in pools:
                    if p is not pool and p.evict_one():
                        return ""
                if pool.evict_one():
                    return ""
                self.overflow_connections += 1
                return "max-connections"
        return ""


class UpstreamState:
    """One upstream in one worker: target states and counters that outlive config rebuilds.
    `generation` changes whenever a target's availability changes; clusters refresh on the next pick."""

    __slots__ = (
        "breaker",
        "budget",
        "generation",
        "hooks",
        "name",
        "no_target",
        "retries",
        "retries_refused",
        "targets",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 0
        self.targets: dict[tuple[str, str], TargetState] = {}  # (target name, address) -> state
        self.budget = RetryBudget()
        self.breaker: Breaker | None = None
        self.hooks: Any = None  # the worker's registry: ejection timers and messages (None in unit tests)
        self.retries = 0
        self.retries_refused = 0  # retries the budget refused
        self.no_target = 0  # requests answered 503 for want of an available target

    def __repr__(self) -> str:
        return f"<UpstreamState {self.name} targets={len(self.targets)} generation={self.generation}>"

    def target_state(self, name: str, address: str) -> TargetState:
        key = (name, address)
        state = self.targets.get(key)
        if state is None:
            state = self.targets[key] = TargetState(self.name, name, address)
        return state

    def changed(self) -> None:
        self.generation += 1


class Cluster:
    __slots__ = (
        "_backup",
        "_generation",
        "_primary",
        "_single",
        "_wants_release",
        "backups",
        "breaker",
        "name",
        "outlier",
        "pools",
        "primaries",
        "retry",
        "targets",
        "upstream",
    )

    def __init__(
        self,
        name: str,
        targets: list[Target],
        upstream: UpstreamState | None = None,
        balancer: Balancer | None = None,
        backup_balancer: Balancer | None = None,
        retry: RetryPolicy | None = None,
        outlier: Outlier | None = None,
    ) -> None:
        self.name = name
        self.upstream = upstream if upstream is not None else UpstreamState(name)
        self._primary: Balancer = balancer if balancer is not None else RoundRobin()
        self._backup: Balancer = backup_balancer if backup_balancer is not None else RoundRobin()
        self._wants_release = self._primary.wants_release
        self.retry = retry if retry is not None else RetryPolicy()
        self.outlier = outlier
        self.breaker = self.upstream.breaker
        self.targets: list[Target] = []
        self.primaries: list[Target] = []
        self.backups: list[Target] = []
        self.pools: list[Pool] = []
        self._single: Target | None = None
        self._generation = -1
        self.set_targets(targets)

    def __repr__(self) -> str:
        return f"<Cluster {self.name} targets={len(self.targets)}>"

    def set_targets(self, targets: list[Target]) -> None:
        """A new target set (config build, DNS change); balancers are rebuilt, states are kept."""
        targets = [t for t in targets if t.weight > 0]
        self.targets = targets
        self.primaries = [t for t in targets if not t.backup]
        self.backups = [t for t in targets if t.backup]
        pools: list[Pool] = []
        for target in targets:
            if target.pool not in pools:
                pools.append(target.pool)
        self.pools = pools
        self._primary.build(self.primaries)
        self._backup.build(self.backups)
        self.refresh()

    def refresh(self) -> None:
        """Availability changed somewhere: give the balancers the targets that may take traffic."""
        self._generation = self.upstream.generation
        live = [t for t in self.primaries if t.state.available]
        self._primary.reset(live)
        self._backup.reset([t for t in self.backups if t.state.available])
        self._single = live[0] if len(live) == 1 else None

    # -- per request -----------------------------------------------------------------------------------
    def pick(self, ctx: Any) -> Target | None:
        """The target for a request's first try, or None when no target is available."""
        upstream = self.upstream
        if self._generation != upstream.generation:
            self.refresh()
        target = self._single
        if target is None:
            target = self._primary.pick(ctx, None)
            if target is None:
                target = self._backup.pick(ctx, None)
                if target is None:
                    upstream.no_target += 1
                    return None
        state = target.state
        state.inflight += 1
        state.requests += 1
        upstream.budget.requests += 1
        return target

    def pick_retry(self, ctx: Any, tried: list[Target]) -> Target | None:
        """A target for a retry: available, and not one of `tried`."""
        if self._generation != self.upstream.generation:
            self.refresh()
        target = self._primary.pick(ctx, tried)
        if target is None:
            target = self._backup.pick(ctx, tried)
            if target is None:
                return None
        state = target.state
        state.inflight += 1
        state.requests += 1
        return target

    def release(self, target: Target, ctx: Any, outcome: int, latency: float) -> None:
        """A try on `target` ended: OK, FAILED or NEUTRAL (see tollway.upstream.target); latency is the
        time to the response head in seconds, or -1."""
        state = target.state
        state.inflight -= 1
        if outcome == OK:
            if state.failures:
                state.failures = 0
        elif outcome == FAILED:
            state.failures += 1
            state.failed += 1
            outlier = self.outlier
            if outlier is not None and state.failures >= outlier.threshold and not state.ejected:
                self._maybe_eject(outlier, target)
        if self._wants_release:
            self._primary.release(target, ctx, outcome, latency)

    def failure_status(self, status: int) -> bool:
        """Whether passive health counts this backend status as a failure."""
        outlier = self.outlier
        return outlier is not None and outlier.failure_status(status)

    # -- ejection ----------------------------------------------------------------------------------------
    def _maybe_eject(self, outlier: Outlier, target: Target) -> None:
        hooks = self.upstream.hooks
        if hooks is None or not outlier.may_eject(self.targets, target):
            return
        duration = outlier.ejection_time(target, hooks.now())
        reason = f"{target.state.failures} consecutive failures"
        hooks.eject(self.upstream, target.state, duration, reason)


__all__ = ["FAILED", "NEUTRAL", "OK", "Breaker", "Cluster", "Target", "TargetState", "UpstreamState"]
