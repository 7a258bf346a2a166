"""A target (one backend address of a cluster) and the state a worker keeps about it.

A `Target` belongs to one config snapshot: its weight, its backup flag and its pool. Its `TargetState`
belongs to the worker and outlives config rebuilds: in-flight count, response-time average, passive
failures and ejection, active health. APISIX's least_conn.lua explains why: a balancer rebuilt with
fresh counters while requests are in flight would send the next burst to the busiest target. States are
keyed by (upstream name, target name, address), so a rebuild that keeps a target keeps its state.

Compiled with mypyc (setup.py): picking and releasing read and write these fields natively.
"""

from __future__ import annotations

from typing import Any, Final

from tollway.upstream.pool import Pool

# How a try ended, as reported to `Cluster.release`.
OK: Final = 0  # a response that is not a failure status
FAILED: Final = 1  # connect failure, reset, timeout, or a status counted as a failure
NEUTRAL: Final = 2  # neither: the client went away, a plugin answered, a circuit breaker refused


class TargetState:
    __slots__ = (
        "address",
        "available",
        "ejected",
        "ejected_until",
        "ejection_reason",
        "ejection_timer",
        "ejections",
        "ewma",
        "ewma_stamp",
        "failed",
        "failures",
        "healthy",
        "inflight",
        "last_ejection_end",
        "name",
        "requests",
        "upstream",
    )

    def __init__(self, upstream: str, name: str, address: str) -> None:
        self.upstream = upstream
        self.name = name
        self.address = address
        self.inflight = 0
        self.requests = 0  # tries sent to this target (status counter)
        self.failed = 0  # tries that failed (status counter)
        self.healthy = True  # the active health checks' verdict (from the supervisor)
        self.ejected = False  # passive detection's verdict (this worker's or another's)
        self.available = True  # healthy and not ejected: the one flag picking reads
        self.failures = 0  # consecutive failed tries
        self.ejections = 0  # repeat offences: the n-th ejection lasts n * base time
        self.ejected_until = 0.0  # loop time
        self.last_ejection_end = 0.0
        self.ejection_reason = ""
        self.ejection_timer: Any = None
        self.ewma = 0.0  # response time average, seconds (the latency balancer)
        self.ewma_stamp = 0.0

    def __repr__(self) -> str:
        flags = "available" if self.available else ("ejected" if self.ejected else "unhealthy")
        return (
            f"<TargetState {self.upstream}/{self.name} {self.address} {flags} "
            f"inflight={self.inflight} failures={self.failures}>"
        )

    def update_available(self) -> bool:
        """Recompute `available`; True if it changed."""
        available = self.healthy and not self.ejected
        if available == self.available:
            return False
        self.available = available
        return True


class Target:
    __slots__ = (
        "backup",
        "current_weight",
        "host",
        "host_header",
        "host_line",
        "key",
        "label",
        "pool",
        "port",
        "state",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        weight: int,
        pool: Pool,
        default_port: int = 80,
        backup: bool = False,
        state: TargetState | None = None,
        key: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        self.pool = pool
        self.backup = backup
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.key = key or self.label  # the target's name in config and status (stable across DNS changes)
        host_text = f"[{host}]" if ":" in host else host
        self.host_header = (host_text if port == default_port else f"{host_text}:{port}").encode("idna")
        # The end of the request line and the Host line, as most services send them: built once here
        # rather than from three pieces on every request (tollway.proxy.exchange).
        self.host_line = b" HTTP/1.1\r\nHost: " + self.host_header + b"\r\n"
        self.current_weight = 0  # smooth weighted round-robin
        self.state: TargetState = state if state is not None else TargetState("", self.key, self.label)

    def __repr__(self) -> str:
        backup = " backup" if self.backup else ""
        return f"<Target {self.label} weight={self.weight}{backup}>"
