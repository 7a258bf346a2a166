"""tollway.protocol.http1: response heads (validation, every framing rule of RFC 9112 6.3, the memo),
hop-by-hop stripping and `to_client`, the chunked decoder, and the request checks llhttp leaves to us.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.errors import ClientError, UnsupportedVersion, UpstreamProtocolError
from tollway.protocol import http1
from tollway.protocol.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedDecoder,
    check_request_version,
    check_transfer_encoding,
    chunk,
    connection_listed_headers,
    find_head_end,
    parse_response_head,
)


def head(*lines: str, status: str = "HTTP/1.1 200 OK") -> bytes:
    return ("\r\n".join([status, *lines]) + "\r\n\r\n").encode("latin-1")


def parse(*lines: str, status: str = "HTTP/1.1 200 OK", method: bytes = b"GET"):
    return parse_response_head(head(*lines, status=status), method)


@pytest.fixture(autouse=True)
def fresh_memo():
    http1.forget_heads()
    yield
    http1.forget_heads()


# -- validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status",
    [
        "HTTP/1.1 200 OK",
        "HTTP/1.0 200 OK",
        "HTTP/1.1 404 Not Found",
        "HTTP/1.1 200 ",
        "HTTP/1.1 200",
        "HTTP/1.1 599 Whatever it is",
        "HTTP/1.1 200 caf\xe9",
    ],
)
def test_valid_status_lines(status: str) -> None:
    resp = parse("Content-Length: 0", status=status)
    assert resp.status == int(status[9:12])
    assert resp.version == (1 if status[7] == "1" else 0)


@pytest.mark.parametrize(
    "status",
    [
        "HTTP/1.2 200 OK",
        "HTTP/2 200 OK",
        "http/1.1 200 OK",
        "HTTP/1.1 20 OK",
        "HTTP/1.1 2000 OK",
        "HTTP/1.1 099 Low",
        "HTTP/1.1  200 OK",
        "HTTP/1.1 200 O\x01K",
        "ICY 200 OK",
        "",
    ],
)
def test_invalid_status_lines(status: str) -> None:
    with pytest.raises(UpstreamProtocolError, match="status line"):
        parse("Content-Length: 0", status=status)


@pytest.mark.parametrize(
    "line",
    [
        "X-A : b",
        "X-A\t: b",
        " X-A: b",
        "X(A): b",
        ": b",
        "X-A b",
        "X-A: b\rc",
        "X-A: b\x00",
        "X-A: b\x7f",
        "X-A: b\x1b[0m",
        "X\xe9: b",
    ],
)
def test_invalid_header_fields(line: str) -> None:
    with pytest.raises(UpstreamProtocolError, match="header field"):
        parse("Content-Length: 0", line)


def test_obs_fold_and_bare_lf_are_invalid() -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n", b"GET")
    with pytest.raises(UpstreamProtocolError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nX-A: b\nContent-Length: 0\r\n\r\n", b"GET")
    with pytest.raises(UpstreamProtocolError):
        parse_response_head(b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", b"GET")


def test_values_may_hold_tabs_and_obs_text() -> None:
    resp = parse("X-A: a\tb \xe9", "Content-Length: 0")
    assert resp.get(b"x-a") == "a\tb \xe9".encode("latin-1")


def test_find_head_end() -> None:
    data = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"
    assert find_head_end(data) == len(data) - 4
    assert find_head_end(data[:10]) == -1
    # Resuming after a partial read finds a CRLFCRLF that straddles the old end.
    assert find_head_end(data, 23) == len(data) - 4


def test_find_head_end_after_the_same_head() -> None:
    """A buffer that starts with the head parsed last ends its head there (the fast path); one that
    only looks like it at the checked bytes is searched."""
    raw = head("Server: x", "Content-Length: 4")
    parse_response_head(raw, b"GET")
    assert find_head_end(raw + b"body") == len(raw)
    assert find_head_end(raw) == len(raw)
    other = raw.replace(b"Server: x", b"Server: y")
    assert find_head_end(other + b"body") == len(other)
    shorter = head("Server: x", "Content-Length: 44")[: len(raw) - 1]
    assert find_head_end(shorter) == -1
    # Same length and CRLFCRLF at the same place, but an earlier one: the earlier one is the end.
    moved = b"HTTP/1.1 204 No\r\n\r\n" + b"x" * (len(raw) - 23) + b"\r\n\r\n"
    assert len(moved) == len(raw)
    assert find_head_end(moved) == 19
    assert find_head_end(b"", 0) == -1


# -- framing, RFC 9112 6.3 in order ---------------------------------------------------------------------
@pytest.mark.parametrize("lines", [(), ("Content-Length: 10",), ("Transfer-Encoding: chunked",)])
def test_rule1_head_response_has_no_body(lines: tuple[str, ...]) -> None:
    resp = parse(*lines, method=b"HEAD")
    assert resp.body_kind == BODY_NONE
    assert resp.keep_alive


@pytest.mark.parametrize(
    "status",
    [
        "HTTP/1.1 100 Continue",
        "HTTP/1.1 103 Early Hints",
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 304 Not Modified",
    ],
)
@pytest.mark.parametrize("lines", [(), ("Content-Length: 10",), ("Transfer-Encoding: chunked",)])
def test_rule1_1xx_204_304_have_no_body(status: str, lines: tuple[str, ...]) -> None:
    resp = parse(*lines, status=status)
    assert resp.body_kind == BODY_NONE


def test_rule3_transfer_encoding_overrides_content_length_and_closes() -> None:
    resp = parse("Content-Length: 10", "Transfer-Encoding: chunked")
    assert resp.body_kind == BODY_CHUNKED
    assert not resp.keep_alive  # such a message may be an attack: the connection is not reused
    out = resp.to_client(b"")
    assert b"content-length" not in out.lower() and b"transfer-encoding" not in out.lower()


@pytest.mark.parametrize("te", ["chunked", "Chunked", "gzip, chunked", "gzip,chunked"])
def test_rule4_chunked_last_is_chunked(te: str) -> None:
    resp = parse(f"Transfer-Encoding: {te}")
    assert resp.body_kind == BODY_CHUNKED
    assert resp.keep_alive  # the end of the body is known: the connection can carry another


def test_rule4_transfer_encoding_split_over_fields() -> None:
    resp = parse("Transfer-Encoding: gzip", "Transfer-Encoding: chunked")
    assert resp.body_kind == BODY_CHUNKED


@pytest.mark.parametrize("te", ["gzip", "chunked, gzip", "identity"])
def test_rule4_chunked_not_last_reads_until_close(te: str) -> None:
    resp = parse(f"Transfer-Encoding: {te}")
    assert resp.body_kind == BODY_UNTIL_CLOSE
    assert not resp.keep_alive


@pytest.mark.parametrize(
    "lines",
    [
        ("Content-Length: 1", "Content-Length: 2"),
        ("Content-Length: 1, 2",),
        ("Content-Length: x",),
        ("Content-Length: -1",),
        ("Content-Length: +1",),
        ("Content-Length: 1.0",),
        ("Content-Length: ",),
        ("Content-Length: 1 1",),
        ("Content-Length: 9999999999999999999",),
    ],
)
def test_rule5_invalid_content_length_is_an_error(lines: tuple[str, ...]) -> None:
    with pytest.raises(UpstreamProtocolError, match="Content-Length"):
        parse(*lines)


@pytest.mark.parametrize(
    "lines",
    [
        ("Content-Length: 7", "Content-Length: 7"),
        ("Content-Length: 7, 7",),
        ("Content-Length:7",),
        ("Content-Length:   7  ",),
        ("content-length: 7",),
    ],
)
def test_rule5_repeated_identical_lengths_are_one(lines: tuple[str, ...]) -> None:
    resp = parse(*lines)
    assert resp.body_kind == BODY_LENGTH
    assert resp.content_length == 7


def test_rule6_content_length() -> None:
    resp = parse("Content-Length: 123")
    assert (resp.body_kind, resp.content_length, resp.keep_alive) == (BODY_LENGTH, 123, True)
    assert parse("Content-Length: 0").body_kind == BODY_NONE


def test_rule8_no_framing_reads_until_close() -> None:
    resp = parse("Content-Type: text/plain")
    assert resp.body_kind == BODY_UNTIL_CLOSE
    assert not resp.keep_alive


# -- persistence (RFC 9112 9.3) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "connection", "keep_alive"),
    [
        ("HTTP/1.1 200 OK", None, True),
        ("HTTP/1.1 200 OK", "close", False),
        ("HTTP/1.1 200 OK", "Close", False),
        ("HTTP/1.1 200 OK", "keep-alive, close", False),
        ("HTTP/1.0 200 OK", None, False),
        ("HTTP/1.0 200 OK", "keep-alive", True),
        ("HTTP/1.0 200 OK", "Keep-Alive, X-Foo", True),
        ("HTTP/1.1 200 OK", "x-foo", True),
    ],
)
def test_connection_persistence(status: str, connection: str | None, keep_alive: bool) -> None:
    lines = ["Content-Length: 0"] + ([f"Connection: {connection}"] if connection else [])
    assert parse(*lines, status=status).keep_alive is keep_alive


def test_connection_split_over_fields() -> None:
    resp = parse("Connection: keep-alive", "Connection: close", "Content-Length: 0")
    assert not resp.keep_alive


# -- hop-by-hop stripping and to_client ------------------------------------------------------------------
def test_to_client_of_a_plain_head_is_the_raw_head_plus_extra() -> None:
    raw = head("Content-Type: text/plain", "Content-Length: 2")
    resp = parse_response_head(raw, b"GET")
    assert resp.to_client(b"X-Extra: 1\r\n") == raw[:-2] + b"X-Extra: 1\r\n\r\n"


def test_to_client_says_http11_to_http10_backends() -> None:
    resp = parse("Content-Length: 2", status="HTTP/1.0 200 OK")
    assert resp.to_client(b"").startswith(b"HTTP/1.1 200 OK\r\n")


def test_every_hop_by_hop_field_is_stripped() -> None:
    resp = parse(
        "Date: today",
        "Connection: keep-alive, X-Private, x-other",
        "X-Private: 1",
        "X-Other: 2",
        "Keep-Alive: timeout=5",
        "Transfer-Encoding: chunked",
        "TE: trailers",
        "Trailer: X-T",
        "Upgrade: h2c",
        "Proxy-Connection: keep-alive",
        "Proxy-Authenticate: Basic",
        "Proxy-Authorization: Basic eA==",
        "X-Kept: yes",
    )
    out = resp.to_client(b"Transfer-Encoding: chunked\r\n")
    assert out == b"HTTP/1.1 200 OK\r\nDate: today\r\nX-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert resp.headers == [(b"Date", b"today"), (b"X-Kept", b"yes")]


def test_connection_alone_is_stripped_on_the_fast_path() -> None:
    resp = parse("A: 1", "Connection: keep-alive", "B: 2", "Content-Length: 0")
    assert resp.to_client(b"") == b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nContent-Length: 0\r\n\r\n"


def test_content_length_is_stripped_only_when_transfer_encoding_wins() -> None:
    resp = parse("Content-Length: 5", "Content-Length: 5")
    assert resp.to_client(b"").count(b"Content-Length: 5") == 2
    resp = parse("Content-Length: 5", "Transfer-Encoding: chunked", "X: y")
    assert resp.to_client(b"") == b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n"


def test_headers_edited_by_a_plugin_rebuild_the_head() -> None:
    resp = parse("A: 1", "Connection: close", "Content-Length: 0")
    resp.headers.append((b"X-Added", b"yes"))
    resp.headers[:] = [(n, v) for n, v in resp.headers if n != b"A"]
    assert resp.to_client(b"Connection: close\r\n") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Added: yes\r\nConnection: close\r\n\r\n"
    )
    assert resp.reason == b"OK"


def test_get_is_case_insensitive() -> None:
    resp = parse("Content-Type: a/b", "Content-Length: 0")
    assert resp.get(b"content-type") == b"a/b"
    assert resp.get(b"CONTENT-TYPE") == b"a/b"
    assert resp.get(b"missing") is None
    assert resp.get(b"connection") is None


def test_connection_listed_headers() -> None:
    assert connection_listed_headers(b"close, X-A ,x-b,,keep-alive, Upgrade") == {b"x-a", b"x-b"}
    assert connection_listed_headers(b"") == set()


# -- the memo ------------------------------------------------------------------------------------------
def test_a_repeated_head_gives_an_equal_but_distinct_object() -> None:
    raw = head("Server: x", "Connection: keep-alive", "Content-Length: 5")
    first = parse_response_head(raw, b"GET")
    second = parse_response_head(raw, b"GET")
    assert raw in http1._HEAD_MEMO
    assert second is not first
    fields = (
        "raw",
        "version",
        "status",
        "body_kind",
        "content_length",
        "keep_alive",
        "connection",
        "lists_headers",
    )
    assert [getattr(second, f) for f in fields] == [getattr(first, f) for f in fields]
    assert second.to_client(b"") == first.to_client(b"")
    # Edits to one head's fields stay private to it.
    first.headers.append((b"X-Plugin", b"1"))
    assert parse_response_head(raw, b"GET").to_client(b"") == second.to_client(b"")
    assert b"X-Plugin" not in second.to_client(b"")


def test_head_responses_are_not_memoised() -> None:
    raw = head("Content-Length: 5")
    assert parse_response_head(raw, b"HEAD").body_kind == BODY_NONE
    assert raw not in http1._HEAD_MEMO
    assert parse_response_head(raw, b"GET").body_kind == BODY_LENGTH
    # ...and a memoised GET answer is not reused for a HEAD.
    assert parse_response_head(raw, b"HEAD").body_kind == BODY_NONE


def test_invalid_heads_are_not_memoised() -> None:
    raw = head("Content-Length: 1", "Content-Length: 2")
    for _ in range(2):
        with pytest.raises(UpstreamProtocolError):
            parse_response_head(raw, b"GET")
    assert raw not in http1._HEAD_MEMO


def test_the_memo_is_bounded() -> None:
    for i in range(http1._HEAD_MEMO_SIZE * 2 + 3):
        parse_response_head(head(f"X-N: {i}", "Content-Length: 0"), b"GET")
        assert len(http1._HEAD_MEMO) <= http1._HEAD_MEMO_SIZE


# -- chunked bodies ----------------------------------------------------------------------------------------
def decode(data: bytes) -> tuple[bytes, int, bool]:
    decoder = ChunkedDecoder(collect=True)
    used = decoder.feed(data)
    return b"".join(decoder.payload), used, decoder.done


def test_chunked_decoding() -> None:
    body = b'5\r\nhello\r\n1;ext=1;q="x"\r\n \r\nA \r\n0123456789\r\n0\r\n\r\n'
    assert decode(body) == (b"hello 0123456789", len(body), True)


def test_trailers_are_read_to_the_end() -> None:
    body = b"3\r\nabc\r\n0\r\nX-T: 1\r\nX-U: two words\r\n\r\n"
    assert decode(body) == (b"abc", len(body), True)


def test_bytes_after_the_last_chunk_are_not_ours() -> None:
    body = b"3\r\nabc\r\n0\r\n\r\n"
    payload, used, done = decode(body + b"HTTP/1.1 200 OK\r\n")
    assert (payload, used, done) == (b"abc", len(body), True)


def test_incomplete_body_is_not_done() -> None:
    assert decode(b"3\r\nabc\r\n") == (b"abc", 8, False)
    assert decode(b"3\r\nab") == (b"ab", 5, False)
    assert decode(b"0\r\n") == (b"", 3, False)


@pytest.mark.parametrize(
    "body",
    [
        b"x\r\n",
        b"-1\r\n",
        b"0x3\r\nabc\r\n",
        b"3\nabc\r\n",
        b"3\r\nabcd\r\n",
        b"3\r\nabc\n0\r\n\r\n",
        b"3;\x01\r\nabc\r\n",
        b"1234567890abcdef0\r\n",
        b"\r\n",
        b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX : 1\r\n\r\n",
    ],
)
def test_invalid_chunked_framing(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ChunkedDecoder().feed(body)


def test_oversized_chunk_line_is_refused() -> None:
    decoder = ChunkedDecoder()
    with pytest.raises(UpstreamProtocolError, match="oversized"):
        for _ in range(10):
            decoder.feed(b"0" * 1000)


def test_decoder_without_collect_keeps_nothing() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"3\r\nabc\r\n0\r\n\r\n")
    assert decoder.done and decoder.payload == []


chunks = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    pieces = draw(chunks)
    ext = draw(st.sampled_from([b"", b";a=1", b';name="v"', b"; x"]))
    upper = draw(st.booleans())
    body = b""
    for piece in pieces:
        size = b"%x" % len(piece)
        body += (size.upper() if upper else size) + ext + b"\r\n" + piece + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC: d\r\n"]))
    return body + b"0\r\n" + trailers + b"\r\n", b"".join(pieces)


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), st.data())
def test_chunked_split_anywhere_gives_the_same_result(
    message: tuple[bytes, bytes], data: st.DataObject
) -> None:
    body, payload = message
    tail = data.draw(st.sampled_from([b"", b"NEXT", b"HTTP/1.1 200 OK\r\n\r\n"]))
    stream = body + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = ChunkedDecoder(collect=True)
    used = 0
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        piece = stream[start:end]
        if decoder.done:
            assert decoder.feed(piece) == 0 or not piece
            continue
        n = decoder.feed(piece)
        assert 0 <= n <= len(piece)
        if n < len(piece):
            assert decoder.done
        used += n
    assert decoder.done
    assert used == len(body)
    assert b"".join(decoder.payload) == payload


def test_chunk_frames_any_payload() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(memoryview(b"x" * 26)) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert decode(chunk(b"ab") + chunk(b"c") + http1.LAST_CHUNK) == (b"abc", 18, True)


# -- request checks llhttp leaves to us --------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b" chunked\t", b"CHUNKED"])
def test_transfer_encoding_chunked_is_accepted(value: bytes) -> None:
    check_transfer_encoding(value, 1)


@pytest.mark.parametrize(
    "value",
    [b"gzip, chunked", b"chunked, chunked", b"chunked,", b"identity", b"", b"chunked;q=1", b"x-chunked"],
)
def test_any_other_transfer_encoding_is_refused(value: bytes) -> None:
    with pytest.raises(ClientError, match="Transfer-Encoding"):
        check_transfer_encoding(value, 1)


def test_transfer_encoding_in_http10_is_refused() -> None:
    with pytest.raises(ClientError, match=r"HTTP/1\.0"):
        check_transfer_encoding(b"chunked", 0)


def test_request_versions() -> None:
    check_request_version(1, 1)
    check_request_version(1, 0)
    with pytest.raises(ClientError, match=r"0\.9"):
        check_request_version(0, 9)
    for major, minor in ((2, 0), (1, 2), (3, 0)):
        with pytest.raises(UnsupportedVersion):
            check_request_version(major, minor)
