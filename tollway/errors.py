"""Tollway's own exception tree.

Every error that can end a request knows the status the client should see, so the proxy layer never
guesses (the `error_status_hint` idea of h11). Foreign exceptions (OSError, httptools errors, pydantic
errors) are translated where they enter, with ``raise ... from exc``.
"""

from __future__ import annotations


class TollwayError(Exception):
    """Base of every error Tollway raises on purpose."""

    status: int = 500
    message: str = "internal gateway error"
    headers: list[tuple[bytes, bytes]] | None = None  # extra response headers (e.g. why a 503)

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message


# -- client side: the request was bad; the connection is closed after the answer ---------------------
class ClientError(TollwayError):
    status = 400
    message = "bad request"


class RequestLineTooLong(ClientError):
    status = 414
    message = "request line too long"


class HeadersTooLarge(ClientError):
    status = 431
    message = "request header fields too large"


class BodyTooLarge(ClientError):
    status = 413
    message = "request body too large"


class UnsupportedVersion(ClientError):
    status = 505
    message = "HTTP version not supported"


class RequestTimeout(ClientError):
    status = 408
    message = "request timeout"


# -- upstream side: the backend failed; the client gets a gateway error --------------------------------
class UpstreamError(TollwayError):
    status = 502
    message = "bad gateway"


class UpstreamConnectError(UpstreamError):
    message = "upstream connection failed"


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake with a backend failed (an untrusted or mismatched certificate, no shared
    protocol): a 502 whose reason is logged, counted as error="tls"."""

    message = "upstream TLS handshake failed"


class UpstreamResetError(UpstreamError):
    message = "upstream closed the connection"


class UpstreamProtocolError(UpstreamError):
    message = "upstream sent an invalid response"


class UpstreamTimeout(UpstreamError):
    status = 504
    message = "upstream timed out"


class NoHealthyTarget(UpstreamError):
    status = 503
    message = "no healthy upstream target"


class CircuitBreakerOpen(UpstreamError):
    """An upstream's connection or pending-request limit is reached: answered at once, never queued."""

    status = 503
    message = "upstream circuit breaker open"

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit  # "max-connections" or "max-pending-requests"
        self.headers = [(b"X-Tollway-Circuit-Breaker", limit.encode("ascii"))]


# -- plugins --------------------------------------------------------------------------------------------
class PluginError(TollwayError):
    """A plugin hook raised: the request is answered 500 and the traceback logged under the plugin's name."""

    status = 500
    message = "internal gateway error"


# -- configuration -------------------------------------------------------------------------------------
class ConfigError(TollwayError):
    """A configuration could not be loaded; `issues` lists every problem with where it is."""

    def __init__(self, issues: list[str], source: str = "") -> None:
        self.issues = issues
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(issues) if issues else head + "invalid configuration")
