"""One request through the gateway, from a routed request head to the last response byte.

An `Exchange` is created per request by the client connection (tollway.protocol.server), which feeds
it request parts as httptools parses them. The exchange routes the request, runs the plugin phases,
asks the service's cluster for a target, writes the request to a pooled upstream connection, and
relays the response back — streaming both bodies with backpressure, never buffering a whole body.
It is also the request context plugins receive (see tollway.plugins.base).

The hot path is plain method calls. A coroutine is only involved when a plugin awaits something or a
new upstream connection must be opened.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tollway.errors import (
    BodyTooLarge,
    CircuitBreakerOpen,
    ClientError,
    NoHealthyTarget,
    TollwayError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from tollway.protocol.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_UNTIL_CLOSE,
    LAST_CHUNK,
    ChunkedDecoder,
    ResponseHead,
    chunk,
    connection_listed_headers,
)
from tollway.proxy.responses import Response, error_response, serialize
from tollway.router import MethodNotAllowed, normalize_path
from tollway.upstream.retry import ON_ERROR, ON_TIMEOUT
from tollway.upstream.target import FAILED, NEUTRAL, OK

if TYPE_CHECKING:
    from tollway.protocol.server import ClientConnection
    from tollway.proxy.pipeline import Pipeline
    from tollway.proxy.snapshot import CompiledRoute, CompiledService, Snapshot
    from tollway.upstream.connection import UpstreamConnection
    from tollway.upstream.target import Target

# Request body framing, as the client sent it.
REQ_NONE, REQ_LENGTH, REQ_CHUNKED = 0, 1, 2
# How much request body is kept for a replay when no upstream says (a request not yet routed).
REPLAY_LIMIT = 65536
# Methods retried after the request was sent (RFC 9110 9.2.2); others only if the route allows.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_BUFFER_HIGH = 65536

_EMPTY_PARAMS: dict[str, str] = {}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
_HOSTS: dict[bytes, str] = {}  # Host header -> routing host (lowercase, no port); bounded below
# RFC 9110 7.2: uri-host [ ":" port ], where uri-host is an IP literal or a reg-name (no userinfo).
_HOST_VALUE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]{0,5})?")


def _route_host(host: bytes) -> str:
    """``API.Example.com:8000`` → ``api.example.com``; memoised because clients repeat their Host."""
    cached = _HOSTS.get(host)
    if cached is not None:
        return cached
    if _HOST_VALUE.fullmatch(host) is None:
        raise ClientError("invalid Host header")
    text = host.decode("latin-1").lower()
    name = text.rpartition(":")[0] if ":" in text and not text.endswith("]") else text  # "[::1]" has no port
    if len(_HOSTS) >= 4096:
        _HOSTS.clear()
    _HOSTS[host] = name
    return name


class RequestIds:
    """Request ids unique across workers and restarts: a random per-process prefix and a counter
    (32 hex digits, like nginx's $request_id), without the cost of a UUID per request."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: bytes) -> None:
        self._prefix = prefix
        self._counter = 0

    def next(self) -> bytes:
        self._counter += 1
        return b"%s%016x" % (self._prefix, self._counter)


class Exchange:
    __slots__ = (
        "_awaiting_body",
        "_body_buf",
        "_body_buffered",
        "_connect_task",
        "_dechunk",
        "_held",
        "_on_finish",
        "_outcome",
        "_pending_head",
        "_replay",
        "_resp_body",
        "_resp_extra",
        "_resp_headers",
        "_retried",
        "_retry_timer",
        "_tried",
        "body_done",
        "body_kind",
        "body_received",
        "body_tap",
        "bytes_sent",
        "client",
        "connection_header",
        "consumer",
        "content_length",
        "credential",
        "done",
        "expect_continue",
        "fallback",
        "headers",
        "host",
        "keep_alive",
        "max_body_size",
        "method",
        "params",
        "parent_span_id",
        "path",
        "pipeline",
        "query",
        "raw_path",
        "request_body_transform",
        "request_id",
        "response_body_transform",
        "response_head",
        "response_started",
        "retries",
        "route",
        "sampled",
        "service",
        "snapshot",
        "span_id",
        "start_time",
        "status",
        "target",
        "trace_id",
        "traceparent",
        "tracestate",
        "upgrade",
        "upstream",
        "upstream_path",
        "upstream_start",
        "upstream_time",
        "url",
        "vars",
        "version",
        "x_forwarded_for",
        "x_forwarded_host",
        "x_forwarded_proto",
    )

    def __init__(self, client: ClientConnection, snapshot: Snapshot) -> None:
        self.client = client
        self.snapshot = snapshot
        self.start_time = time.perf_counter()
        self.url = b""
        self.method = b""
        self.version = 1
        self.headers: list[tuple[bytes, bytes]] = []  # forwarded request headers, in order
        self.host = b""
        self.connection_header = b""
        self.upgrade = b""
        self.x_forwarded_for = b""
        self.x_forwarded_proto = b""
        self.x_forwarded_host = b""
        self.request_id = b""
        # W3C trace context (tollway.observability.tracecontext): the client's headers as received,
        # then this hop's ids, chosen when the upstream head is built (or when the request ends).
        self.traceparent = b""
        self.tracestate = b""
        self.trace_id = b""
        self.span_id = b""
        self.parent_span_id = b""
        self.sampled = False
        self.expect_continue = False
        self.keep_alive = True
        self.body_kind = REQ_NONE
        self.content_length = -1
        self.body_received = 0
        self.body_done = False
        self.path = ""
        self.raw_path = ""
        self.query = ""
        self.params = _EMPTY_PARAMS
        self.upstream_path = b""
        self.route: CompiledRoute | None = None
        self.service: CompiledService | None = None
        self.consumer: Any = None
        self.vars: dict[str, Any] | None = None
        # -- plugin support (tollway.plugins): see the section at the end of the class --
        self.pipeline: Pipeline | None = None  # the route's, or its consumer's once one is known
        self.credential: Any = None  # the credential an authentication plugin accepted
        self.max_body_size: int = client.max_body_size  # a plugin may lower it for this request
        self.request_body_transform: Callable[[bytes], bytes | None] | None = None
        self.response_body_transform: Callable[[bytes], bytes | None] | None = None
        # Set by a response hook: sees the backend's body bytes as they stream (framing included),
        # then None at its end (not called if the response is cut). A cache stores bodies with it.
        self.body_tap: Callable[[bytes | None], None] | None = None
        # Set by a request hook: may answer a failure (backend down, timeout, no healthy target)
        # before the gateway's error response does; a cache serves a stale copy with it.
        self.fallback: Callable[[Exchange, BaseException], Response | None] | None = None
        self._awaiting_body = False  # proceed() waits for a whole body to transform
        self._resp_body: list[bytes] | None = None  # a response body buffered for a transform
        self._resp_headers: list[tuple[bytes, bytes, bool]] | None = None  # added to the response
        self._resp_extra = b""  # those fields as header lines, once the backend's head is in
        self._on_finish: list[Callable[[Exchange], None]] | None = None  # see on_finish()
        self.target: Target | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_start = 0.0
        self.upstream_time = -1.0
        self.response_head: ResponseHead | None = None
        self.response_started = False
        self.status = 0
        self.bytes_sent = 0
        self.done = False
        self._body_buf: list[bytes] = []
        self._body_buffered = 0
        self._replay: list[bytes] | None = []
        self._retried = False  # the one replay after a stale pooled connection is used
        self.retries = 0  # retries on other targets (upstream retry policy)
        self._tried: list[Target] | None = None  # targets of earlier tries, once there is a retry
        self._held = False  # `target` was picked and not yet released to its cluster
        self._outcome = NEUTRAL  # how the current try is going, for passive health (upstream.target)
        self._retry_timer: asyncio.TimerHandle | None = None
        self._pending_head: bytes | None = None
        self._dechunk: ChunkedDecoder | None = None
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url.decode('latin-1')} status={self.status}>"

    # -- request head ------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The request head is complete and it is this request's turn: route it and run the phases."""
        try:
            if not self._parse_target():
                return
            if self.request_id == b"":
                self.request_id = self.client.ids.next()
            if not self._route():
                return
        except TollwayError as exc:
            self.fail(exc)
            return
        route = self.route
        assert route is not None
        pipeline = self.pipeline = route.pipeline
        if pipeline is not None:
            pipeline.run_request(self)  # continues with proceed(), maybe after an await
        else:
            self.proceed()

    def _parse_target(self) -> bool:
        url = self.url
        if url[:1] != b"/":
            url = self._absolute_form(url)
        raw_path, _, query = url.partition(b"?")
        raw = raw_path.decode("latin-1")
        path = normalize_path(raw)
        if path is None:
            raise ClientError("invalid request path")
        if url is not self.url:
            self.url = url  # absolute-form: forward the origin-form
        self.raw_path = path if path == raw else raw
        self.path = path
        self.query = query.decode("latin-1")
        return True

    def _absolute_form(self, url: bytes) -> bytes:
        """``GET http://host/path`` (RFC 9112 3.2.2): the URI's authority replaces Host."""
        lower = url[:8].lower()
        for scheme in (b"http://", b"https://"):
            if lower.startswith(scheme):
                rest = url[len(scheme) :]
                end = len(rest)
                for delimiter in (b"/", b"?"):
                    found = rest.find(delimiter)
                    if 0 <= found < end:
                        end = found
                authority, path = rest[:end], rest[end:]
                if not authority:
                    break
                self.host = authority
                return path if path[:1] == b"/" else b"/" + path
        if url == b"*" and self.method == b"OPTIONS":
            return b"/"
        raise ClientError("invalid request target")

    def _route(self) -> bool:
        snapshot = self.snapshot
        found = snapshot.router.match(
            _METHODS.get(self.method) or self.method.decode("latin-1"),
            _route_host(self.host),
            self.path,
            self.query,
            self.headers,
        )
        if found is None:
            self.respond(error_response(404, "no route matched", self.request_id.decode("latin-1")))
            return False
        if isinstance(found, MethodNotAllowed):
            allow = ", ".join(found.allowed).encode()
            rid = self.request_id.decode("latin-1")
            self.respond(error_response(405, "method not allowed", rid, [(b"Allow", allow)]))
            return False
        route = found.route
        self.route = route
        service = self.service = route.service
        self.params = found.params
        base = service.base_path
        if found.path is self.raw_path and not base:
            self.upstream_path = self.url  # forwarded exactly as received: no re-encoding
        else:
            path = base + found.path.encode("latin-1")
            self.upstream_path = path + b"?" + self.query.encode("latin-1") if self.query else path
        return True

    # -- forwarding ------------------------------------------------------------------------------------
    def proceed(self) -> None:
        """Plugins passed the request: send it to a target of the service's cluster."""
        if self.done:
            return
        if self.request_body_transform is not None and not self._transform_request_body():
            return  # waiting for the rest of the body (request_done proceeds), or failed
        service = self.service
        assert service is not None
        target = service.cluster.pick(self)
        if target is None:
            self.fail(NoHealthyTarget(f"no healthy target in upstream {service.cluster.name!r}"))
            return
        self.target = target
        self._held = True
        if self.expect_continue and not self.body_done and self.body_kind != REQ_NONE and self.version == 1:
            self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._connect(target)

    def _connect(self, target: Target) -> None:
        """Start a try on `target`: a pooled connection if one is idle, else a new one."""
        self.upstream_start = time.perf_counter()
        self._outcome = NEUTRAL
        conn = None if self.upgrade else target.pool.acquire()
        if conn is not None:
            self._send(conn)
        else:
            self._open_connection(target)

    def _open_connection(self, target: Target) -> None:
        service = self.service
        assert service is not None
        breaker = service.cluster.breaker
        if breaker is not None:
            limit = breaker.admit(service.cluster.pools, target.pool)
            if limit:
                self.fail(CircuitBreakerOpen(_breaker_message(service.cluster.name, limit), limit))
                return
            breaker.pending += 1
        task = asyncio.get_running_loop().create_task(target.pool.open(service.connect_timeout))
        self._connect_task = task
        task.add_done_callback(self._on_connected)

    def _on_connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self._connect_task = None
        service = self.service
        if service is not None and service.cluster.breaker is not None:
            service.cluster.breaker.pending -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._try_failed(exc if isinstance(exc, UpstreamError) else UpstreamError(str(exc)), False)
            return
        conn = task.result()
        if self.done:  # the client went away while we connected: keep the fresh connection warm
            conn.pool.release(conn)
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        service = self.service
        target = self.target
        assert service is not None and target is not None
        self.upstream = conn
        conn.start(self, self.method, service.read_timeout, service.write_timeout)
        head = self._build_request_head(service, target)
        body = self._body_buf
        if body:
            self._body_buf = []
            self._body_buffered = 0
            conn.write(b"".join([head, *body]))
            self.client.resume_reading_for(self)
        else:
            conn.write(head)
        if self.body_done:
            if self.body_kind == REQ_CHUNKED:
                conn.write(LAST_CHUNK)
        elif self.body_kind != REQ_NONE:
            # The body comes at the client's pace (the client body timeout watches that); the read
            # timeout starts after it, and the write timeout whenever the backend stops taking it.
            conn.deadline.disarm()

    def _build_request_head(self, service: CompiledService, target: Target) -> bytes:
        host_mode = service.host_mode
        if host_mode == 0:
            host = target.host_header
        elif host_mode == 1:
            host = self.host or target.host_header
        else:
            host = service.host_value
        parts = [self.method, b" ", self.upstream_path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        headers = self.headers
        if self.connection_header:
            listed = connection_listed_headers(self.connection_header)
            headers = [(n, v) for n, v in headers if n.lower() not in listed]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        client = self.client
        if client.trusted:
            xff = self.x_forwarded_for + b", " + client.peer_ip if self.x_forwarded_for else client.peer_ip
            proto = self.x_forwarded_proto or client.scheme
            fwd_host = self.x_forwarded_host or self.host
        else:
            xff, proto, fwd_host = client.peer_ip, client.scheme, self.host
        parts += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
        if fwd_host:
            parts += (b"X-Forwarded-Host: ", fwd_host, b"\r\n")
        parts += (b"X-Request-Id: ", self.request_id, b"\r\n")
        self.snapshot.trace.add_header(self, parts)  # traceparent, tracestate
        if self.upgrade:
            parts += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade, b"\r\n")
        kind = self.body_kind
        if kind == REQ_LENGTH:
            parts.append(b"Content-Length: %d\r\n\r\n" % self.content_length)
        elif kind == REQ_CHUNKED:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    # -- request body (called by the client connection as httptools parses it) -----------------------
    def request_body(self, data: bytes) -> None:
        """Called from the parser: an error raised here reaches the client connection's `_reject`,
        which answers it in this request's turn (a queued request must not answer before its turn)."""
        if self.done:
            return
        self.body_received += len(data)
        limit = self.max_body_size
        if limit and self.body_received > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        framed = chunk(data) if self.body_kind == REQ_CHUNKED else data
        replay = self._replay
        if replay is not None:
            service = self.service
            limit = service.cluster.retry.replay_limit if service is not None else REPLAY_LIMIT
            if self.body_received <= limit:
                replay.append(framed)
            else:
                self._replay = None
        conn = self.upstream
        if conn is not None:
            conn.write(framed)
        else:
            self._body_buf.append(framed)
            self._body_buffered += len(framed)
            if self._body_buffered > _BUFFER_HIGH and not self._awaiting_body:
                self.client.pause_reading_for(self)

    def request_done(self) -> None:
        self.body_done = True
        if self._awaiting_body:
            self._awaiting_body = False
            self.proceed()  # the whole body is here: transform it and forward
            return
        conn = self.upstream
        if conn is not None and not self.done:
            if self.body_kind == REQ_CHUNKED:
                conn.write(LAST_CHUNK)
            if self.body_kind != REQ_NONE and conn.sink is self:
                conn.deadline.arm(conn.read_timeout, "read")

    # -- response (the upstream connection's sink interface) ---------------------------------------
    def upstream_head(self, head: ResponseHead, raw: bytes) -> None:
        if head.status < 200:
            # 100 is ours to send (we answered Expect ourselves); others (103) pass on to HTTP/1.1 clients.
            if head.status != 100 and self.version == 1:
                self.client.write(head.to_client(b""))
            return
        self.upstream_time = time.perf_counter() - self.upstream_start
        service = self.service
        if service is not None:
            cluster = service.cluster
            status = head.status
            self._outcome = FAILED if cluster.failure_status(status) else OK
            if cluster.retry.retries_status(status) and self._retry_status():
                return
        self.response_head = head
        self.status = head.status
        pipeline = self.pipeline
        if pipeline is not None and pipeline.has_response:
            error = pipeline.run_response(self)
            if error is not None:
                self._release_upstream_on_error()
                self.fail(error)
                return
            if self.done:
                return  # a response hook answered instead (ex.respond): the backend's response is dropped
        if self._resp_headers is not None:
            self._resp_extra = self._response_fields(head)
        if self.response_body_transform is not None:
            self._resp_body = []  # the head goes out with the transformed body (upstream_complete)
            return
        self._pending_head = self._build_response_head(head, raw)

    def _response_fields(self, head: ResponseHead) -> bytes:
        """Header lines plugins added, for the head's `extra`: appending bytes keeps the head on its
        fast path (re-serialised only when a field replaces one the backend sent)."""
        parts: list[bytes] = []
        for name, value, replace in self._resp_headers or ():
            if replace:
                lname = name.lower()
                headers = head.headers
                headers[:] = [h for h in headers if h[0].lower() != lname]
            parts += (name, b": ", value, b"\r\n")
        return b"".join(parts)

    def _build_response_head(self, head: ResponseHead, raw: bytes) -> bytes:
        kind = head.body_kind
        extra = self._resp_extra
        if kind == BODY_CHUNKED or kind == BODY_UNTIL_CLOSE:  # noqa: SIM109 - two int compares when compiled
            if self.version == 1:
                extra += b"Transfer-Encoding: chunked\r\n"  # chunks pass through, or we frame them
            else:
                self.keep_alive = False  # an HTTP/1.0 client learns the end from the close
                if kind == BODY_CHUNKED:
                    self._dechunk = ChunkedDecoder(collect=True)
        if self.client.draining or self.upgrade:
            self.keep_alive = False  # an upgrade the backend refused: the client connection is spent
        if not self.keep_alive:
            extra += b"Connection: close\r\n"
        elif self.version == 0:
            extra += b"Connection: keep-alive\r\n"
        return head.to_client(extra)

    def upstream_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.body_tap is not None:
            self.body_tap(data)
        if self._resp_body is not None:
            self._resp_body.append(data)
            return
        head = self.response_head
        if head is not None and head.body_kind == BODY_UNTIL_CLOSE and self.version == 1:
            data = chunk(data)
        elif self._dechunk is not None:
            decoder = self._dechunk
            decoder.feed(data)
            data = b"".join(decoder.payload)
            decoder.payload.clear()
        pending = self._pending_head
        if pending is not None:
            self._pending_head = None
            self.response_started = True
            data = pending + data
        self.bytes_sent += len(data)
        self.client.write(data)

    def upstream_flush(self) -> None:
        if self._resp_body is not None:
            return
        pending = self._pending_head
        if pending is not None:
            self._pending_head = None
            self.response_started = True
            self.bytes_sent += len(pending)
            self.client.write(pending)

    def upstream_complete(self) -> None:
        if self.body_tap is not None:
            tap, self.body_tap = self.body_tap, None
            tap(None)
        if self._resp_body is not None and not self._transform_response_body():
            return  # the transform failed: answered 500
        conn = self.upstream
        head = self.response_head
        close_delimited = head is not None and head.body_kind == BODY_UNTIL_CLOSE
        tail = LAST_CHUNK if close_delimited and self.version == 1 else b""
        pending = self._pending_head
        if pending is not None:
            self._pending_head = None
            self.response_started = True
            tail = pending + tail
        if tail:
            self.bytes_sent += len(tail)
            self.client.write(tail)
        if conn is not None:
            self.upstream = None
            if not self.body_done:
                conn.keep_alive = False  # the request body was not all sent: the connection is unusable
            conn.pool.release(conn)
        if not self.body_done:
            self.keep_alive = False  # unread request body on the client connection
        self._finish()

    def upstream_failed(self, error: UpstreamError, replayable: bool) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.pool.active -= 1
        if replayable and not self._retried and not self.response_started and self._can_replay():
            # A stale pooled connection (closed by the backend as we reused it): nothing reached the
            # backend, so once more on a fresh connection to the same target, whatever the method.
            self._retried = True
            self._body_buf = list(self._replay or ())
            target = self.target
            assert target is not None
            self._open_connection(target)
            return
        self._try_failed(error, True)

    # -- retries (the upstream's retry policy; docs/upstreams.md) ---------------------------------------
    def _try_failed(self, error: UpstreamError, sent: bool) -> None:
        """A try failed before its response reached the client: retry elsewhere, or answer the error."""
        if self.done:
            return
        self._outcome = FAILED
        if not self._retry(error, sent):
            self.fail(error)

    def _retry(self, error: UpstreamError, sent: bool) -> bool:
        service = self.service
        if service is None or self.response_head is not None or self.response_started:
            return False
        policy = service.cluster.retry
        if self.retries >= policy.attempts:
            return False
        if not policy.on & (ON_TIMEOUT if isinstance(error, UpstreamTimeout) else ON_ERROR):
            return False
        if sent and not self._idempotent():
            return False
        # A refused connection put no load on any backend: retrying it costs the budget nothing.
        free = not sent and isinstance(error, UpstreamConnectError)
        return self._can_replay() and self._retry_elsewhere(FAILED, free)

    def _retry_status(self) -> bool:
        """The response head carries a status the policy retries; it has not reached the client."""
        service = self.service
        assert service is not None
        if self.retries >= service.cluster.retry.attempts or not self._idempotent() or not self._can_replay():
            return False
        conn = self.upstream
        if conn is None:
            return False
        self.upstream = None
        if not self._retry_elsewhere(self._outcome, False):
            self.upstream = conn  # no retry after all: this response goes to the client
            return False
        conn.pool.discard(conn)  # the rest of that response is not wanted
        return True

    def _retry_elsewhere(self, outcome: int, free: bool) -> bool:
        """Release the target that failed and start the next try on another one, after a backoff.
        Unless `free`, the retry budget must allow it."""
        service = self.service
        failed = self.target
        assert service is not None and failed is not None
        cluster = service.cluster
        upstream = cluster.upstream
        tried = self._tried
        if tried is None:
            tried = self._tried = [failed]
        else:
            tried.append(failed)
        self._release_target(outcome)
        target = cluster.pick_retry(self, tried)
        if target is None:
            return False
        if not free and not upstream.budget.withdraw():
            upstream.retries_refused += 1
            cluster.release(target, self, NEUTRAL, -1.0)
            return False
        upstream.retries += 1
        self.retries += 1
        self.target = target
        self._held = True
        self._outcome = NEUTRAL
        self.upstream_time = -1.0
        self._body_buf = list(self._replay or ())
        self._body_buffered = 0
        delay = cluster.retry.backoff(self.retries)
        if delay > 0:
            self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry_now)
        else:
            self._retry_now()
        return True

    def _retry_now(self) -> None:
        self._retry_timer = None
        target = self.target
        if self.done or target is None:
            return
        self._connect(target)

    def _idempotent(self) -> bool:
        if self.method in _IDEMPOTENT:
            return True
        route = self.route
        return route is not None and route.retry_non_idempotent

    def _release_target(self, outcome: int) -> None:
        target = self.target
        service = self.service
        if self._held and target is not None and service is not None:
            self._held = False
            service.cluster.release(target, self, outcome, self.upstream_time)

    def upstream_upgraded(self, head: ResponseHead, raw: bytes, rest: bytes) -> None:
        if not self.upgrade:
            self.fail(UpstreamError("upstream switched protocols without being asked"))
            return
        self.status = 101
        self.upstream_time = time.perf_counter() - self.upstream_start
        self.response_head = head
        self.response_started = True
        conn = self.upstream
        assert conn is not None
        self.upstream = None  # the connection now belongs to the tunnel
        conn.pool.active -= 1
        self._release_target(OK)  # the request is done; the tunnel is not a request in flight
        self.client.start_tunnel(self, conn, raw + rest)

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading_for(self)

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading_for(self)

    def _can_replay(self) -> bool:
        if self.body_kind == REQ_NONE:
            return True
        return self.body_done and self._replay is not None

    # -- endings ------------------------------------------------------------------------------------
    def respond(self, response: Response) -> None:
        """Answer from the gateway itself (an error, a 404, a plugin's short-circuit)."""
        if self.done:
            return
        if self.response_started:
            self.client.abort()  # too late for a clean answer: the client sees a cut response
            self._finish()
            return
        if not self.body_done and self.body_kind != REQ_NONE:
            self.keep_alive = False  # we will not read the rest of this request's body
        if self.client.draining:
            self.keep_alive = False
        if self._resp_headers is not None:
            headers = list(response.headers)  # never edit the plugin's (maybe shared) Response
            self._add_response_headers(headers)
            response = Response(response.status, response.body, headers)
        self.status = response.status
        self.response_started = True
        data = serialize(response, self.keep_alive, self.method == b"HEAD", self.client.server_header)
        self.bytes_sent += len(data)
        self.client.write(data)
        self._release_upstream_on_error()
        self._finish()

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        if isinstance(error, TollwayError):
            status, message = error.status, error.message
        else:  # a bug or a plugin's exception: logged with its traceback, answered 500
            self.client.worker.log_exception("request failed", error, self)
            status, message = 500, "internal gateway error"
        if isinstance(error, ClientError):
            self.keep_alive = False
        if isinstance(error, UpstreamError):
            self.client.worker.upstream_error(self, error)
        if self.fallback is not None and not self.response_started and self._fall_back(error):
            return
        rid = self.request_id.decode("latin-1") if self.request_id else self.client.ids.next().decode()
        if not self.request_id:
            self.request_id = rid.encode()
        headers = error.headers if isinstance(error, TollwayError) else None
        self.respond(error_response(status, message, rid, headers))

    def _fall_back(self, error: BaseException) -> bool:
        fallback, self.fallback = self.fallback, None
        assert fallback is not None
        try:
            response = fallback(self, error)
        except Exception as exc:
            self.client.worker.log_exception("fallback failed", exc, self)
            return False
        if response is None:
            return False
        self._release_upstream_on_error()
        self.respond(response)
        return True

    def abort(self) -> None:
        """The client went away: stop everything, keep nothing half-used."""
        if self.done:
            return
        if self.status == 0:
            self.status = 499  # nginx's "client closed request"
        self._release_upstream_on_error()
        if self._connect_task is not None:
            pass  # _on_connected sees `done` and returns the fresh connection to the pool
        self._finish()

    def _release_upstream_on_error(self) -> None:
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.pool.discard(conn)

    def _finish(self) -> None:
        self.done = True
        timer = self._retry_timer
        if timer is not None:
            self._retry_timer = None
            timer.cancel()
        pipeline = self.pipeline
        if pipeline is not None and pipeline.has_log:
            pipeline.run_log(self)
        if self._on_finish is not None:
            self._run_on_finish()
        if self._held:
            self._release_target(self._outcome)
        self.client.exchange_finished(self)

    def on_finish(self, callback: Callable[[Exchange], None]) -> None:
        """Have `callback(ex)` run once when this request ends, however it ends (response sent, gateway
        answer, client gone): for what must be released even if a later plugin or the consumer's own
        pipeline takes over (a concurrency slot). Runs after the log phase; exceptions are logged."""
        if self._on_finish is None:
            self._on_finish = [callback]
        else:
            self._on_finish.append(callback)

    def _run_on_finish(self) -> None:
        callbacks = self._on_finish or ()
        self._on_finish = None
        for callback in callbacks:
            try:
                callback(self)
            except Exception as exc:
                self.client.worker.log_exception("on_finish callback failed", exc, self)

    # -- conveniences for plugins and logs ----------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def get_header(self, name: str) -> str | None:
        """The first value of a request header (case-insensitive), as sent by the client."""
        key = name.lower().encode("latin-1")
        special = _SPECIAL_GETTERS.get(key)
        if special is not None:
            value = getattr(self, special)
            return value.decode("latin-1") if value else None
        for hname, hvalue in self.headers:
            if hname.lower() == key:
                return hvalue.decode("latin-1")
        return None

    def set_header(self, name: str, value: str) -> None:
        """Replace (or add) a request header forwarded to the backend (ValueError if either is not a
        valid header field name or value: CR, LF, NUL and other control characters never pass)."""
        self.remove_header(name)
        self.headers.append(header_field(name, value))

    def add_header(self, name: str, value: str) -> None:
        self.headers.append(header_field(name, value))

    def remove_header(self, name: str) -> None:
        key = name.lower().encode("latin-1")
        self.headers = [(n, v) for n, v in self.headers if n.lower() != key]

    @property
    def client_ip(self) -> str:
        return self.client.peer_ip.decode("latin-1")

    # -- plugin support (tollway.plugins; documented in docs/plugins/writing-plugins.md) ----------------
    def header_bytes(self, lname: bytes) -> bytes | None:
        """The first value of a forwarded request header; `lname` is the lowercase name as bytes.
        (Host, X-Forwarded-* and X-Request-Id are attributes, not in the forwarded list.)"""
        for name, value in self.headers:
            if name.lower() == lname:
                return value
        return None

    def pop_header(self, lname: bytes) -> bytes | None:
        """Remove every field named `lname` (lowercase bytes) from the forwarded request headers and
        return the first value, or None (then nothing changes)."""
        headers = self.headers
        found: bytes | None = None
        for i in range(len(headers)):
            name, value = headers[i]
            if name.lower() == lname:
                found = value
                self.headers = headers[:i] + [h for h in headers[i + 1 :] if h[0].lower() != lname]
                break
        return found

    def set_query(self, query: str) -> None:
        """Replace the query string forwarded to the backend (already encoded, without the "?")."""
        if _BAD_QUERY.search(query) is not None:
            raise ValueError("a query string must be encoded: no spaces, control characters or #")
        path = self.upstream_path.partition(b"?")[0]
        self.query = query
        self.upstream_path = path + b"?" + query.encode("latin-1") if query else path

    def add_response_header(self, name: str, value: str) -> None:
        """Add a header to whatever response this request gets (the backend's or the gateway's)."""
        self._response_header(name, value, False)

    def set_response_header(self, name: str, value: str) -> None:
        """Like add_response_header, but replacing any field of that name the response has."""
        self._response_header(name, value, True)

    def add_response_fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Add header fields the caller built itself, already valid (names are tokens, values have no
        control characters): no per-request validation, for fields a plugin makes from numbers."""
        extra = self._resp_headers
        if extra is None:
            extra = self._resp_headers = []
        for name, value in fields:
            extra.append((name, value, False))

    def _response_header(self, name: str, value: str, replace: bool) -> None:
        field = header_field(name, value)
        extra = self._resp_headers
        if extra is None:
            extra = self._resp_headers = []
        extra.append((field[0], field[1], replace))

    def _add_response_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value, replace in self._resp_headers or ():
            if replace:
                lname = name.lower()
                headers[:] = [h for h in headers if h[0].lower() != lname]
            headers.append((name, value))

    def buffer_request_body(self, transform: Callable[[bytes], bytes | None], max_size: int) -> bool:
        """Have `transform(body)` rewrite the whole request body before it is forwarded (it returns the
        new body, or None to keep it). Only bodies with a Content-Length of at most `max_size` are
        buffered; returns False (and the body streams untouched) otherwise. Call it in rewrite/access."""
        if self.body_kind != REQ_LENGTH or self.content_length > max_size or self.upstream is not None:
            return False
        previous = self.request_body_transform
        if previous is None:
            self.request_body_transform = transform
        else:  # a second plugin transforms what the first produced
            self.request_body_transform = lambda body: transform(previous(body) or body)
        return True

    def buffer_response_body(self, transform: Callable[[bytes], bytes | None], max_size: int) -> bool:
        """The same for the response body, from a response hook: only responses with a Content-Length
        of at most `max_size` are buffered; chunked or larger ones stream through untouched (False)."""
        head = self.response_head
        if head is None or head.body_kind != BODY_LENGTH or head.content_length > max_size:
            return False
        previous = self.response_body_transform
        if previous is None:
            self.response_body_transform = transform
        else:
            self.response_body_transform = lambda body: transform(previous(body) or body)
        return True

    def _transform_request_body(self) -> bool:
        """Before forwarding: True to go on; False while the body is still arriving or on failure."""
        if not self.body_done:
            self._awaiting_body = True
            if self.expect_continue:
                self.expect_continue = False
                self.client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.client.resume_reading_for(self)
            return False
        transform = self.request_body_transform
        self.request_body_transform = None
        if transform is None:
            return True
        body = b"".join(self._body_buf)
        try:
            new = transform(body)
        except Exception as exc:
            self.fail(exc)
            return False
        if new is not None and new != body:
            self._body_buf = [new]
            self._body_buffered = len(new)
            self._replay = [new]
            self.content_length = len(new)
        return True

    def _transform_response_body(self) -> bool:
        chunks = self._resp_body or []
        self._resp_body = None
        transform = self.response_body_transform
        head = self.response_head
        assert transform is not None and head is not None
        body = b"".join(chunks)
        try:
            new = transform(body)
        except Exception as exc:
            self.fail(exc)
            return False
        if new is not None and new != body:
            headers = head.headers
            headers[:] = [h for h in headers if h[0].lower() != b"content-length"]
            headers.append((b"Content-Length", b"%d" % len(new)))
            body = new
        self._pending_head = self._build_response_head(head, head.raw) + body
        return True


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # HTAB and obs-text allowed (RFC 9110 5.5)
_BAD_QUERY = re.compile(r"[\x00-\x20\x7f#]")


def header_field(name: str, value: str) -> tuple[bytes, bytes]:
    """A request or response header field as bytes, or ValueError: a name that is not a token or a value
    with CR, LF, NUL or another control character would let a value inject headers or split messages."""
    bname = name.encode("latin-1")
    value = value.strip(" \t")
    try:
        bvalue = value.encode("latin-1")  # what get_header decoded comes back unchanged
    except UnicodeEncodeError:
        bvalue = value.encode("utf-8")
    if _TOKEN.fullmatch(bname) is None:
        raise ValueError(f"invalid header name {name!r}")
    if _FIELD_VALUE.fullmatch(bvalue) is None:
        raise ValueError(f"invalid value for header {name!r}: control characters are not allowed")
    return bname, bvalue


def _breaker_message(upstream: str, limit: str) -> str:
    if limit == "max-connections":
        return f"upstream {upstream!r} is at its connection limit (circuit breaker: max_connections)"
    return (
        f"upstream {upstream!r} has too many requests waiting for a connection "
        "(circuit breaker: max_pending_requests)"
    )


_SPECIAL_GETTERS = {
    b"host": "host",
    b"x-request-id": "request_id",
    b"x-forwarded-for": "x_forwarded_for",
    b"x-forwarded-proto": "x_forwarded_proto",
    b"x-forwarded-host": "x_forwarded_host",
    b"upgrade": "upgrade",
    b"connection": "connection_header",
    b"traceparent": "traceparent",
    b"tracestate": "tracestate",
}

__all__ = ["BODY_LENGTH", "Exchange", "header_field"]
