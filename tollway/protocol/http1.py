"""HTTP/1.1 rules as plain functions and small state machines (sans-I/O: bytes in, decisions out).

Requests from clients are parsed by httptools (llhttp, strict mode), which rejects almost every
smuggling vector itself; `RequestHeadRules` adds what llhttp lets through (see `check_request`).
Responses from backends are parsed here: find the end of the head, validate the whole header block
with one regular expression, then pass the body through untouched, counting bytes (Content-Length)
or tracking chunk boundaries (chunked) so the message end is known without copying the payload.
"""

from __future__ import annotations

import re
from typing import Final

from tollway.errors import ClientError, UnsupportedVersion, UpstreamProtocolError

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1 hop-by-hop fields, plus the Proxy-* family: never forwarded in either direction.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Connection options that name no header to strip.
_CONNECTION_KEYWORDS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

# One fullmatch validates a whole response head: the status line, then header lines of a token, a
# colon and a value free of control characters (HTAB allowed). Bare CR, bare LF, NUL, obs-fold (a line
# starting with whitespace is not a token) and whitespace before the colon all fail it.
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.[01] [1-9][0-9]{2}(?: [^\x00-\x08\x0a-\x1f\x7f]*)?\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*\r\n"
)
# Header lines the gateway must act on or strip (framing and hop-by-hop), found in one pass.
_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|keep-alive|te|trailer|upgrade"
    rb"|proxy-connection|proxy-authenticate|proxy-authorization)[ \t]*:[ \t]*([^\r]*)",
    re.IGNORECASE,
)
# Fields that are rare in responses and need the general path when present.
_RARE_SPECIAL = re.compile(rb"\r\n(?:transfer-encoding|keep-alive|te|trailer|upgrade|proxy-[a-z-]*)[ \t]*:")
_HEADER_LINE = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_TRAILER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*")

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_UNTIL_CLOSE: Final = 3


_NO_SPANS: Final[list[tuple[int, int]]] = []  # shared, never mutated: heads without hop-by-hop lines


class ResponseHead:
    """A backend's response head: framing decided at parse time, header fields parsed only if asked.

    The common case never builds a header list: `to_client` copies the raw head minus its hop-by-hop
    lines. A plugin that reads or edits `headers` makes the head rebuild from the list instead.
    """

    __slots__ = (
        "_bare",
        "_headers",
        "_strip",
        "body_kind",
        "connection",
        "content_length",
        "keep_alive",
        "lists_headers",
        "raw",
        "status",
        "version",
    )

    def __init__(self, raw: bytes, version: int, status: int) -> None:
        self.raw = raw
        self.version = version  # minor version: 0 or 1
        self.status = status
        self.body_kind = BODY_UNTIL_CLOSE
        self.content_length = -1
        self.keep_alive = version == 1
        self.connection = b""  # the Connection field's value
        self.lists_headers = False  # Connection names headers that must be stripped too
        self._strip: list[tuple[int, int]] = _NO_SPANS  # spans of hop-by-hop lines in `raw`
        self._headers: list[tuple[bytes, bytes]] | None = None
        # `to_client` without its extra lines and final CRLF: built once per distinct head (memoised
        # heads share it), since a backend repeats its heads
        self._bare: bytes | None = None

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} body_kind={self.body_kind} length={self.content_length}>"

    def copy(self) -> ResponseHead:
        """A fresh head with the same parse results (header edits by plugins stay private to it)."""
        other = ResponseHead(self.raw, self.version, self.status)
        other.body_kind = self.body_kind
        other.content_length = self.content_length
        other.keep_alive = self.keep_alive
        other.connection = self.connection
        other.lists_headers = self.lists_headers
        other._strip = self._strip  # never mutated after parsing
        other._bare = self._bare
        return other

    @property
    def reason(self) -> bytes:
        return self.raw[13 : self.raw.find(b"\r\n")]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """End-to-end header fields (hop-by-hop ones removed), editable in place by plugins."""
        if self._headers is None:
            listed = connection_listed_headers(self.connection) if self.connection else ()
            block_start = self.raw.find(b"\r\n") + 2
            self._headers = [
                (name, value)
                for name, value in _HEADER_LINE.findall(self.raw, block_start, len(self.raw) - 2)
                if name.lower() not in HOP_BY_HOP and name.lower() not in listed
            ]
        return self._headers

    def get(self, name: bytes) -> bytes | None:
        key = name.lower()
        for hname, value in self.headers:
            if hname.lower() == key:
                return value
        return None

    def to_client(self, extra: bytes) -> bytes:
        """The head to send a client: HTTP/1.1, no hop-by-hop fields, then `extra` header lines."""
        raw = self.raw
        if self._headers is not None:
            line_end = raw.find(b"\r\n")
            parts = [b"HTTP/1.1", raw[8 : line_end + 2]]
            for name, value in self._headers:
                parts += (name, b": ", value, b"\r\n")
            parts += (extra, b"\r\n")
            return b"".join(parts)
        if self.lists_headers:
            return self._rebuild_without_listed(extra)
        bare = self._bare
        if bare is None:
            bare = self._bare = self._bare_head()
        return bare + extra + b"\r\n" if extra else bare + b"\r\n"

    def _bare_head(self) -> bytes:
        """The raw head as HTTP/1.1, without its hop-by-hop lines and its final CRLF."""
        raw = self.raw
        parts = [b"HTTP/1.1"]
        pos = 8
        for start, end in self._strip:
            parts.append(raw[pos:start])
            pos = end
        parts.append(raw[pos:-2])
        return b"".join(parts)

    def _rebuild_without_listed(self, extra: bytes) -> bytes:
        _ = self.headers  # parsing drops the fields Connection lists
        return self.to_client(extra)


def find_head_end(buf: bytes, start: int = 0) -> int:
    """Index just past the CRLFCRLF that ends a head, or -1."""
    # The head parsed last, again (a backend repeats its heads): a valid head's first CRLFCRLF is its
    # end, so in a buffer that starts with it the head ends there. Comparing costs less than searching,
    # and two byte reads rule most other heads out first.
    known = _LAST.raw
    size = len(known)
    if start < size <= len(buf) and buf[size - 1] == 10 and buf[size - 3] == 10 and buf[:size] == known:
        return size
    end = buf.find(b"\r\n\r\n", max(0, start - 3))
    return -1 if end < 0 else end + 4


# Parse results of recent response heads, by their exact bytes. A backend repeats its heads (the
# same fields, a Date that changes once a second, the same Content-Length for same-size bodies), and
# parsing is a pure function of the bytes, so a repeated head costs a dict lookup instead of a
# validation pass. Bounded: cleared when full, so varied heads cannot grow it.
_HEAD_MEMO: Final[dict[bytes, ResponseHead]] = {}
_HEAD_MEMO_SIZE: Final = 512


class _LastHead:
    """The memo entry of the last head looked up: a backend sends the same head many times in a row,
    and comparing bytes costs less than hashing them for the memo."""

    __slots__ = ("head", "raw")

    def __init__(self) -> None:
        self.raw = b""
        self.head: ResponseHead | None = None


_LAST: Final = _LastHead()


def forget_heads() -> None:
    """Empty the memo (tests)."""
    _HEAD_MEMO.clear()
    _LAST.raw = b""
    _LAST.head = None


def parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """Validate a complete response head (status line through the empty line); decide its framing.

    Raises UpstreamProtocolError for anything malformed: the client gets a 502, never the bytes.
    """
    if request_method == b"HEAD":  # framing depends on the method: HEAD answers are not memoised
        return _parse(head, request_method)
    last = _LAST
    known = last.head
    if known is not None and head == last.raw:
        return known.copy()
    known = _HEAD_MEMO.get(head)
    if known is not None:
        last.raw = head
        last.head = known
        return known.copy()
    resp = _parse(head, request_method)
    if len(_HEAD_MEMO) >= _HEAD_MEMO_SIZE:
        _HEAD_MEMO.clear()
    memo = resp.copy()
    if not memo.lists_headers:
        memo._bare = memo._bare_head()  # shared by every copy
    _HEAD_MEMO[head] = memo
    last.raw = head
    last.head = memo
    return resp


def _parse(head: bytes, request_method: bytes) -> ResponseHead:
    """The common head (at most one Content-Length and one Connection, no other framing or
    hop-by-hop field) takes a straight-line path; anything else takes `_parse_general`."""
    if _RESPONSE_HEAD.fullmatch(head) is None:
        if _RESPONSE_HEAD.match(head[: head.find(b"\r\n") + 2] + b"\r\n") is None:
            raise UpstreamProtocolError("upstream sent an invalid status line")
        raise UpstreamProtocolError("upstream sent an invalid header field")
    status = int(head[9:12])
    resp = ResponseHead(head, 1 if head[7] == 49 else 0, status)
    lower = head.lower()
    if _RARE_SPECIAL.search(lower) is not None:
        return _parse_general(resp, request_method)
    i = lower.find(b"\r\ncontent-length:")
    j = lower.find(b"\r\nconnection:")
    if (i >= 0 and lower.find(b"\r\ncontent-length:", i + 17) >= 0) or (
        j >= 0 and lower.find(b"\r\nconnection:", j + 13) >= 0
    ):
        return _parse_general(resp, request_method)
    if j >= 0:
        end = lower.find(b"\r\n", j + 13)
        resp._strip = [(j + 2, end + 2)]
        resp.connection = lower[j + 13 : end].strip(b" \t")
        _apply_connection(resp)
    if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
        resp.body_kind = BODY_NONE
    elif i >= 0:
        length = _single_length([head[i + 17 : head.find(b"\r\n", i + 17)]])
        resp.content_length = length
        resp.body_kind = BODY_LENGTH if length else BODY_NONE
    else:
        resp.keep_alive = False  # BODY_UNTIL_CLOSE
    return resp


def _parse_general(resp: ResponseHead, request_method: bytes) -> ResponseHead:
    lengths: list[bytes] = []
    transfer = b""
    strip = resp._strip = []
    for m in _RESPONSE_SPECIAL.finditer(resp.raw):
        name, value = m.groups()
        name = name.lower()
        if name == b"content-length":
            lengths.append(value)
            continue  # kept: the client gets the same length
        if name == b"transfer-encoding":
            transfer = transfer + b"," + value if transfer else value
        elif name == b"connection":
            resp.connection = resp.connection + b"," + value if resp.connection else value
        strip.append((m.start() + 2, m.end() + 2))
    _decide_framing(resp, request_method, lengths, transfer)
    if resp.connection:
        _apply_connection(resp)
    return resp


def _apply_connection(resp: ResponseHead) -> None:
    value = resp.connection.lower()
    if value == b"keep-alive":  # the common case, without tokenising
        resp.keep_alive = resp.keep_alive or resp.version == 0
        return
    if value == b"close":
        resp.keep_alive = False
        return
    tokens = connection_tokens(value)
    if b"close" in tokens:
        resp.keep_alive = False
    elif b"keep-alive" in tokens and resp.version == 0:
        resp.keep_alive = True
    resp.lists_headers = bool(tokens - _CONNECTION_KEYWORDS)


def _decide_framing(resp: ResponseHead, method: bytes, lengths: list[bytes], transfer: bytes) -> None:
    """RFC 9112 6.3, in order."""
    status = resp.status
    if method == b"HEAD" or status < 200 or status in (204, 304):
        resp.body_kind = BODY_NONE
        return
    if transfer:
        # Transfer-Encoding wins over Content-Length, and such a message is not reused (6.3 item 3).
        chunked = transfer.rpartition(b",")[2].strip(b" \t").lower() == b"chunked"
        resp.body_kind = BODY_CHUNKED if chunked else BODY_UNTIL_CLOSE
        if lengths or not chunked:
            resp.keep_alive = False
        if lengths:
            resp._strip.extend(_content_length_spans(resp.raw))
            resp._strip.sort()
        return
    if lengths:
        resp.content_length = _single_length(lengths)
        resp.body_kind = BODY_LENGTH if resp.content_length else BODY_NONE
        return
    resp.body_kind = BODY_UNTIL_CLOSE
    resp.keep_alive = False


def _content_length_spans(raw: bytes) -> list[tuple[int, int]]:
    return [
        (m.start() + 2, m.end() + 2)
        for m in _RESPONSE_SPECIAL.finditer(raw)
        if m.group(1).lower() == b"content-length"
    ]


def _single_length(values: list[bytes]) -> int:
    """Several Content-Length values are allowed only if they are all the same number (RFC 9110 8.6)."""
    if len(values) == 1:
        value = values[0].rstrip(b" \t")
        if value.isdigit() and len(value) <= 18:
            return int(value)
    found = {item.strip(b" \t") for value in values for item in value.split(b",")}
    if len(found) != 1:
        raise UpstreamProtocolError("upstream sent conflicting Content-Length values")
    (text,) = found
    if _DIGITS.fullmatch(text) is None:
        raise UpstreamProtocolError("upstream sent an invalid Content-Length")
    return int(text)


def connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip(b" \t").lower() for token in value.split(b",") if token.strip(b" \t")}


def connection_listed_headers(value: bytes) -> set[bytes]:
    """Header names a Connection field declares hop-by-hop (beyond the keywords)."""
    return connection_tokens(value) - _CONNECTION_KEYWORDS


class ChunkedDecoder:
    """Tracks a chunked body as it streams, so the gateway knows where it ends without copying it.

    `feed` returns how many bytes of `data` belong to this body (the rest, if any, is not ours) and
    whether the body is complete. With `collect=True` it also gathers the payload (chunk data without
    framing), for HTTP/1.0 clients and body transforms.
    """

    __slots__ = ("_line", "_remaining", "_state", "collect", "done", "payload")

    _SIZE = 0
    _DATA = 1
    _DATA_END = 2
    _TRAILER = 3

    def __init__(self, collect: bool = False) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self.collect = collect
        self.payload: list[bytes] = []
        self.done = False

    def feed(self, data: bytes) -> int:
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._state == self._DATA:
                take = min(self._remaining, end - pos)
                if self.collect:
                    self.payload.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    raise UpstreamProtocolError("upstream sent an oversized chunk header")
                return end
            line = self._line + data[pos : nl + 1]
            self._line = b""
            pos = nl + 1
            self._on_line(line)
        return pos

    def _on_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise UpstreamProtocolError("upstream sent a bare LF in chunked framing")
        line = line[:-2]
        if self._state == self._SIZE:
            m = _CHUNK_SIZE.fullmatch(line)
            if m is None:
                raise UpstreamProtocolError("upstream sent an invalid chunk size")
            self._remaining = int(m.group(1), 16)
            self._state = self._DATA if self._remaining else self._TRAILER
        elif self._state == self._DATA_END:
            if line:
                raise UpstreamProtocolError("upstream chunk data overran its size")
            self._state = self._SIZE
        elif line:  # trailer field
            if _TRAILER_LINE.fullmatch(line) is None:
                raise UpstreamProtocolError("upstream sent an invalid trailer field")
        else:
            self.done = True


def chunk(data: bytes | memoryview) -> bytes:
    """Frame one piece of payload as a chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"


# -- request checks llhttp leaves to us ------------------------------------------------------------------
def check_request_version(major: int, minor: int) -> None:
    if major != 1 or minor not in (0, 1):
        if major == 0:
            raise ClientError("HTTP/0.9 requests are not supported")
        raise UnsupportedVersion()


def check_transfer_encoding(value: bytes, minor: int) -> None:
    """Only a single `chunked` coding is accepted; anything else could be framed differently by the
    backend than by us (request smuggling), so it is refused outright."""
    if minor == 0:
        raise ClientError("Transfer-Encoding is not allowed in HTTP/1.0 requests")
    if value.strip(b" \t").lower() != b"chunked":
        raise ClientError("unsupported Transfer-Encoding (only chunked is accepted)")
