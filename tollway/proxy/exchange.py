"""One request through the gateway, from a routed request head to the last response byte.

An `Exchange` is created per request by the client connection (tollway.proxy.server), which feeds
it request parts as httptools parses them. The exchange routes the request, runs the plugin phases,
asks the service's cluster for a target, writes the request to a pooled upstream connection, and
relays the response back — streaming both bodies with backpressure, never buffering a whole body.
Plugins receive it as its documented base class, `RequestContext` (tollway.proxy.pdk); the try/retry/
replay state machine is a base class, `UpstreamTries` (tollway.proxy.tries), and so is the request
body's side, `RequestBody` (tollway.proxy.request_body): one object per request, in small parts.

The hot path is plain method calls. A coroutine is only involved when a plugin awaits something or a
new upstream connection must be opened.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Final

from tollway.errors import (
    ClientError,
    NoHealthyTarget,
    TollwayError,
    UpstreamError,
)
from tollway.protocol.forwarded import forwarded_element
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
from tollway.protocol.request import REQ_CHUNKED, REQ_LENGTH, REQ_NONE, SPAN_ID_AT, TRACE_ID_AT
from tollway.proxy.forwarded import stripped_prefix
from tollway.proxy.match_memo import remember
from tollway.proxy.pdk import ADD, LINES, REMOVE
from tollway.proxy.request_body import RequestBody
from tollway.proxy.request_ids import RID_AT, RID_NAME, RequestIds
from tollway.proxy.responses import error_response
from tollway.router import MethodNotAllowed, normalize_path
from tollway.upstream.target import FAILED, OK

_perf_counter: Final = time.perf_counter  # bound once: no module attribute lookup per request

if TYPE_CHECKING:
    from tollway.proxy.server import ClientConnection
    from tollway.proxy.snapshot import CompiledService, Snapshot
    from tollway.upstream.connection import UpstreamConnection
    from tollway.upstream.target import Target

# Final names: compiled code reads them directly instead of looking them up in the module by name.
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
_HOSTS: Final[dict[bytes, str]] = {}  # Host header -> routing host (lowercase, no port); bounded below
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


class Exchange(RequestBody):
    """One request: its head (`RequestHead`), its plugin-facing context (`RequestContext`, the PDK), its
    tries (`UpstreamTries`), its body (`RequestBody`) and, here, the routing, the forwarding and the
    response relay."""

    __slots__ = (
        "_dechunk",
        "_pending_head",
        "_resp_body",
        "_resp_extra",
        "_rid",
        "_rid_line",
        "_span_id",
        "_trace_id",
        "forwarded_prefix",
        "parent_span_id",
        "sampled",
        "trace_line",
    )

    def __init__(self, client: ClientConnection, snapshot: Snapshot) -> None:
        super().__init__(client, snapshot)
        # W3C trace context (tollway.observability.tracecontext): this hop's traceparent line, chosen
        # when the upstream head is built (or when the request ends); `trace_id` and `span_id` are read
        # from it when asked for.
        self.trace_line = b""
        self._trace_id = b""
        self._span_id = b""
        self.parent_span_id = b""
        self.sampled = False
        self._rid: bytes | None = None  # the request id we made, the id part of `_rid_line`
        self._rid_line = b""  # "X-Request-Id: <_rid>\r\n"
        self.forwarded_prefix = b""  # what strip_path removed, when X-Forwarded-Prefix is on
        self._resp_body: list[bytes] | None = None  # a response body buffered for a transform
        self._resp_extra = b""  # the fields plugins added, as header lines, once the backend's head is in
        self._pending_head: bytes | None = None
        self._dechunk: ChunkedDecoder | None = None

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url.decode('latin-1')} status={self.status}>"

    # -- W3C trace id and this hop's span id (hex digits; b"" until chosen), read from the traceparent
    # line only when something asks (the access log, the span export)
    @property
    def trace_id(self) -> bytes:
        if not self._trace_id and self.trace_line:
            self._trace_id = self.trace_line[TRACE_ID_AT : TRACE_ID_AT + 32]
        return self._trace_id

    @trace_id.setter
    def trace_id(self, value: bytes) -> None:
        self._trace_id = value

    @property
    def span_id(self) -> bytes:
        if not self._span_id and self.trace_line:
            self._span_id = self.trace_line[SPAN_ID_AT : SPAN_ID_AT + 16]
        return self._span_id

    @span_id.setter
    def span_id(self, value: bytes) -> None:
        self._span_id = value

    # -- request head ------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The request head is complete and it is this request's turn: route it and run the phases."""
        if self.request_id == b"":  # (a client's own X-Request-Id is kept)
            line = self._rid_line = self.client.ids.next_line()
            self.request_id = self._rid = line[RID_AT:-2]
        key = (self.method, self.host, self.url)
        known = self.snapshot.matches.get(key)
        if known is not None:
            known.apply(self)  # seen before: no target parsing, no route matching
        elif not self._parse_and_route(key):
            return
        route = self.route
        assert route is not None
        pipeline = self.pipeline = route.pipeline
        if pipeline is not None:
            pipeline.run_request(self)  # continues with proceed(), maybe after an await
        else:
            self.proceed()

    def _parse_and_route(self, key: tuple[bytes, bytes, bytes]) -> bool:
        try:
            self._parse_target()
            return self._route(key)
        except TollwayError as exc:
            self.fail(exc)
            return False

    def _parse_target(self) -> None:
        url = self.url
        if url[:1] != b"/":
            url = self._absolute_form(url)
        raw = url.decode("latin-1")
        if "?" in raw:  # (a str search: `in` on bytes first tries its operand as an int, and fails)
            raw, _, self.query = raw.partition("?")
        path = normalize_path(raw)
        if path is None:
            raise ClientError("invalid request path")
        if url is not self.url:
            self.url = url  # absolute-form: forward the origin-form
        self.raw_path = path if path == raw else raw
        self.path = path

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

    def _route(self, key: tuple[bytes, bytes, bytes]) -> bool:
        snapshot = self.snapshot
        client = self.client
        host = self.host
        if host == client.route_host_of:
            route_host = client.route_host
        else:
            route_host = client.route_host = _route_host(host)
            client.route_host_of = host
        found = snapshot.router.match(
            _METHODS.get(self.method) or self.method.decode("latin-1"),
            route_host,
            self.path,
            self.query,
            self.headers,
            client.scheme,
            client.sni,
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
            if route.strips_prefix and self.snapshot.forwarded is not None:
                self.forwarded_prefix = stripped_prefix(self.path, found.path)
        if found.fixed:
            remember(self, key, route_host)  # the match memo, at the second sighting
        return True

    # -- forwarding ------------------------------------------------------------------------------------
    def proceed(self) -> None:
        """Plugins passed the request: send it to a target of the service's cluster."""
        if self.done:
            return
        if self.request_body_transform is not None and not self._transform_request_body():
            return  # waiting for the rest of the body (request_done proceeds), or failed
        if self.body_kind == REQ_CHUNKED and not self.chunk_parsed and not self.body_done:
            self._hold_for_first_chunk()
            return
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
        # Few pieces: bytes.join pays for each one (~135 instructions) and allocates its table beyond
        # ten of them. A request without ordinary headers has 8: method, " ", path, the Host line,
        # the X-Forwarded-* lines, the X-Request-Id line, the traceparent line, the last CRLF.
        host_mode = service.host_mode
        if host_mode == 0:
            line = target.host_line  # " HTTP/1.1\r\nHost: <target>\r\n", built once per target
        else:
            host = (self.host or target.host_header) if host_mode == 1 else service.host_value
            line = b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        parts = [self.method, b" ", self.upstream_path, line]
        headers = self.headers
        if self.connection_header:
            listed = connection_listed_headers(self.connection_header)
            headers = [(n, v) for n, v in headers if n.lower() not in listed]
        forwarded = self.snapshot.forwarded
        if forwarded is not None:  # X-Real-IP, X-Forwarded-Port, X-Forwarded-Prefix (off by default)
            headers = forwarded.apply(self, headers)
        for name, value in headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        client = self.client
        if client.trusted:
            xff = self.x_forwarded_for + b", " + client.peer_ip if self.x_forwarded_for else client.peer_ip
            proto = self.x_forwarded_proto or client.scheme
            parts += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
            fwd_host = self.x_forwarded_host or self.host
            if fwd_host:
                parts += (b"X-Forwarded-Host: ", fwd_host, b"\r\n")
        elif self.host:
            parts.append(client.forwarded_lines_with_host(self.host))  # built once per connection
        else:
            parts.append(client.forwarded_lines)
        element = self.forwarded if client.trusted else b""  # RFC 7239 (typed apart from `forwarded`)
        if self.snapshot.forwarded_header:
            element = forwarded_element(element, client.peer_ip, client.scheme, self.host)
        if element:
            parts += (b"Forwarded: ", element, b"\r\n")
        rid = self.request_id
        if rid is self._rid:  # ours, unchanged since: its line is one piece
            parts.append(self._rid_line)
        else:
            parts += (RID_NAME, rid, b"\r\n")
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

    # -- response (the upstream connection's sink interface) ---------------------------------------
    def upstream_head(self, head: ResponseHead, raw: bytes) -> None:
        if head.status < 200:
            # 100 is ours to send (we answered Expect ourselves); others (103) pass on to HTTP/1.1 clients.
            if head.status != 100 and self.version == 1:
                self.client.write(head.to_client(b""))
            return
        self.upstream_time = _perf_counter() - self.upstream_start
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
        fields = self._resp_headers
        if fields is None:
            return b""
        parts: list[bytes] = []
        for name, value, mode in fields:
            if mode == LINES:  # already whole lines
                parts.append(name)
                continue
            if mode != ADD:
                lname = name.lower()
                headers = head.headers
                headers[:] = [h for h in headers if h[0].lower() != lname]
            if mode != REMOVE:  # appends: `parts += (…)` would build a tuple per field
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
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

    def upstream_upgraded(self, head: ResponseHead, raw: bytes, rest: bytes) -> None:
        if not self.upgrade:
            self.fail(UpstreamError("upstream switched protocols without being asked"))
            return
        self.status = 101
        self.upstream_time = _perf_counter() - self.upstream_start
        self.response_head = head
        self.response_started = True
        conn = self.upstream
        assert conn is not None
        self.upstream = None  # the connection now belongs to the tunnel
        conn.pool.detach(conn)
        self._release_target(OK)  # the request is done; the tunnel is not a request in flight
        self.client.start_tunnel(self, conn, raw + rest)

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading_for(self)

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading_for(self)

    # -- endings ------------------------------------------------------------------------------------
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
        self._release_upstream_on_error()  # a connection still opening goes to the pool (_on_connected)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if self._body_waiter is not None:
            self._wake_body_waiter()
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

    def _run_on_finish(self) -> None:
        callbacks = self._on_finish or ()
        self._on_finish = None
        for callback in callbacks:
            try:
                callback(self)
            except Exception as exc:
                self.client.worker.log_exception("on_finish callback failed", exc, self)

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


__all__ = ["BODY_LENGTH", "Exchange", "RequestIds"]
