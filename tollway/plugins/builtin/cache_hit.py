"""proxy-cache's hit path: a fresh stored copy answers a plain GET from compiled code (setup.py
HOT_MODULES), serialized once per stored copy, not once per hit.

A hit is the one cache outcome that must be cheaper than forwarding (issue 15's bar: ≤ 0.8× the
pass-through's CPU). The general path (tollway.plugins.builtin.proxy_cache) parses the request's
cache directives, builds an answer field by field and serializes it on every hit; here the common
case — a GET without Cache-Control, Pragma, conditional or Range fields, and a fresh copy that is not
a variants record — takes one store read, one dict lookup and one bytes format. Everything else, and
anything this path is not sure of, goes to the general path (`slow`), which answers exactly as before:
the bytes sent here are the bytes it would send (tests/plugins/test_proxy_cache_fast.py compares them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from tollway.cache import keys, rfc
from tollway.cache.entry import NO_CACHE, REQUEST_ID, Entry, Variants, decode
from tollway.cache.stats import STATS
from tollway.proxy.pdk import RequestContext
from tollway.proxy.responses import reason

_time: Final = time.time
_MAX_AGE: Final = rfc.MAX_DELTA
_MEMO_ENTRIES: Final = 256  # prepared copies kept per process...
_MEMO_BYTES: Final = 65536  # ...each for a stored value up to this size (larger ones: general path)
# Request fields after which a stored copy may answer differently (§5.2.1 directives, §4.3.2
# conditionals, RFC 9110 14.2 ranges): a request with any of them takes the general path. Checked by
# length first, so most fields cost no lowercasing.
_DIFFERENT: Final = frozenset(
    (b"cache-control", b"pragma", b"if-none-match", b"if-modified-since", b"range", b"if-range")
)
_DIFFERENT_LENGTHS: Final = frozenset(len(name) for name in _DIFFERENT)


def request_key(ex: RequestContext, path: str, query: str, ignore: frozenset[str], sort: bool) -> bytes:
    """The primary key of `path?query` as this request names it (scheme, Host): the one derivation
    both the hit path and the general path use, so they can never disagree about a copy."""
    host = ex.host.decode("latin-1").lower()
    if query and (ignore or sort):
        query = keys.normalise_query(query, ignore, sort)
    return keys.primary_key(ex.client.scheme.decode(), host, path, query)


class Prepared:
    """One stored copy, serialized for hits: everything but its Age, request id and ttl."""

    def __init__(
        self,
        entry: Entry | None,
        server: bytes | None,
        status_prefix: bytes,
        label: bytes | None,
    ) -> None:
        self.server = server  # the gateway's own Server field when this was built (per listener)
        self.lifetime = -1.0  # never fresh: what the fast path cannot answer (variants, 204, 304)
        self.initial_age = 0.0
        self.response_time = 0.0
        self.status = 0
        self.request_id = False
        self.head = b""
        self.middle = b""
        self.status_prefix = status_prefix
        self.tail = b""
        self.body = b""
        self.last_age = -1  # the last head formatted, for this Age and ttl
        self.last_ttl = -1
        self.last_head = b""
        if entry is None or entry.status < 200 or entry.status in (204, 304) or entry.flags & NO_CACHE:
            return
        self.status = status = entry.status
        self.lifetime = entry.lifetime
        self.initial_age = entry.initial_age
        self.response_time = entry.response_time
        self.request_id = bool(entry.flags & REQUEST_ID)
        self.body = entry.body
        # The order tollway.cache.serve.answer and tollway.proxy.responses.serialize give the fields:
        # the stored ones (less the backend's Server when the gateway names itself), Age, Accept-Ranges,
        # X-Request-Id, Cache-Status, the label, the gateway's Server, Content-Length, Connection.
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
        for name, value in entry.headers:
            if server is None or name.lower() != b"server":
                lines.append(b"%s: %s\r\n" % (name, value))
        self.head = b"".join(lines)
        self.middle = b"Accept-Ranges: bytes\r\n" if status == 200 else b""
        tail = [b"%s: HIT\r\n" % label] if label is not None else []
        if server is not None:
            tail.append(b"Server: %s\r\n" % server)
        tail.append(b"Content-Length: %d\r\n" % len(entry.body))
        self.tail = b"".join(tail)

    def format(self, age: int, ttl: int, request_id_line: bytes) -> bytes:
        return b"%sAge: %d\r\n%s%s%s%d\r\n%s" % (
            self.head,
            age,
            self.middle,
            request_id_line,
            self.status_prefix,
            ttl,
            self.tail,
        )


class HitPath:
    """The `access` hook of one proxy-cache plugin instance whose copies this path can answer (GET
    served, a synchronous store, no key parts that make every copy a variant): fast hits, else
    `slow(ex)`."""

    def __init__(
        self,
        slow: Callable[[RequestContext], Any],
        decode: DecodedCopies,
        ignore_query: frozenset[str],
        sort_query: bool,
        status_name: bytes,
        label: bytes | None,
    ) -> None:
        self.slow = slow
        self.decode = decode
        self.ignore_query = ignore_query
        self.sort_query = sort_query
        self.status_prefix = b"Cache-Status: %s; hit; ttl=" % status_name
        self.label = label
        self.store: Any = None  # set by the plugin once its store is open (sync stores only)
        self.prepared: dict[bytes, Prepared] = {}

    def access(self, ex: RequestContext) -> Any:
        store = self.store
        if store is None or ex.method != b"GET":
            return self.slow(ex)
        for name, _ in ex.headers:
            if len(name) in _DIFFERENT_LENGTHS and name.lower() in _DIFFERENT:
                return self.slow(ex)
        key = request_key(ex, ex.path, ex.query, self.ignore_query, self.sort_query)
        try:
            data = store.get(key)
        except Exception:  # the general path meets the failure too, and answers BYPASS
            return self.slow(ex)
        if data is None or len(data) > _MEMO_BYTES:
            return self.slow(ex)
        server = ex.client.server_header
        prepared = self.prepared.get(data)
        if prepared is None or prepared.server != server:
            prepared = self._prepare(data, server)
        age = prepared.initial_age + max(0.0, _time() - prepared.response_time)
        if age >= prepared.lifetime:
            return self.slow(ex)  # stale, or not a copy this path answers
        seconds = min(int(age), _MAX_AGE)
        ttl = int(prepared.lifetime - age)
        if prepared.request_id:
            head = prepared.format(seconds, ttl, b"X-Request-Id: %s\r\n" % ex.request_id)
        elif seconds == prepared.last_age and ttl == prepared.last_ttl:
            head = prepared.last_head  # hits within the same second send the same head
        else:
            head = prepared.last_head = prepared.format(seconds, ttl, b"")
            prepared.last_age = seconds
            prepared.last_ttl = ttl
        if not ex.respond_serialized(prepared.status, head, prepared.body):
            return self.slow(ex)  # fields other plugins added: the general path merges them
        STATS.hits += 1
        return None

    def _prepare(self, data: bytes, server: bytes | None) -> Prepared:
        found = self.decode(data)
        entry = found if isinstance(found, Entry) else None
        prepared = Prepared(entry, server, self.status_prefix, self.label)
        if len(self.prepared) >= _MEMO_ENTRIES:
            self.prepared.clear()
        self.prepared[data] = prepared
        return prepared


class DecodedCopies:
    """tollway.cache.entry.decode, memoised: the node and worker stores hand back the same bytes
    object while a value is unchanged, so a hot copy is parsed once per process, not once per use.
    Entries are never mutated (answers copy their header lists)."""

    def __init__(self) -> None:
        self.memo: dict[bytes, Entry | Variants | None] = {}

    def __call__(self, data: bytes | None) -> Entry | Variants | None:
        if data is None:
            return None
        memo = self.memo
        found = memo.get(data)
        if found is not None:
            return found
        found = decode(data)
        if len(data) <= _MEMO_BYTES:  # large bodies: the copy would double their memory
            if len(memo) >= _MEMO_ENTRIES:
                memo.clear()
            memo[data] = found
        return found
