"""The supervisor's side of metrics: collect every worker's numbers, merge them, render Prometheus text.

A scrape of /metrics (or a /status request) sends ("collect", token) to every live worker and waits
up to `metrics.collect_timeout` for the ("collected", token, data) answers. A worker that does not
answer in time is represented by the numbers it sent last (counted in
tollway_metrics_collect_timeouts_total), so a scrape always covers every worker.

Counters never go backwards, even when a worker dies: the last numbers of each worker process are
kept, and when the process exits they move into a `retired` total that every later scrape adds.
A draining worker sends its final numbers before it exits; a crashed one loses only what it
counted since the last scrape (or since the last periodic collect, see `Supervisor`). Gauges are
taken from live workers only, combined as their catalogue entry says (sum, max or min).

Rendering goes through prometheus_client's exposition (a custom collector; never its multiprocess
mode). Other supervisor features add their own collectors with `Supervisor.add_collector`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import CollectorRegistry

from tollway import __version__
from tollway.config.tls import certificate_expiry
from tollway.counters.catalog import REQUEST_METRICS
from tollway.counters.metrics import KEY_STRIDE, METHODS, REGISTRY, Registry


# What the hub reads of the supervisor (tollway.runtime.supervisor hands itself in): observability sits
# below the runtime and knows it only through these shapes.
class _Channel(Protocol):
    def send(self, message: Any) -> bool: ...


class _Process(Protocol):
    @property
    def pid(self) -> int: ...


class WorkerLink(Protocol):
    """One supervised worker process: its slot, process, channel (None while it is down), ready config."""

    @property
    def slot(self) -> int: ...
    @property
    def process(self) -> _Process: ...
    @property
    def channel(self) -> _Channel | None: ...
    @property
    def ready_version(self) -> int: ...


class Supervised(Protocol):
    """The supervisor's state the hub reports: its workers, start time and config reloads."""

    @property
    def workers(self) -> Mapping[int, WorkerLink]: ...
    @property
    def started(self) -> float: ...
    @property
    def version(self) -> int: ...
    @property
    def last_reload(self) -> Mapping[str, Any]: ...


PREFIX = "tollway_"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()


# -- merging -------------------------------------------------------------------------------------------------
def empty() -> dict[str, Any]:
    return {"buckets": None, "routes": {}, "families": {}}


def merge_into(total: dict[str, Any], data: dict[str, Any], gauges: bool = True) -> None:
    """Add one process's snapshot to `total` (in place). With gauges=False, gauges are skipped (a
    retired worker's connections are not open any more)."""
    if total["buckets"] is None and data.get("routes"):
        total["buckets"] = data["buckets"]
    routes = total["routes"]
    for key, (requests, duration, upstream, gateway, bytes_in, bytes_out) in data["routes"].items():
        mine = routes.get(key)
        if mine is None:
            hists = [_hist(duration), _hist(upstream), _hist(gateway)]
            routes[key] = [dict(requests), *hists, bytes_in, bytes_out]
            continue
        counts = mine[0]
        for k, v in requests.items():
            counts[k] = counts.get(k, 0) + v
        for i, h in ((1, duration), (2, upstream), (3, gateway)):
            mine[i] = _add_hist(mine[i], h)
        mine[4] += bytes_in
        mine[5] += bytes_out
    families = total["families"]
    for name, (kind, help_text, labels, buckets, merge, series) in data["families"].items():
        if kind == "gauge" and not gauges:
            continue
        mine = families.get(name)
        if mine is None:
            mine = families[name] = [kind, help_text, labels, buckets, merge, {}]
        elif mine[0] != kind or mine[2] != labels:
            continue  # declared differently in two processes (mid-upgrade): keep the first
        target = mine[5]
        for values, value in series.items():
            old = target.get(values)
            if old is None:
                target[values] = _hist(value) if kind == "histogram" else value
            elif kind == "histogram":
                target[values] = _add_hist(old, value)
            elif kind == "gauge" and merge == "max":
                target[values] = max(old, value)
            elif kind == "gauge" and merge == "min":
                target[values] = min(old, value)
            else:
                target[values] = old + value


def _hist(data: tuple[list[int], float] | list[Any]) -> list[Any]:
    return [list(data[0]), data[1]]


def _add_hist(mine: list[Any], other: tuple[list[int], float] | list[Any]) -> list[Any]:
    counts, total = other[0], other[1]
    if len(counts) != len(mine[0]):
        return mine  # a different bucket layout (cannot happen within one run: buckets apply at start)
    return [[a + b for a, b in zip(mine[0], counts, strict=True)], mine[1] + total]


# -- rendering ---------------------------------------------------------------------------------------------
def families(merged: dict[str, Any]) -> Iterator[Metric]:
    """prometheus_client metric families for a merged snapshot."""
    yield from _request_families(merged)
    for name, (kind, help_text, labels, buckets, _merge, series) in sorted(merged["families"].items()):
        full = PREFIX + name
        if kind == "histogram":
            histogram = HistogramMetricFamily(full, help_text, labels=list(labels))
            for values, (counts, total) in sorted(series.items()):
                histogram.add_metric(list(values), _cumulative(buckets, counts), total)
            yield histogram
            continue
        kind_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = kind_class(full, help_text, labels=list(labels))
        for values, value in sorted(series.items()):
            family.add_metric(list(values), value)
        yield family


def _request_families(merged: dict[str, Any]) -> Iterator[Metric]:
    meta = REQUEST_METRICS
    requests = CounterMetricFamily(
        PREFIX + "http_requests_total",
        meta["http_requests_total"].help,
        labels=["service", "route", "method", "code"],
    )
    hists = {
        name: HistogramMetricFamily(PREFIX + name, meta[name].help, labels=["service", "route"])
        for name in (
            "http_request_duration_seconds",
            "http_upstream_duration_seconds",
            "http_gateway_duration_seconds",
        )
    }
    received = CounterMetricFamily(
        PREFIX + "http_received_bytes_total",
        meta["http_received_bytes_total"].help,
        labels=["service", "route"],
    )
    sent = CounterMetricFamily(
        PREFIX + "http_sent_bytes_total", meta["http_sent_bytes_total"].help, labels=["service", "route"]
    )
    buckets: tuple[list[float], list[float]] = merged["buckets"] or ([], [])
    for (service, route), (counts, duration, upstream, gateway, bytes_in, bytes_out) in sorted(
        merged["routes"].items()
    ):
        labels = [service, route]
        for key, value in sorted(counts.items()):
            method, code = divmod(key, KEY_STRIDE)
            requests.add_metric([*labels, METHODS[method], _code_label(code)], value)
        for name, hist, bounds in (
            ("http_request_duration_seconds", duration, buckets[0]),
            ("http_upstream_duration_seconds", upstream, buckets[0]),
            ("http_gateway_duration_seconds", gateway, buckets[1]),
        ):
            hists[name].add_metric(labels, _cumulative(bounds, hist[0]), hist[1])
        received.add_metric(labels, bytes_in)
        sent.add_metric(labels, bytes_out)
    yield requests
    yield from hists.values()
    yield received
    yield sent


def _code_label(code: int) -> str:
    if code == 0:
        return "unknown"
    return f"{code}xx" if code < 10 else str(code)


def _cumulative(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    running = list(itertools.accumulate(counts))
    out = [(_le(b), float(c)) for b, c in zip(bounds, running, strict=False)]
    out.append(("+Inf", float(running[-1]) if running else 0.0))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


# -- the hub the supervisor owns -----------------------------------------------------------------------------
class _Collector:
    def __init__(self, source: Iterable[Metric]) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source


class MetricsHub:
    """Collects worker snapshots on demand and keeps what is needed so counters never go backwards."""

    def __init__(self, supervisor: Supervised, registry: Registry = REGISTRY) -> None:
        self.supervisor = supervisor
        self.registry = registry  # the supervisor process's own metrics
        self.latest: dict[int, tuple[int, dict[str, Any]]] = {}  # pid -> (slot, last snapshot)
        self.retired = empty()  # counters and histograms of worker processes that exited
        self.extra_collectors: list[Any] = []
        self._waiting: dict[int, tuple[set[int], asyncio.Future[None]]] = {}
        self._tokens = itertools.count(1)
        self._certificates: tuple[object, dict[str, float | None]] = (None, {})

    def __repr__(self) -> str:
        return f"<MetricsHub workers={len(self.latest)} collectors={len(self.extra_collectors)}>"

    # -- collection -------------------------------------------------------------------------------------
    async def collect(self, timeout: float) -> None:
        """Ask every live worker for its numbers; wait for all of them, at most `timeout` seconds."""
        token = next(self._tokens)
        pending: set[int] = set()
        for handle in self.supervisor.workers.values():
            if handle.channel is not None and handle.channel.send(("collect", token)):
                pending.add(handle.process.pid)
        if not pending:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (pending, done)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            for pid in pending:
                slot = self._slot_of(pid)
                self.registry.count("metrics_collect_timeouts_total", worker=str(slot))
        finally:
            self._waiting.pop(token, None)

    def received(self, slot: int, pid: int, token: int, data: dict[str, Any]) -> None:
        """A worker's ("collected", token, data); token 0 is a draining worker's final numbers."""
        self.latest[pid] = (slot, data)
        waiting = self._waiting.get(token)
        if waiting is not None:
            pending, done = waiting
            pending.discard(pid)
            if not pending and not done.done():
                done.set_result(None)

    def worker_gone(self, pid: int) -> None:
        """A worker process exited: its counters live on in `retired`."""
        found = self.latest.pop(pid, None)
        if found is not None:
            merge_into(self.retired, found[1], gauges=False)
        for pending, done in self._waiting.values():
            pending.discard(pid)
            if not pending and not done.done():
                done.set_result(None)

    def _slot_of(self, pid: int) -> int:
        for handle in self.supervisor.workers.values():
            if handle.process.pid == pid:
                return handle.slot
        return -1

    # -- views -------------------------------------------------------------------------------------------
    def merged(self) -> dict[str, Any]:
        self._refresh_supervisor_metrics()
        total = empty()
        merge_into(total, self.retired)
        for _slot, data in self.latest.values():
            merge_into(total, data)
        merge_into(total, self.registry.snapshot())
        return total

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(list(families(self.merged()))))
        for collector in self.extra_collectors:
            registry.register(collector)
        return generate_latest(registry)

    def worker_view(self, pid: int) -> dict[str, Any] | None:
        found = self.latest.get(pid)
        return found[1] if found is not None else None

    def _refresh_supervisor_metrics(self) -> None:
        sup = self.supervisor
        reg = self.registry
        reg.gauge("build_info", version=__version__, python=platform.python_version()).set(1)
        reg.gauge("start_time_seconds").set(sup.started)
        reg.gauge("config_version").set(sup.version)
        reg.gauge("config_last_reload_timestamp_seconds").set(sup.last_reload["time"])
        reg.gauge("config_last_reload_success").set(0 if sup.last_reload["result"] == "failed" else 1)
        handles = list(sup.workers.values())
        reg.gauge("workers", state="alive").set(sum(1 for h in handles if h.channel is not None))
        reg.gauge("workers", state="ready").set(
            sum(1 for h in handles if h.channel is not None and h.ready_version == sup.version)
        )
        for handle in handles:
            rss = resident_bytes(handle.process.pid) if handle.channel is not None else 0
            reg.gauge("worker_resident_memory_bytes", worker=str(handle.slot)).set(rss)
        self._refresh_target_health()
        self._refresh_certificates()

    def _refresh_certificates(self) -> None:
        """tollway_tls_certificate_expiry_timestamp_seconds per certificate of the running config (read
        once per config, not per scrape)."""
        config = getattr(self.supervisor, "config", None)
        if config is None or getattr(config, "certificates", None) is None:
            return
        if self._certificates[0] is not config:
            expiries = {cert.name: certificate_expiry(cert) for cert in config.certificates}
            self._certificates = (config, expiries)
        family = self.registry.family("tls_certificate_expiry_timestamp_seconds", "gauge")
        family.series.clear()  # certificates removed from the config disappear
        for name, expiry in self._certificates[1].items():
            if expiry is not None:
                family.handle((name,)).set(expiry)

    def _refresh_target_health(self) -> None:
        """tollway_upstream_target_health from the supervisor's health-check and ejection state
        (tollway.upstream.supervisor_manager): 1 for each target's current state, 0 for the other two."""
        manager = getattr(self.supervisor, "upstreams", None)
        if manager is None or not hasattr(manager, "target_states"):
            return
        family = self.registry.family("upstream_target_health", "gauge")
        family.series.clear()  # targets removed from the config disappear
        for upstream, target, address, current in manager.target_states():
            for state in ("healthy", "unhealthy", "ejected"):
                family.handle((upstream, target, address, state)).set(1.0 if state == current else 0.0)


def resident_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
