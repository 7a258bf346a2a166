"""The plugin development kit: what a plugin's hooks receive and may answer with.

`RequestContext` is the request as plugins see it (every hook gets one, named `ex` by convention):
the parsed request head (`tollway.protocol.request.RequestHead`: method, url, headers, host, ...),
where it was routed, who the consumer is, the response status, and the methods that change what is
forwarded or answered. A plugin answers with a `Response` (often an `error_response`) to stop the
request. Plugins and the proxy both import this module; nothing here imports a plugin.

The request's `Exchange` (tollway.proxy.exchange) is a `RequestContext` subclass, so a hook reads and
writes plain fields of the one per-request object: the context costs no allocation and no copy.
Everything not defined here (the exchange's relay and retry state) is internal and may change.
Documented for plugin authors in docs/plugins/writing-plugins.md.

Compiled with mypyc (setup.py HOT_MODULES).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from tollway.protocol.http1 import BODY_LENGTH
from tollway.protocol.request import REQ_CHUNKED, REQ_LENGTH, REQ_NONE, RequestHead
from tollway.proxy.responses import Response, error_response, serialize

_perf_counter: Final = time.perf_counter  # bound once: no module attribute lookup per request

if TYPE_CHECKING:
    from tollway.protocol.http1 import ResponseHead
    from tollway.proxy.pipeline import Pipeline
    from tollway.proxy.server import ClientConnection
    from tollway.proxy.snapshot import CompiledRoute, CompiledService, Snapshot

_EMPTY_PARAMS: dict[str, str] = {}
_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n\r\n"
_CLOSE: Final = b"Connection: close\r\n\r\n"
# What a plugin does to a response header field (RequestContext._resp_headers). Final: compiled code
# reads them directly (a plain module name is a dict lookup by name on every use, ~150 instructions).
ADD: Final = 0
REPLACE: Final = 1
REMOVE: Final = 2
LINES: Final = 3  # the name is whole header lines, each ending in CRLF; the value is b""


class RequestContext(RequestHead):
    """One request as plugins see it. Fields a plugin may read: those of `RequestHead`, and `path`
    (normalised), `raw_path`, `query`, `params` (path parameters), `route`, `service`, `consumer` and
    `credential` (set by an authentication plugin), `vars` (a dict plugins may share data in), `status`
    and `response_head` (in the response and log phases), `bytes_sent`, `upstream_time` and `elapsed`
    (in the log phase), `done`."""

    __slots__ = (
        "_on_finish",
        "_resp_headers",
        "body_done",
        "body_received",
        "body_tap",
        "bytes_sent",
        "client",
        "consumer",
        "credential",
        "done",
        "fallback",
        "max_body_size",
        "params",
        "path",
        "pipeline",
        "query",
        "raw_path",
        "request_body_transform",
        "response_body_transform",
        "response_head",
        "response_started",
        "route",
        "service",
        "snapshot",
        "start_time",
        "status",
        "upstream_path",
        "upstream_time",
        "vars",
    )

    def __init__(self, client: ClientConnection, snapshot: Snapshot) -> None:
        super().__init__()
        self.client = client
        self.snapshot = snapshot
        self.start_time = _perf_counter()
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
        self.fallback: Callable[[RequestContext, BaseException], Response | None] | None = None
        # Fields added to the response: (name, value, ADD / REPLACE / REMOVE), or (lines, b"", LINES)
        self._resp_headers: list[tuple[bytes, bytes, int]] | None = None
        self._on_finish: list[Callable[[RequestContext], None]] | None = None  # see on_finish()
        self.response_head: ResponseHead | None = None
        self.response_started = False
        self.status = 0
        self.bytes_sent = 0  # response bytes written to the client
        self.upstream_time = -1.0  # seconds from handing the request to a backend to its response head
        self.done = False

    def _forwarding(self) -> bool:
        """True once the request head went to a backend (the exchange knows)."""
        return False

    def _release_upstream_on_error(self) -> None:
        """Drop the backend connection a try holds, if any (tollway.proxy.tries overrides this)."""

    def _finish(self) -> None:
        """End the request: log phase, release what it holds, next request (the exchange does it)."""
        raise NotImplementedError

    @property
    def elapsed(self) -> float:
        return _perf_counter() - self.start_time

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
        self._response_header(name, value, ADD)

    def set_response_header(self, name: str, value: str) -> None:
        """Like add_response_header, but replacing any field of that name the response has."""
        self._response_header(name, value, REPLACE)

    def add_response_fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Add header fields the caller built itself, already valid (names are tokens, values have no
        control characters): no per-request validation, for fields a plugin makes from numbers."""
        extra = self._resp_headers
        if extra is None:
            extra = self._resp_headers = []
        for name, value in fields:
            extra.append((name, value, ADD))

    def add_response_lines(self, lines: bytes) -> None:
        """Add whole header lines the caller built itself, each `Name: value` and ending in CRLF, already
        valid: the cheapest way to add fields (one entry, copied as is into the response head), for a
        plugin that renders its fields from a prefix made once per config and a few numbers."""
        extra = self._resp_headers
        if extra is None:
            extra = self._resp_headers = []
        extra.append((lines, b"", LINES))

    def added_response_fields(self) -> list[tuple[bytes, bytes]]:
        """The fields plugins added so far, as (name, value) pairs, in order (removals left out)."""
        fields: list[tuple[bytes, bytes]] = []
        self._add_response_headers(fields)
        return fields

    def remove_response_header(self, name: str) -> None:
        """Remove a header from the backend's response (a gateway answer has only the fields plugins
        add): what a backend must not tell the client, like a CORS grant the gateway refused."""
        self._response_header(name, "", REMOVE)

    def _response_header(self, name: str, value: str, mode: int) -> None:
        field = header_field(name, value)
        extra = self._resp_headers
        if extra is None:
            extra = self._resp_headers = []
        extra.append((field[0], field[1], mode))

    def _add_response_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value, mode in self._resp_headers or ():
            if mode == LINES:
                for line in name.split(b"\r\n")[:-1]:
                    field, _, text = line.partition(b": ")
                    headers.append((field, text))
                continue
            if mode != ADD:
                lname = name.lower()
                headers[:] = [h for h in headers if h[0].lower() != lname]
            if mode != REMOVE:
                headers.append((name, value))

    def whole_request_body(self, max_size: int) -> bytes | Awaitable[bytes | None] | None:
        """The whole request body, for a plugin that must read it before deciding (key-auth's
        `key_in_body`); call it in rewrite/access. Bytes when the body is all here, else an awaitable
        resolving to it once it is (None if the request ends first); None when it is not read: chunked,
        or a Content-Length over `max_size`. The body is still forwarded as received."""
        kind = self.body_kind
        if kind == REQ_NONE:
            return b""
        if kind != REQ_LENGTH or self.content_length > max_size or self._forwarding():
            return None
        return self._whole_body()

    def _whole_body(self) -> bytes | Awaitable[bytes | None] | None:
        """Where the body is waiting is the exchange's business (it overrides this)."""
        return None

    def buffer_request_body(self, transform: Callable[[bytes], bytes | None], max_size: int) -> bool:
        """Have `transform(body)` rewrite the whole request body before it is forwarded (it returns the
        new body, or None to keep it). Only bodies with a Content-Length of at most `max_size` are
        buffered; returns False (and the body streams untouched) otherwise. Call it in rewrite/access."""
        if self.body_kind != REQ_LENGTH or self.content_length > max_size or self._forwarding():
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

    def respond(self, response: Response) -> None:
        """Answer from the gateway itself: an error, a 404, a plugin's short-circuit, or a response
        hook's answer instead of the backend's (whose connection is then dropped). Fields plugins added
        with `add_response_header` and the like are added to it. Too late once the response started:
        the client connection is cut instead."""
        if self.done:
            return
        if self.response_started:
            self.client.abort()  # too late for a clean answer: the client sees a cut response
            self._finish()
            return
        if self._resp_headers is not None:
            headers = list(response.headers)  # never edit the plugin's (maybe shared) Response
            self._add_response_headers(headers)
            response = Response(response.status, response.body, headers)
        self._start_own_answer(response.status)
        data = serialize(response, self.keep_alive, self.method == b"HEAD", self.client.server_header)
        self._send_own_answer(data)

    def respond_serialized(self, status: int, head: bytes, body: bytes) -> bool:
        """Answer with a response serialized once and sent many times (a cache hit): `head` is its
        status line and every field up to, not including, Connection (the gateway's Server field and
        Content-Length included); `body` its body, left out for HEAD. Returns False, having sent
        nothing, when this request cannot take it: fields other plugins added are pending (those need
        `respond`) or the answer already started."""
        if self.done or self.response_started or self._resp_headers is not None:
            return False
        self._start_own_answer(status)
        connection = _KEEP_ALIVE if self.keep_alive else _CLOSE
        self._send_own_answer(head + connection if self.method == b"HEAD" else head + connection + body)
        return True

    def _start_own_answer(self, status: int) -> None:
        if not self.body_done and self.body_kind != REQ_NONE:
            self.keep_alive = False  # we will not read the rest of this request's body
        if self.client.draining:
            self.keep_alive = False
        self.status = status
        self.response_started = True

    def _send_own_answer(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.client.write(data)
        self._release_upstream_on_error()
        self._finish()

    def on_finish(self, callback: Callable[[RequestContext], None]) -> None:
        """Have `callback(ex)` run once when this request ends, however it ends (response sent, gateway
        answer, client gone): for what must be released even if a later plugin or the consumer's own
        pipeline takes over (a concurrency slot). Runs after the log phase; exceptions are logged."""
        if self._on_finish is None:
            self._on_finish = [callback]
        else:
            self._on_finish.append(callback)


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

__all__ = [
    "REQ_CHUNKED",
    "REQ_LENGTH",
    "REQ_NONE",
    "RequestContext",
    "Response",
    "error_response",
    "header_field",
]
