"""Passive health (outlier detection): targets that fail on live traffic are ejected for a while.

Consecutive failed tries — connect failures, resets, timeouts, or statuses listed in
`healthchecks.passive.statuses` — are counted per target by the worker that sees them (`Cluster.release`);
at `consecutive_failures` the target is ejected, unless that would eject more than
`max_ejection_percent` of the upstream's targets (at least one may always go) or leave the upstream with
no target to send to. The n-th ejection in a row lasts n * `base_ejection_time`, up to
`max_ejection_time`; every base period spent back in rotation forgives one offence. An ejection ends when
its time is up, or earlier when active health checks see the target pass `healthy_threshold` probes.

The worker that ejects tells the supervisor, which tells every other worker: all of a node's workers stop
sending to a dead target at once (tollway.upstream.worker_registry, tollway.upstream.supervisor_manager).
"""

from __future__ import annotations

from tollway.upstream.target import Target

_NO_STATUS = 1000


class Outlier:
    __slots__ = ("base_time", "max_percent", "max_time", "status_min", "statuses", "threshold")

    def __init__(
        self,
        threshold: int = 5,
        statuses: frozenset[int] = frozenset({500, 502, 503, 504}),
        base_time: float = 30.0,
        max_time: float = 300.0,
        max_percent: int = 50,
    ) -> None:
        self.threshold = threshold
        self.statuses = statuses
        self.status_min = min(statuses) if statuses else _NO_STATUS
        self.base_time = base_time
        self.max_time = max_time
        self.max_percent = max_percent

    def __repr__(self) -> str:
        return f"<Outlier after {self.threshold} failures, {self.base_time}s..{self.max_time}s>"

    def failure_status(self, status: int) -> bool:
        return status >= self.status_min and status in self.statuses

    def may_eject(self, targets: list[Target], target: Target) -> bool:
        """Whether ejecting `target` stays within the cap and leaves something to send to."""
        if self.max_percent <= 0 or target.state.ejected:
            return False
        ejected = 0
        others_available = False
        for other in targets:
            if other.state.ejected:
                ejected += 1
            elif other is not target and other.state.available:
                others_available = True
        cap = max(1, len(targets) * self.max_percent // 100)
        return others_available and ejected < cap

    def ejection_time(self, target: Target, now: float) -> float:
        """The duration of a new ejection of `target`, counting it as an offence."""
        state = target.state
        offences = state.ejections
        if offences and state.last_ejection_end:
            forgiven = int(max(0.0, now - state.last_ejection_end) / self.base_time)
            offences = max(0, offences - forgiven)
        offences += 1
        state.ejections = offences
        return min(self.max_time, self.base_time * offences)
