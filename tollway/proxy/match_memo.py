"""The router's match memo: how a request was routed, kept to route the same request again for free.

`Exchange.begin` looks up ``(method, Host, origin-form URL)`` in `Snapshot.matches` (one per config
version: a reload starts an empty one). On a hit, `KnownMatch.apply` sets on the exchange exactly what
target parsing (`Exchange._parse_target`) and routing (`Exchange._route`) set, and neither runs. Only
results of the router's fast path are kept (`RouteMatch.fixed`: they depend on nothing but method, host
and path), made by `remember` after routing, so the Host was validated: a hit implies a valid Host.
Never kept: header, query, scheme and SNI routes, the candidates' walk, 404, 405, 400; absolute-form
targets; URLs and Hosts longer than 256 bytes. docs/routing.md, "Match cache".

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.snapshot import CompiledRoute

# The match memo: Snapshot.matches, (method, Host, origin-form URL) -> KnownMatch, per config version
# (a reload starts an empty one), cleared when full. An entry is made the second time its URL is
# routed: Snapshot.seen_once holds the URLs routed once (~70 bytes each when typical, 4,096 at most:
# 300 KB, 1.3 MB at worst).
# Worst case per entry, URL and Host at their limits: the key (a 64-byte tuple, the URL and Host bytes:
# 2 x 289), the record (~120), the paths and the query (path and raw_path <= 256 characters each, query
# + raw_path <= 255: ~700), the forwarded path and prefix (~580 beyond the service's base path; a
# rewrite adds its template's length plus 256 per parameter use), the parameters (~500), the dict
# slot (~50): ~2.6 KB, at most ~10.5 MB per worker at 4,096 entries. A typical entry (a 30-byte URL,
# a 20-byte Host, no parameters) is ~450 bytes: ~1.8 MB when full.
MEMO_SIZE: Final = 4096
MEMO_MAX_URL: Final = 256  # longer URLs are routed each time (bounds the memo's memory)
MEMO_MAX_HOST: Final = 256


class KnownMatch:
    """What `_parse_target` and `_route` set on an exchange whose route the router chose on its fast
    path (`RouteMatch.fixed`): a request with the same method, Host and URL gets the same, as is."""

    __slots__ = (
        "forwarded_prefix",
        "params",
        "path",
        "query",
        "raw_path",
        "route",
        "route_host",
        "upstream_path",
    )

    def __init__(self, ex: Exchange, route_host: str) -> None:
        route = ex.route
        assert route is not None
        self.route: CompiledRoute = route
        self.route_host = route_host  # the connection's routing-host memo (Exchange._route)
        self.path = ex.path
        self.raw_path = ex.raw_path
        self.query = ex.query
        # A copy (this request's plugins may change its own), copied again for each hit.
        params = ex.params
        self.params = params.copy() if params else params
        # None: forwarded as received, the request's own URL (the same bytes on a hit)
        self.upstream_path: bytes | None = None if ex.upstream_path is ex.url else ex.upstream_path
        self.forwarded_prefix = ex.forwarded_prefix

    def apply(self, ex: Exchange) -> None:
        """Set exactly what `_parse_target` and `_route` set for this method, Host and URL."""
        client = ex.client
        client.route_host_of = ex.host
        client.route_host = self.route_host
        ex.path = self.path
        ex.raw_path = self.raw_path
        ex.query = self.query
        route = ex.route = self.route
        ex.service = route.service
        params = self.params
        # a copy, as a miss gives each request its own dict (the shared empty one aside): a plugin that
        # changes ex.params changes nothing for the next request
        ex.params = params.copy() if params else params
        upstream_path = self.upstream_path
        ex.upstream_path = ex.url if upstream_path is None else upstream_path
        ex.forwarded_prefix = self.forwarded_prefix


def remember(ex: Exchange, key: tuple[bytes, bytes, bytes], route_host: str) -> None:
    """Memoise a result that depends on nothing but method, Host and URL (`RouteMatch.fixed`), for an
    origin-form URL (absolute-form ones name their own host) of bounded size, once routed `ex`."""
    _, host, url = key
    if url[:1] != b"/" or len(url) > MEMO_MAX_URL or len(host) > MEMO_MAX_HOST:
        return
    snapshot = ex.snapshot
    # Admitted at the second sighting of its URL: a URL seen once (an id in the path) costs a set
    # insertion (its bytes, whose hash the memo's lookup computed), not an entry (objects the garbage
    # collector walks until the memo is cleared: ~2,000 instructions more, measured).
    seen = snapshot.seen_once
    count = len(seen)
    seen.add(url)
    if len(seen) != count:  # not seen before
        if count >= MEMO_SIZE:
            seen.clear()
            seen.add(url)
        return
    matches = snapshot.matches
    if len(matches) >= MEMO_SIZE:
        matches.clear()
    matches[key] = KnownMatch(ex, route_host)
