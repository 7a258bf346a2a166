"""Metrics inside a process: plain counters and fixed-bucket histograms, merged by the supervisor.

Each worker counts in plain Python objects (an integer add per counter, a short bucket scan per
histogram: tens of nanoseconds, against a microsecond for prometheus_client and three in its
multiprocess mode). When /metrics is scraped, the supervisor asks every worker for `snapshot()` over
its channel and merges them (tollway.observability.supervisor_side), so one scrape shows every worker.

Two kinds of users:

- The request path (tollway.observability.recorder) uses `RouteMetrics`: one object per (service,
  route) holding request counts by method and status, three latency histograms and byte counts.
- Every other feature reports through the generic API, one call each, with labels that come from
  config entities only (never raw paths, client addresses or consumer ids):

      from tollway.counters import metrics
      metrics.count("auth_failures_total", plugin="key-auth", route=route_name)   # +1, looked up by labels
      failures = metrics.counter("auth_failures_total", plugin="key-auth", route=route_name)  # a handle,
      failures.inc()                                                             # made once per config
      metrics.gauge("upstream_target_health", upstream=u, target=t, state="healthy").set(1)
      metrics.histogram("redis_call_seconds", plugin="rate-limiting").observe(0.0012)

  Names have no ``tollway_`` prefix (it is added on exposition) and are declared in
  tollway.counters.catalog (type, help, label names); an undeclared name is declared by its
  first use. A metric name holds at most `max_series` label sets; later ones share the label value
  "other", so a label fed by mistake from request data cannot blow up memory or a scrape.

The same module-level registry exists in the supervisor, for what it measures itself (active health
checks): its numbers are merged with the workers'.

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

from typing import Any, Final

from tollway.counters.catalog import CATALOG

METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other")
OTHER_METHOD: Final = 7
METHOD_INDEX: Final = {m.encode(): i for i, m in enumerate(METHODS[:OTHER_METHOD])}
# Request counts are keyed by method index * 1000 + status class (1-5) or status code.
KEY_STRIDE: Final = 1000

DEFAULT_BUCKETS: Final = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
GAUGE_MERGE: Final = ("sum", "max", "min")


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def __repr__(self) -> str:
        return f"<Counter {self.value}>"

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Gauge:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def __repr__(self) -> str:
        return f"<Gauge {self.value}>"

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Histogram:
    """Counts per bucket (not cumulative: the exposition adds them up) plus the sum.

    Each bucket is a `Counter` rather than an int in a list: a compiled native int attribute is
    incremented in place, where a list item would allocate a new int object at every count."""

    __slots__ = ("bounds", "cells", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.cells = [Counter() for _ in range(len(bounds) + 1)]  # the last one is +Inf
        self.sum = 0.0

    def __repr__(self) -> str:
        return f"<Histogram count={sum(self.counts)} sum={self.sum:.6f}>"

    @property
    def counts(self) -> list[int]:
        return [cell.value for cell in self.cells]

    def observe(self, value: float) -> None:
        bounds = self.bounds
        n = len(bounds)
        i = 0
        while i < n and value > bounds[i]:  # most values land in the first few buckets
            i += 1
        self.cells[i].value += 1
        self.sum += value

    def data(self) -> tuple[list[int], float]:
        return self.counts, self.sum


class RouteMetrics:
    """Everything the request path counts for one (service, route)."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "gateway", "requests", "route", "service", "upstream")

    def __init__(self, service: str, route: str, buckets: list[float], gateway_buckets: list[float]) -> None:
        self.service = service
        self.route = route
        self.requests: dict[int, Counter] = {}  # by status_key()
        self.duration = Histogram(buckets)
        self.upstream = Histogram(buckets)
        self.gateway = Histogram(gateway_buckets)
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<RouteMetrics {self.service}/{self.route} requests={sum(self.counts().values())}>"

    def record(
        self, key: int, total: float, upstream: float, gateway: float, bytes_in: int, bytes_out: int
    ) -> None:
        counter = self.requests.get(key)
        if counter is None:
            counter = self.requests[key] = Counter()
        counter.value += 1
        self.duration.observe(total)
        if upstream >= 0.0:
            self.upstream.observe(upstream)
        self.gateway.observe(gateway)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def counts(self) -> dict[int, int]:
        return {key: counter.value for key, counter in self.requests.items()}

    def data(self) -> tuple[Any, ...]:
        return (
            self.counts(),
            self.duration.data(),
            self.upstream.data(),
            self.gateway.data(),
            self.bytes_in,
            self.bytes_out,
        )


class Family:
    """One metric name: its type, help, label names and a handle per label set."""

    __slots__ = ("buckets", "help", "kind", "labels", "max_series", "merge", "name", "series")

    def __init__(
        self,
        name: str,
        kind: str,
        help_text: str,
        labels: tuple[str, ...],
        buckets: list[float],
        merge: str,
        max_series: int,
    ) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.labels = labels
        self.buckets = buckets
        self.merge = merge
        self.max_series = max_series
        self.series: dict[tuple[str, ...], Any] = {}

    def __repr__(self) -> str:
        return f"<Family {self.kind} {self.name} series={len(self.series)}>"

    def handle(self, values: tuple[str, ...]) -> Any:
        found = self.series.get(values)
        if found is not None:
            return found
        if len(self.series) >= self.max_series:
            values = tuple("other" for _ in self.labels)
            found = self.series.get(values)
            if found is not None:
                return found
        kind = self.kind
        made: Any
        if kind == "counter":
            made = Counter()
        elif kind == "gauge":
            made = Gauge()
        else:
            made = Histogram(self.buckets)
        self.series[values] = made
        return made

    def data(self) -> dict[tuple[str, ...], Any]:
        if self.kind == "histogram":
            return {k: h.data() for k, h in self.series.items()}
        return {k: h.value for k, h in self.series.items()}


class Registry:
    """A process's metrics. Workers and the supervisor each have one (`REGISTRY`)."""

    __slots__ = ("families", "gateway_buckets", "latency_buckets", "max_series", "routes", "unrouted")

    def __init__(self, max_series: int = 5000) -> None:
        self.families: dict[str, Family] = {}
        self.routes: dict[tuple[str, str], RouteMetrics] = {}
        self.max_series = max_series
        self.latency_buckets: list[float] = []
        self.gateway_buckets: list[float] = []
        self.unrouted: RouteMetrics | None = None

    def __repr__(self) -> str:
        return f"<Registry families={len(self.families)} routes={len(self.routes)}>"

    # -- request metrics ----------------------------------------------------------------------------------
    def configure(self, latency_buckets: list[float], gateway_buckets: list[float], max_series: int) -> None:
        """Buckets are fixed by the first config a process sees: merged histograms need one layout."""
        if not self.latency_buckets:
            self.latency_buckets = list(latency_buckets)
            self.gateway_buckets = list(gateway_buckets)
        self.max_series = max_series

    def route(self, service: str, route: str) -> RouteMetrics:
        key = (service, route)
        found = self.routes.get(key)
        if found is None:
            found = RouteMetrics(service, route, self.latency_buckets, self.gateway_buckets)
            self.routes[key] = found
        return found

    def unrouted_metrics(self) -> RouteMetrics:
        """Requests answered before a route matched (404, 405, bad requests): empty labels."""
        found = self.unrouted
        if found is None:
            found = self.unrouted = self.route("", "")
        return found

    # -- the generic API ---------------------------------------------------------------------------------
    def family(
        self,
        name: str,
        kind: str,
        labels: tuple[str, ...] = (),
        help_text: str = "",
        buckets: list[float] | None = None,
        merge: str = "sum",
    ) -> Family:
        """Declare (or find) a metric name. Catalogue entries supply what the call leaves out."""
        family = self.families.get(name)
        if family is not None:
            if family.kind != kind:
                raise ValueError(f"metric {name!r} is a {family.kind}, not a {kind}")
            return family
        entry = CATALOG.get(name)
        if entry is not None:
            if entry.kind != kind:
                raise ValueError(f"metric {name!r} is declared as a {entry.kind}, not a {kind}")
            if labels and labels != entry.labels:
                raise ValueError(f"metric {name!r} is declared with labels {list(entry.labels)}")
            labels = entry.labels
            help_text = help_text or entry.help
            buckets = buckets or entry.buckets
            merge = entry.merge
        if merge not in GAUGE_MERGE:
            raise ValueError(f"merge must be one of {GAUGE_MERGE}")
        family = Family(name, kind, help_text, labels, buckets or DEFAULT_BUCKETS, merge, self.max_series)
        self.families[name] = family
        return family

    def counter(self, name: str, **labels: Any) -> Counter:
        handle: Counter = self._handle(name, "counter", labels)
        return handle

    def gauge(self, name: str, **labels: Any) -> Gauge:
        handle: Gauge = self._handle(name, "gauge", labels)
        return handle

    def histogram(self, name: str, **labels: Any) -> Histogram:
        handle: Histogram = self._handle(name, "histogram", labels)
        return handle

    def count(self, name: str, amount: int = 1, **labels: Any) -> None:
        handle: Counter = self._handle(name, "counter", labels)
        handle.value += amount

    def _handle(self, name: str, kind: str, labels: dict[str, Any]) -> Any:
        family = self.families.get(name)
        if family is None:
            declared = name in CATALOG  # the catalogue fixes the label names and their order
            family = self.family(name, kind, () if declared else tuple(sorted(labels)))
        elif family.kind != kind:
            raise ValueError(f"metric {name!r} is a {family.kind}, not a {kind}")
        names = family.labels
        if len(labels) != len(names) or any(n not in labels for n in names):
            raise ValueError(f"metric {name!r} takes labels {list(names)}, got {sorted(labels)}")
        return family.handle(tuple([str(labels[n]) for n in names]))

    # -- collection ------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain builtins (pickled over the channel): every route's numbers and every family."""
        return {
            "buckets": (list(self.latency_buckets), list(self.gateway_buckets)),
            "routes": {key: m.data() for key, m in self.routes.items()},
            "families": {
                name: (f.kind, f.help, f.labels, list(f.buckets), f.merge, f.data())
                for name, f in self.families.items()
            },
        }


REGISTRY: Final = Registry()


def counter(name: str, **labels: Any) -> Counter:
    """A counter handle for these labels (make it once, `inc()` it per event)."""
    return REGISTRY.counter(name, **labels)


def gauge(name: str, **labels: Any) -> Gauge:
    return REGISTRY.gauge(name, **labels)


def histogram(name: str, **labels: Any) -> Histogram:
    return REGISTRY.histogram(name, **labels)


def count(name: str, amount: int = 1, **labels: Any) -> None:
    """Add `amount` (default 1) to a counter: the one-line form."""
    REGISTRY.count(name, amount, **labels)


def status_key(method: bytes, status: int, exact: bool) -> int:
    """The request-count key of a method and status (class 1-5, or the code when `exact`)."""
    code = 0
    if exact and 100 <= status <= 999:
        code = status
    elif not exact and 100 <= status <= 599:
        code = status // 100
    return METHOD_INDEX.get(method, OTHER_METHOD) * KEY_STRIDE + code
