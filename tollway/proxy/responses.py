"""Responses the gateway writes itself: errors, 404/405, plugin short-circuits.

Every one is JSON ``{"message": ..., "request_id": ...}`` with an ``X-Request-Id`` header, so a client
can quote the id and an operator can find the request in the access log.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


class Response:
    """A complete response produced by the gateway (not proxied): small, fully buffered."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes | dict[str, Any] | list[Any] | str = b"",
        headers: list[tuple[bytes, bytes]] | dict[str, str] | None = None,
    ) -> None:
        self.status = status
        data: bytes
        if isinstance(body, dict | list):
            data = orjson.dumps(body)
            headers = _with_content_type(headers, b"application/json")
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        self.body = data
        if isinstance(headers, dict):
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.headers: list[tuple[bytes, bytes]] = headers or []

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


def _with_content_type(
    headers: list[tuple[bytes, bytes]] | dict[str, str] | None, ctype: bytes
) -> list[tuple[bytes, bytes]]:
    if isinstance(headers, dict):
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    headers = list(headers or [])
    if not any(name.lower() == b"content-type" for name, _ in headers):
        headers.append((b"Content-Type", ctype))
    return headers


def error_response(
    status: int, message: str, request_id: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    body = orjson.dumps({"message": message, "request_id": request_id})
    headers = [(b"Content-Type", b"application/json"), (b"X-Request-Id", request_id.encode("latin-1"))]
    if extra_headers:
        headers.extend(extra_headers)
    return Response(status, body, headers)


def serialize(
    response: Response, keep_alive: bool, head_only: bool = False, server: bytes | None = None
) -> bytes:
    """The bytes of a complete HTTP/1.1 response."""
    status = response.status
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
    for name, value in response.headers:
        parts += (name, b": ", value, b"\r\n")
    if server:
        parts += (b"Server: ", server, b"\r\n")
    if status >= 200 and status not in (204, 304):
        parts.append(b"Content-Length: %d\r\n" % len(response.body))
    parts.append(b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only and status not in (204, 304):
        parts.append(response.body)
    return b"".join(parts)
