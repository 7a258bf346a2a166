"""proxy-cache: an RFC 9111 shared cache in front of a route's backend (docs/plugins/proxy-cache.md).

The rules are in `tollway.cache.rfc` (pure functions), the stores in `tollway.cache.store` and
`tollway.cache.redis_store`; this module only connects them to the exchange:

- access: look the request up. A usable copy answers at once (HIT, STALE); a stale one with validators
  turns the request conditional; a miss becomes the one request that fills the key while concurrent
  misses for it wait (coalescing). Unsafe methods are noted for invalidation.
- response: a 304 to our conditional refreshes the copy and answers from it; a 5xx answers stale when
  stale-if-error allows; a storable response is stored as its body streams to the client
  (`RequestContext.body_tap`). A successful unsafe request invalidates its URI, Location and Content-Location.
- `RequestContext.fallback`: the backend down, timing out or without a healthy target answers stale too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tollway.cache import keys, rfc, serve
from tollway.cache.entry import NO_CACHE, NO_STALE, REQUEST_ID, Entry, Variants, build_entry
from tollway.cache.stats import STATS
from tollway.plugins.base import HookResult, Plugin, PluginContext
from tollway.plugins.builtin.cache_capture import BodyCapture
from tollway.plugins.builtin.cache_capture import tags as body_tags
from tollway.plugins.builtin.cache_config import ProxyCacheConfig
from tollway.plugins.builtin.cache_hit import DecodedCopies, HitPath, request_key
from tollway.plugins.builtin.cache_refresh import refresh
from tollway.plugins.builtin.cache_status import StatusFields
from tollway.plugins.builtin.cache_stores import delete_async, open_store, put_async, release_lease, warn
from tollway.protocol.http1 import BODY_CHUNKED, BODY_LENGTH, BODY_NONE
from tollway.proxy.pdk import Response

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

log = logging.getLogger("tollway.plugins.proxy_cache")
_VAR = "proxy-cache"
_CONDITIONALS = (b"if-none-match", b"if-modified-since")
_CONSUMER = b":consumer"
Filled = tuple[bytes, Entry, "Variants | None"]


class _State:
    """One request's cache lookup, on `ex.vars`."""

    __slots__ = (
        "client_headers",
        "entry",
        "entry_key",
        "key",
        "label",
        "request_cc",
        "request_time",
        "revalidating",
        "variants",
    )

    def __init__(self, key: bytes, request_cc: rfc.Directives) -> None:
        self.key = key
        self.entry_key = key
        self.request_cc = request_cc
        self.request_time = time.time()
        self.entry: Entry | None = None
        self.variants: Variants | None = None
        self.revalidating = False
        self.label = "MISS"
        self.client_headers: rfc.Headers | None = None  # the request's own, when ours replaced them

    def request_headers(self, ex: RequestContext) -> rfc.Headers:
        return self.client_headers if self.client_headers is not None else ex.headers


class ProxyCache(Plugin[ProxyCacheConfig]):
    name = "proxy-cache"
    # Transformation band, late: after authentication, authorization and limits (a hit is still
    # checked and counted) and after request transformers; in the response phase, after response
    # transformers, so the copy stored is what clients get.
    priority = 510

    def __init__(self, config: ProxyCacheConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._store_factory: Callable[[], Any] = lambda: open_store(config)
        self._store: Any = None
        self._retry_open = 0.0
        self._methods = frozenset(m.encode() for m in config.methods)
        self._ignore = frozenset(config.ignore_query_params)
        self._extra_names = tuple(sorted(h.lower().encode() for h in config.key_headers)) + (
            (_CONSUMER,) if config.key_consumer else ()
        )
        self._fields = StatusFields(config.cache_status_name, config.status_header)
        # key -> the request filling it; resolves to what it stored (written key, entry, variants) or None
        self._inflight: dict[bytes, asyncio.Future[Filled | None]] = {}
        self._decode = DecodedCopies()
        # The pipeline runs `hits.access` (plain fresh hits answered by compiled code, the rest here)
        # unless no hit can take that path: GET not cached, an asynchronous store (Redis), or key parts
        # that make every copy a variant (the path would read the store twice for nothing).
        self.hits: HitPath | None = None
        if b"GET" in self._methods and config.store != "redis" and not self._extra_names:
            self.hits = HitPath(
                self.access,
                self._decode,
                self._ignore,
                config.sort_query,
                config.cache_status_name.encode(),
                config.status_header.encode() if config.status_header else None,
            )

    def hook(self, phase: str) -> Callable[[RequestContext], Any]:
        if phase == "access" and self.hits is not None:
            return self.hits.access
        return super().hook(phase)

    @property
    def store(self) -> Any:
        """The store, once `_open` succeeded (every path that uses it comes after access did)."""
        return self._store

    def _open(self) -> Any:
        """The store, opened in this worker on first use; None while it cannot be opened (retried
        every 10 s): the request then goes to the backend as if there were no cache."""
        store = self._store
        if store is None:
            if time.monotonic() < self._retry_open:
                return None
            try:
                store = self._store = self._store_factory()
                if self.hits is not None:
                    self.hits.store = store
            except Exception as exc:
                STATS.store_errors += 1
                self._retry_open = time.monotonic() + 10.0
                warn("cache store cannot be opened, requests go to the backend: %s", exc)
                return None
        return store

    # -- access -------------------------------------------------------------------------------------------
    def access(self, ex: RequestContext) -> HookResult:
        method = ex.method
        if method in rfc.UNSAFE_METHODS:
            if self._open() is not None:
                self._attach(ex, _State(self._key(ex, ex.path, ex.query), {}))
            return None
        if method not in self._methods:
            return None
        store = self._open()
        if store is None:
            self._fields.forwarded(ex, "BYPASS", "bypass")
            return None
        request_cc = rfc.request_directives(ex.headers)
        if self.config.ignore_client_no_cache:
            request_cc.pop("no-cache", None)
        state = _State(self._key(ex, ex.path, ex.query), request_cc)
        self._attach(ex, state)
        if store.is_async:
            return self._access_async(ex, state)
        try:
            entry = self._find_sync(ex, state)
        except Exception as exc:  # a broken store must never break the request
            return self._bypass(ex, state, exc)
        return self._decide(ex, state, entry, True)

    async def _access_async(self, ex: RequestContext, state: _State) -> Response | None:
        try:
            entry = await self._find_async(ex, state)
        except Exception as exc:
            return self._bypass(ex, state, exc)
        result = self._decide(ex, state, entry, True)
        if result is None or isinstance(result, Response):
            return result
        return await result

    def _bypass(self, ex: RequestContext, state: _State, exc: Exception) -> Response | None:
        """The store failed: the request goes to the backend (None), labelled BYPASS."""
        STATS.store_errors += 1
        warn("cache store failed, requests go to the backend: %s", exc)
        state.label = "BYPASS"
        ex.vars[_VAR] = None  # type: ignore[index]
        self._fields.forwarded(ex, "BYPASS", "bypass")
        return None

    def _decide(self, ex: RequestContext, state: _State, entry: Entry | None, may_wait: bool) -> HookResult:
        if entry is None:
            if "only-if-cached" in state.request_cc:
                return self._only_if_cached(ex, state)
            return self._miss(ex, state, may_wait)
        now = time.time()
        age = entry.age(now)
        if not state.request_cc and not entry.flags & NO_CACHE and age < entry.lifetime:
            return self._hit(ex, state, entry, age, "HIT")  # the common case: no parsing
        response_cc = entry.directives()
        swr = 0.0 if entry.flags & NO_STALE else entry.swr
        verdict = rfc.reuse(age, entry.lifetime, response_cc, state.request_cc, swr)
        if verdict == rfc.FRESH:
            return self._hit(ex, state, entry, age, "HIT")
        if verdict == rfc.STALE_SERVE:
            return self._hit(ex, state, entry, age, "STALE")
        if verdict == rfc.STALE_REVALIDATE:
            self._refresh_later(ex, state, entry)
            return self._hit(ex, state, entry, age, "STALE")
        if "only-if-cached" in state.request_cc:
            return self._only_if_cached(ex, state)
        state.entry = entry
        state.label = "EXPIRED"
        if entry.sie > 0 and not entry.flags & NO_STALE:
            ex.fallback = self._stale_on_failure
        validators = rfc.validators(entry.headers)
        if validators and "no-store" not in state.request_cc:
            if may_wait and self.config.coalesce and "no-cache" not in state.request_cc:
                waiting = self._inflight.get(state.entry_key)
                if waiting is not None:  # another request is revalidating this copy: wait for it
                    return self._follow(ex, state, waiting)
                self._lead(ex, state.entry_key)
            state.client_headers = ex.headers
            headers = [h for h in ex.headers if h[0].lower() not in _CONDITIONALS]
            ex.headers = headers + validators
            state.revalidating = True
            return None
        return self._miss(ex, state, may_wait)

    def _hit(self, ex: RequestContext, state: _State, entry: Entry, age: float, label: str) -> Response:
        if label == "HIT":
            STATS.hits += 1
        else:
            STATS.stale += 1
        ex.vars[_VAR] = None  # type: ignore[index]
        return self._answer(ex, entry, age, label, ex.headers)

    def _answer(
        self, ex: RequestContext, entry: Entry, age: float, label: str, request: rfc.Headers
    ) -> Response:
        """The gateway's answer from `entry` (tollway.cache.serve) with this request's own fields."""
        status, headers, body = serve.answer(entry, request, ex.method, age)
        if entry.flags & REQUEST_ID:  # the backend echoed the request id: this request's, not the copy's
            headers.append((b"X-Request-Id", ex.request_id))
        if ex.client.server_header is not None:  # the gateway adds its own
            headers = [h for h in headers if h[0].lower() != b"server"]
        headers += self._fields.answer(label, entry, age)
        return Response(status, body, headers)

    def _only_if_cached(self, ex: RequestContext, state: _State) -> Response:
        STATS.misses += 1
        ex.vars[_VAR] = None  # type: ignore[index]
        rid = ex.request_id.decode("latin-1")
        headers = [(b"Content-Type", b"application/json"), (b"X-Request-Id", ex.request_id)]
        headers += self._fields.answer("MISS", None)
        return Response(504, {"message": "not in the cache (only-if-cached)", "request_id": rid}, headers)

    # -- coalescing ----------------------------------------------------------------------------------
    def _miss(self, ex: RequestContext, state: _State, may_wait: bool) -> HookResult:
        if not self.config.coalesce or "no-cache" in state.request_cc or "no-store" in state.request_cc:
            return None
        if ex.method != b"GET":
            return None  # a HEAD miss is not stored: it fills nothing others could wait for
        key = state.entry_key
        waiting = self._inflight.get(key)
        if waiting is None:
            self._lead(ex, key)
            store = self.store
            if may_wait and hasattr(store, "lock"):  # the node store: one fill for all its workers
                try:
                    if not store.lock(key, self.config.coalesce_timeout):
                        return self._poll(ex, state)
                except Exception as exc:
                    return self._bypass(ex, state, exc)
                ex.on_finish(lambda _ex: release_lease(store, key))
            return None
        if not may_wait:
            return None
        return self._follow(ex, state, waiting)

    def _lead(self, ex: RequestContext, key: bytes) -> None:
        """This request fills `key`; misses for it in this worker wait until it ends."""
        self._inflight[key] = asyncio.get_running_loop().create_future()
        ex.on_finish(lambda _ex: self._release(key))

    def _release(self, key: bytes, filled: Filled | None = None) -> None:
        waiting = self._inflight.pop(key, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(filled)

    async def _follow(
        self, ex: RequestContext, state: _State, waiting: asyncio.Future[Filled | None]
    ) -> Response | None:
        """A miss while another request fills the key: wait for it, then answer from what it stored
        (in hand: no store read, so a Redis write still in flight does not matter) when the copy is the
        variant this request needs; else look again, or go to the backend."""
        STATS.coalesced += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), self.config.coalesce_timeout)
        if ex.done:
            return None
        filled = waiting.result() if waiting.done() else None
        if filled is not None:
            written, filled_entry, variants = filled
            if variants is not None:
                state.variants = variants
                state.entry_key = self._variant_key(ex, state.key, variants)
            if state.entry_key == written:
                return self._decide(ex, state, filled_entry, False)  # type: ignore[return-value]
        entry: Entry | None
        try:
            if self.store.is_async:
                entry = await self._find_async(ex, state)
            else:
                entry = self._find_sync(ex, state)
        except Exception as exc:
            return self._bypass(ex, state, exc)
        result = self._decide(ex, state, entry, False)
        return result  # type: ignore[return-value]  # may_wait=False: never an awaitable

    async def _poll(self, ex: RequestContext, state: _State) -> Response | None:
        """Another worker of the node fills this key: read the store until its copy is there (answer
        from it, and hand it to this worker's waiting misses) or its lease ends (then go to the backend
        as this worker's filling request)."""
        STATS.coalesced += 1
        loop = asyncio.get_running_loop()
        key = state.entry_key
        deadline = loop.time() + self.config.coalesce_timeout
        delay = 0.002
        store = self.store
        stale = state.entry.response_time if state.entry is not None else None
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            if ex.done:
                return None
            try:
                entry = self._find_sync(ex, state)
                if stale is not None and entry is not None and entry.response_time == stale:
                    entry = None  # still the stale copy this request is replacing
                if entry is None and store.locked(key):
                    continue
            except Exception as exc:
                return self._bypass(ex, state, exc)
            if entry is not None:
                self._release(key, (state.entry_key, entry, state.variants))
                return self._decide(ex, state, entry, False)  # type: ignore[return-value]
            break
        return None

    # -- lookups -------------------------------------------------------------------------------------------
    def _key(self, ex: RequestContext, path: str, query: str) -> bytes:
        return request_key(ex, path, query, self._ignore, self.config.sort_query)

    def _variant_key(self, ex: RequestContext, key: bytes, variants: Variants) -> bytes:
        values = []
        for name in variants.names:
            if name == _CONSUMER:
                consumer = ex.consumer
                values.append(consumer.id.encode() if consumer is not None else b"")
            else:
                values.append(rfc.normalise_field(rfc.field(ex.headers, name)))
        return keys.secondary_key(key, variants.nonce, values)

    def _found(self, ex: RequestContext, state: _State, data: bytes | None) -> Entry | Variants | None:
        found = self._decode(data)
        if isinstance(found, Variants):
            state.variants = found
            state.entry_key = self._variant_key(ex, state.key, found)
        return found

    def _find_sync(self, ex: RequestContext, state: _State) -> Entry | None:
        store = self.store
        found = self._found(ex, state, store.get(state.key))
        if isinstance(found, Variants):
            found = self._decode(store.get(state.entry_key))
        return found if isinstance(found, Entry) else None

    async def _find_async(self, ex: RequestContext, state: _State) -> Entry | None:
        store = self.store
        found = self._found(ex, state, await store.get(state.key))
        if isinstance(found, Variants):
            found = self._decode(await store.get(state.entry_key))
        return found if isinstance(found, Entry) else None

    def _attach(self, ex: RequestContext, state: _State) -> None:
        if ex.vars is None:
            ex.vars = {}
        ex.vars[_VAR] = state

    # -- response --------------------------------------------------------------------------------------
    def response(self, ex: RequestContext) -> None:
        state = ex.vars.get(_VAR) if ex.vars is not None else None
        if state is None:
            return
        head = ex.response_head
        assert head is not None
        if ex.method in rfc.UNSAFE_METHODS:
            self._invalidate(ex, state, head.status, head.headers)
            return
        entry = state.entry
        if entry is not None:
            if (
                head.status == 304
                and state.revalidating
                and self._revalidated(ex, state, entry, head.headers)
            ):
                return
            if head.status in rfc.ERROR_STATUS and self._serve_stale(ex, state, entry):
                return
        self._maybe_store(ex, state)

    def _revalidated(self, ex: RequestContext, state: _State, entry: Entry, update: rfc.Headers) -> bool:
        merged = rfc.freshen(entry.headers, update)
        if merged is None:
            return False
        kept = entry.flags & REQUEST_ID
        fresh = self._entry(entry.status, merged, entry.body, state.request_time, time.time(), update, kept)
        written, variants = self._put(ex, state, fresh, merged)
        self._release(state.entry_key, (written, fresh, variants))
        STATS.revalidated += 1
        ex.respond(self._answer(ex, fresh, fresh.initial_age, "REVALIDATED", state.request_headers(ex)))
        return True

    def _serve_stale(self, ex: RequestContext, state: _State, entry: Entry) -> bool:
        now = time.time()
        if entry.flags & NO_STALE or not rfc.stale_if_error_ok(entry.age(now), entry.lifetime, {}, entry.sie):
            return False
        ex.fallback = None
        ex.respond(self._stale_answer(ex, state, entry, now))
        return True

    def _stale_answer(self, ex: RequestContext, state: _State, entry: Entry, now: float) -> Response:
        STATS.stale += 1
        return self._answer(ex, entry, entry.age(now), "STALE", state.request_headers(ex))

    def _stale_on_failure(self, ex: RequestContext, error: BaseException) -> Response | None:
        """RequestContext.fallback: the backend failed (refused, reset, timed out, none healthy)."""
        state = ex.vars.get(_VAR) if ex.vars is not None else None
        entry = state.entry if state is not None else None
        if state is None or entry is None or getattr(error, "status", 500) not in (502, 503, 504):
            return None
        now = time.time()
        if not rfc.stale_if_error_ok(entry.age(now), entry.lifetime, {}, entry.sie):
            return None
        return self._stale_answer(ex, state, entry, now)

    def _entry(
        self,
        status: int,
        headers: rfc.Headers,
        body: bytes,
        sent: float,
        received: float,
        age_from: rfc.Headers | None = None,
        flags: int = 0,
    ) -> Entry:
        config = self.config
        policy = (
            config.heuristic_freshness,
            config.default_ttl,
            config.stale_while_revalidate,
            config.stale_if_error,
        )
        return build_entry(status, headers, body, sent, received, policy, age_from, flags)

    def _maybe_store(self, ex: RequestContext, state: _State) -> None:
        head = ex.response_head
        assert head is not None
        config = self.config
        headers = head.headers
        why = rfc.storable(
            ex.method,
            head.status,
            state.request_cc,
            rfc.directives_from(headers),
            headers,
            ex.header_bytes(b"authorization") is not None,
            config.heuristic_freshness,
            config.default_ttl,
        )
        if why is None and not config.cache_set_cookie and rfc.field(headers, b"set-cookie") is not None:
            why = "set-cookie"
        if why is None and ex.response_body_transform is not None:
            why = "transformed"  # the body the client gets is not the one that streams past
        kind = head.body_kind
        if why is None and kind not in (BODY_LENGTH, BODY_CHUNKED, BODY_NONE):
            why = "unframed"  # a body delimited by the connection's close: truncation is invisible
        if why is None and kind == BODY_LENGTH and head.content_length > config.max_object_size:
            why = "too large"
        STATS.misses += 1
        if why is not None:
            self._fields.forwarded(ex, state.label, _fwd(state), detail=why)
            return
        self._fields.forwarded(ex, state.label, _fwd(state), stored=True)
        status = head.status
        stored = list(headers)
        capture = BodyCapture(
            ex,
            kind,
            config.max_object_size,
            lambda body: self._store_response(ex, state, status, stored, body),
        )
        ex.body_tap = capture.feed

    def _store_response(
        self, ex: RequestContext, state: _State, status: int, headers: rfc.Headers, body: bytes
    ) -> None:
        stored = rfc.storable_fields(headers)
        entry = self._entry(status, stored, body, state.request_time, time.time(), headers)
        written, variants = self._put(ex, state, entry, headers)
        self._release(state.entry_key, (written, entry, variants))

    def _put(
        self, ex: RequestContext, state: _State, entry: Entry, headers: rfc.Headers
    ) -> tuple[bytes, Variants | None]:
        """Store `entry` (and its variants record); returns the key it went under and that record."""
        names = rfc.vary_names(headers) + self._extra_names
        key = state.key
        writes: list[tuple[bytes, bytes, float]] = []
        ttl = entry.keep_for(time.time(), self.config.keep_stale)
        variants: Variants | None = None
        if names:
            variants = state.variants
            if variants is None or variants.names != names:
                variants = Variants(names)
            writes.append((key, variants.encode(), max(ttl, self.config.keep_stale)))
            key = self._variant_key(ex, key, variants)
        writes.append((key, entry.encode(), ttl))
        tags = body_tags(headers)
        STATS.bytes_stored += len(entry.body)
        store = self.store
        if store.is_async:
            asyncio.get_running_loop().create_task(put_async(store, writes, tags))
            return key, variants
        try:
            for k, value, seconds in writes:
                store.put(k, value, seconds, tags)
        except Exception as exc:
            STATS.store_errors += 1
            warn("cache store failed to store a response: %s", exc)
        return key, variants

    def _invalidate(self, ex: RequestContext, state: _State, status: int, headers: rfc.Headers) -> None:
        """§4.4: a non-error answer to an unsafe request invalidates its URI, Location, Content-Location."""
        if not 200 <= status < 400:
            return
        host = ex.host.decode("latin-1").lower()
        if ":" in host and not host.endswith("]"):  # drop the port ("[::1]" has none)
            host = host.rpartition(":")[0]
        doomed = [state.key]
        for target in rfc.invalidated_targets(ex.method, status, headers, host):
            path, _, query = target.partition("?")
            doomed.append(self._key(ex, path, query))
        STATS.invalidations += len(doomed)
        store = self.store
        if store.is_async:
            asyncio.get_running_loop().create_task(delete_async(store, doomed))
            return
        try:
            for key in doomed:
                store.delete(key)
        except Exception as exc:
            STATS.store_errors += 1
            warn("cache store failed to invalidate: %s", exc)

    def _refresh_later(self, ex: RequestContext, state: _State, entry: Entry) -> None:
        """stale-while-revalidate: one background request per key refreshes the copy."""
        key = state.entry_key
        if key in self._inflight or ex.service is None:
            return
        self._inflight[key] = asyncio.get_running_loop().create_future()
        headers = [h for h in ex.headers if h[0].lower() not in _CONDITIONALS] + rfc.validators(entry.headers)
        task = asyncio.get_running_loop().create_task(
            refresh(ex, headers, self.config.max_object_size, self._refreshed(ex, state, entry))
        )
        task.add_done_callback(lambda _t: self._release(key))

    def _refreshed(self, ex: RequestContext, state: _State, entry: Entry) -> Any:
        sent = time.time()

        def done(status: int, headers: rfc.Headers, body: bytes | None) -> None:
            STATS.background_refreshes += 1
            if status == 304:
                merged = rfc.freshen(entry.headers, headers)
                if merged is not None:
                    kept = entry.flags & REQUEST_ID
                    fresh = self._entry(entry.status, merged, entry.body, sent, time.time(), headers, kept)
                    self._put(ex, state, fresh, merged)
                return
            config = self.config
            cc = rfc.directives_from(headers)
            why = rfc.storable(
                b"GET", status, {}, cc, headers, False, config.heuristic_freshness, config.default_ttl
            )
            if body is not None and why is None:
                stored = rfc.storable_fields(headers)
                self._put(ex, state, self._entry(status, stored, body, sent, time.time(), headers), headers)

        return done


def _fwd(state: _State) -> str:
    return "stale" if state.entry is not None else "uri-miss"
