"""A cluster: the targets of one upstream (or of one service URL) and how to pick among them.

Routes and plugins never pick hosts; they ask a cluster (Envoy's ThreadLocalCluster idea). A cluster
is rebuilt with every config snapshot; the connection pools it points at are not (they belong to the
worker), so a reload keeps warm connections.
"""

from __future__ import annotations

from typing import Any

from tollway.upstream.pool import Pool


class Target:
    __slots__ = ("current_weight", "host", "host_header", "label", "pool", "port", "weight")

    def __init__(self, host: str, port: int, weight: int, pool: Pool, default_port: int = 80) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        self.pool = pool
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        host_text = f"[{host}]" if ":" in host else host
        self.host_header = (host_text if port == default_port else f"{host_text}:{port}").encode("idna")
        self.current_weight = 0

    def __repr__(self) -> str:
        return f"<Target {self.label} weight={self.weight}>"


class Cluster:
    """Targets plus a smooth weighted round-robin pick (nginx's algorithm): with weights 5,1,1 the
    order is a a b a c a a — spread out, not bunched."""

    __slots__ = ("_single", "_total", "name", "targets")

    def __init__(self, name: str, targets: list[Target]) -> None:
        self.name = name
        self.targets = [t for t in targets if t.weight > 0]
        self._total = sum(t.weight for t in self.targets)
        self._single = self.targets[0] if len(self.targets) == 1 else None

    def __repr__(self) -> str:
        return f"<Cluster {self.name} targets={len(self.targets)}>"

    def pick(self, ctx: Any) -> Target | None:
        if self._single is not None:
            return self._single
        best = None
        for target in self.targets:
            target.current_weight += target.weight
            if best is None or target.current_weight > best.current_weight:
                best = target
        if best is not None:
            best.current_weight -= self._total
        return best

    def release(self, target: Target, ctx: Any) -> None:
        """Called when a request to `target` ends (balancers that count in-flight requests use it)."""
