"""The route table: routes compiled once per config version into host groups of path indexes.

A route with H host patterns and P path patterns yields H x P *variants*. Each variant gets an integer
rank at build time (its position in the precedence order, see `_precedence` and docs/routing.md), and
is stored in the path index (`index.py`) of its host group:

- exact hosts: a dict host -> index;
- "*.example.com": a dict ".example.com" -> index, probed with each suffix of the request host that
  starts at a dot (one probe per label of the host, whatever the number of routes);
- "example.*": a dict "example." -> index, probed with each prefix of the host that ends at a dot;
- routes without hosts: one index.

At request time every matching group contributes its candidates; the lowest rank that also passes the
method, header and query matchers wins. Headers and the query string are only decoded when a candidate
actually has such matchers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from tollway.config.schema import Route
from tollway.router.index import Candidate, PathIndex
from tollway.router.matchers import (
    Matchers,
    NameMatcher,
    all_match,
    compile_matchers,
    header_values,
    query_values,
)
from tollway.router.paths import PathPattern, compile_rewrite, parse_path_pattern

T = TypeVar("T")

_NO_SEGMENTS: Final[list[str]] = []  # (Final: compiled code reads it directly, not by name)
HOST_CACHE_SIZE = 1024  # distinct Host values remembered before the cache starts over


class RouteMatch(Generic[T]):
    """A request matched `route`: forward it to `path`, with the captured `params`. `fixed`: the
    result depends on nothing but the method, the host and the path (the best candidate checks no
    headers, query, scheme or SNI, and allows any method or this one), so the caller may memoise it
    for that method, Host and URL (tollway.proxy.exchange's match memo)."""

    # A plain slotted class: a slotted generic dataclass measured 1.7x slower to build, per request.
    __slots__ = ("fixed", "params", "path", "route")

    def __init__(self, route: T, path: str, params: dict[str, str], fixed: bool = False) -> None:
        self.route = route
        self.path = path  # the path to forward, after strip_path / rewrite; always starts with "/"
        self.params = params  # shared empty dict when there are none: do not mutate
        self.fixed = fixed

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteMatch):
            return NotImplemented
        return (self.route, self.path, self.params) == (other.route, other.path, other.params)

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value

    def __repr__(self) -> str:
        return f"RouteMatch(route={self.route!r}, path={self.path!r}, params={self.params!r})"


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    """Host, path, headers and query matched some routes, but none allows the method (405 + Allow)."""

    allowed: tuple[str, ...]


_UNCHANGED: Final = 0
_STRIP: Final = 1
_REWRITE: Final = 2


_ANY_METHOD: Final[frozenset[str]] = frozenset()


class RouteEntry:
    """One route as the hot path needs it; shared by all of the route's variants."""

    __slots__ = (
        "headers",
        "methods",
        "methods_only",
        "mode",
        "payload",
        "plain",
        "query",
        "rewrite",
        "schemes",
        "snis",
    )

    def __init__(self, route: Route, payload: Any) -> None:
        self.payload = payload
        # empty: any method (one shared empty set: 10,000 routes would hold 10,000 copies, 2 MB)
        self.methods = frozenset(route.methods) if route.methods else _ANY_METHOD
        self.headers: Matchers | None = compile_matchers(route.headers)
        self.query: Matchers | None = compile_matchers(route.query)
        # TLS matchers (docs/tls.md): the client's scheme and the server name it sent
        self.schemes = frozenset(p.encode() for p in route.protocols) if route.protocols else None
        self.snis: NameMatcher | None = NameMatcher(route.snis) if route.snis else None
        self.rewrite = compile_rewrite(route.rewrite) if route.rewrite is not None else ""
        self.mode = _REWRITE if route.rewrite is not None else _STRIP if route.strip_path else _UNCHANGED
        # Most routes check nothing but host and path, or add methods: let the hot path know at once.
        tls = self.schemes is not None or self.snis is not None
        self.plain = not self.methods and self.headers is None and self.query is None and not tls
        self.methods_only = bool(self.methods) and self.headers is None and self.query is None and not tls

    def forward(self, path: str, params: dict[str, str], cut: int, fixed: bool) -> RouteMatch[Any]:
        """The match result; `cut` is where the path left after strip_path starts; `fixed`: see
        `RouteMatch`."""
        mode = self.mode
        if mode == _UNCHANGED:
            return RouteMatch(self.payload, path, params, fixed)
        if mode == _STRIP:
            rest = path[cut:]
            if not rest or rest[0] != "/":
                rest = "/" + rest
            return RouteMatch(self.payload, rest, params, fixed)
        return RouteMatch(self.payload, self.rewrite.format_map(params), params, fixed)


class Router(Generic[T]):
    """Match requests to routes. Build once per config version. `match` does no I/O; its only state is
    a bounded host cache, so one router can serve every request of a worker (threads included)."""

    __slots__ = (
        "_any_host",
        "_default",
        "_exact_hosts",
        "_host_cache",
        "_lead_hosts",
        "_routes",
        "_split",
        "_trail_hosts",
        "_variants",
    )

    def __init__(self, entries: Sequence[tuple[Route, T]]) -> None:
        self._exact_hosts: dict[str, PathIndex] = {}
        self._lead_hosts: dict[str, PathIndex] = {}  # "*.example.com" under ".example.com"
        self._trail_hosts: dict[str, PathIndex] = {}  # "example.*" under "example."
        self._any_host: PathIndex | None = None
        self._routes = len(entries)
        variants = sorted(_variants(entries), key=lambda variant: variant[0])
        self._variants = len(variants)
        for rank, (_, entry, host, pattern) in enumerate(variants):
            self._group(host).add(pattern, rank, entry)
        groups = self._groups()
        for group in groups:
            group.freeze()
        # Split the path into segments once per request, and only if some trie will walk them.
        self._split = any(group.needs_segments for group in groups)
        # The groups of a request without host routes, and of every host no host route matches.
        # (Read through a method: mypy would narrow the attribute to None here, and mypyc enforces it.)
        self._default: tuple[PathIndex, ...] = self._default_groups()
        # Host -> its groups. Few distinct hosts reach a gateway, so this turns up to 2 probes per label
        # into one dict lookup; it is cleared when full, so random Host headers cannot grow it.
        self._host_cache: dict[str, tuple[PathIndex, ...]] | None = (
            {} if self._exact_hosts or self._lead_hosts or self._trail_hosts else None
        )

    def _default_groups(self) -> tuple[PathIndex, ...]:
        return (self._any_host,) if self._any_host is not None else ()

    def __repr__(self) -> str:
        hosts = len(self._exact_hosts) + len(self._lead_hosts) + len(self._trail_hosts)
        return f"<Router routes={self._routes} variants={self._variants} host_groups={hosts}>"

    def match(
        self,
        method: str,
        host: str,
        path: str,
        query: str,
        headers: Sequence[tuple[bytes, bytes]],
        scheme: bytes = b"http",
        sni: str = "",
    ) -> RouteMatch[T] | MethodNotAllowed | None:
        """Route a request; None means no route (404). See docs/routing.md for the precedence."""
        if self._host_cache is None:
            groups = self._default
        else:
            found = self._host_cache.get(host)
            groups = found if found is not None else self._resolve_host(host)
        segments = path.split("/") if self._split else _NO_SEGMENTS
        candidates: list[Candidate] = []
        for group in groups:
            group.collect(path, segments, candidates)
        if not candidates:
            return None
        if len(candidates) > 1:
            candidates.sort()  # ranks are unique, so only the first tuple item is ever compared
        _, entry, params, cut = candidates[0]
        # The common cases: the best candidate checks nothing more, or only the method. The result
        # then depends on nothing but method, host and path: `fixed`, the caller may memoise it.
        if entry.plain or (entry.methods_only and method in entry.methods):
            return entry.forward(path, params, cut, True)
        return _choose(candidates, method, path, query, headers, scheme, sni)

    # -- build ------------------------------------------------------------------------------------
    def _group(self, host: str | None) -> PathIndex:
        if host is None:
            self._any_host = self._any_host or PathIndex()
            return self._any_host
        if host.startswith("*."):
            return self._lead_hosts.setdefault(host[1:], PathIndex())
        if host.endswith(".*"):
            return self._trail_hosts.setdefault(host[:-1], PathIndex())
        return self._exact_hosts.setdefault(host, PathIndex())

    def _groups(self) -> list[PathIndex]:
        groups = [*self._exact_hosts.values(), *self._lead_hosts.values(), *self._trail_hosts.values()]
        return [*groups, self._any_host] if self._any_host is not None else groups

    # -- hosts ------------------------------------------------------------------------------------
    def _resolve_host(self, host: str) -> tuple[PathIndex, ...]:
        cache = self._host_cache
        assert cache is not None
        if len(cache) >= HOST_CACHE_SIZE:
            cache.clear()
        groups = cache[host] = (*self._host_groups(host), *self._default)
        return groups

    def _host_groups(self, host: str) -> list[PathIndex]:
        """The groups of the host patterns that match `host` (their order does not matter: ranks do)."""
        found = [self._exact_hosts[host]] if host in self._exact_hosts else []
        # "*.example.com" needs at least one label before ".example.com": start after position 0.
        dot = host.find(".", 1)
        while dot != -1:
            if host[dot:] in self._lead_hosts:
                found.append(self._lead_hosts[host[dot:]])
            dot = host.find(".", dot + 1)
        # "example.*" needs at least one label after "example.": stop before the last character.
        dot = host.find(".", 0, len(host) - 1)
        while dot != -1:
            if host[: dot + 1] in self._trail_hosts:
                found.append(self._trail_hosts[host[: dot + 1]])
            dot = host.find(".", dot + 1, len(host) - 1)
        return found


def _choose(
    candidates: list[Candidate],
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[bytes, bytes]],
    scheme: bytes,
    sni: str,
) -> RouteMatch[Any] | MethodNotAllowed | None:
    """Walk candidates best first; the first passing scheme, SNI, methods, headers and query wins."""
    header_map: dict[str, list[str]] | None = None
    query_map: dict[str, list[str]] | None = None
    allowed: frozenset[str] = frozenset()
    for _, entry, params, cut in candidates:
        if entry.schemes is not None and scheme not in entry.schemes:
            continue
        if entry.snis is not None and not entry.snis.matches(sni):
            continue
        if entry.headers is not None:
            header_map = header_values(headers) if header_map is None else header_map
            if not all_match(entry.headers, header_map):
                continue
        if entry.query is not None:
            query_map = query_values(query) if query_map is None else query_map
            if not all_match(entry.query, query_map):
                continue
        # Checked last so that a method mismatch is known to be the *only* mismatch (405, not 404).
        if entry.methods and method not in entry.methods:
            allowed |= entry.methods
            continue
        return entry.forward(path, params, cut, False)
    return MethodNotAllowed(tuple(sorted(allowed))) if allowed else None


# -- precedence ----------------------------------------------------------------------------------------
Variant = tuple[tuple[int, ...], RouteEntry, str | None, PathPattern | None]


def _variants(entries: Sequence[tuple[Route, Any]]) -> list[Variant]:
    variants: list[Variant] = []
    for order, (route, payload) in enumerate(entries):
        entry = RouteEntry(route, payload)
        hosts: list[str | None] = list(route.hosts) or [None]
        patterns: list[PathPattern | None] = [parse_path_pattern(path) for path in route.paths] or [None]
        for host_order, host in enumerate(hosts):
            for path_order, pattern in enumerate(patterns):
                key = (*_precedence(route, order, host, pattern, path_order), host_order, path_order)
                variants.append((key, entry, host, pattern))
    return variants


def _precedence(
    route: Route, order: int, host: str | None, pattern: PathPattern | None, path_order: int
) -> tuple[int, ...]:
    """The sort key of a variant: smaller is better. Rules 1-5 of docs/routing.md, in order."""
    matchers = bool(route.methods) + len(route.headers) + len(route.query)
    return (-route.priority, *_host_rank(host), *_path_rank(pattern, order, path_order), -matchers, order)


def _host_rank(host: str | None) -> tuple[int, int]:
    if host is None:
        return (2, 0)
    if host.startswith("*.") or host.endswith(".*"):
        return (1, -host.count("."))  # literal labels: "*.api.example.com" (3) before "*.example.com"
    return (0, 0)


def _path_rank(pattern: PathPattern | None, order: int, path_order: int) -> tuple[int, int, int]:
    if pattern is None:
        return (4, 0, 0)
    if pattern.kind == "exact":
        return (0, 0, 0)
    if pattern.kind == "template":
        return (1, -pattern.literals, pattern.catch_all is not None)
    if pattern.kind == "prefix":
        return (2, -len(pattern.text), 0)
    return (3, order, path_order)  # regexes: config order, like nginx's regex locations
