"""The access log's field names: the catalogue the config schema validates against and the formatter
(tollway.observability.access_log) compiles into a bit mask once per config.

Named fields appear in this order in each JSON line, whatever order the config lists them in (the
formatter tests one bit per field instead of walking a list). ``request_header.<name>`` and
``response_header.<name>`` add a header's value, keyed by that name, after the named fields.
"""

from __future__ import annotations

# name -> what it holds (shown in docs/monitoring.md; the order is the order in a line)
FIELDS: dict[str, str] = {
    "time": "UTC time the response finished, ISO 8601 with milliseconds",
    "client": "client IP address (the TCP peer)",
    "method": "request method",
    "host": "Host header as sent by the client",
    "path": "request path as received (without the query)",
    "query": "query string, without the '?'",
    "protocol": "HTTP/1.1 or HTTP/1.0",
    "route": "name of the matched route (null if none matched)",
    "service": "name of the route's service",
    "upstream": "backend target that served the request, host:port",
    "status": "response status sent to the client",
    "bytes_sent": "bytes sent to the client (head and body)",
    "bytes_received": "request body bytes received from the client",
    "duration_ms": "total time from the request head to the last response byte",
    "upstream_ms": "time from sending the request upstream to the response head (null if not proxied)",
    "gateway_ms": "time the gateway held the request before sending it upstream (routing, plugins, queueing)",
    "request_id": "X-Request-Id (the client's, or one the gateway made)",
    "trace_id": "W3C trace id of the request (the client's, or one the gateway started)",
    "span_id": "the gateway's span id (the parent id the backend saw)",
    "user_agent": "User-Agent request header",
    "referer": "Referer request header",
    "consumer": "authenticated consumer (set by an auth plugin), or null",
    "worker": "pid of the worker process that served the request",
}

DEFAULT_FIELDS: list[str] = [
    "time",
    "client",
    "method",
    "path",
    "route",
    "service",
    "upstream",
    "status",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "upstream_ms",
    "request_id",
]

REQUEST_HEADER_PREFIX = "request_header."
RESPONSE_HEADER_PREFIX = "response_header."


def check_field(name: str) -> str:
    """A known field name, or a header field; raises ValueError otherwise."""
    if name in FIELDS:
        return name
    for prefix in (REQUEST_HEADER_PREFIX, RESPONSE_HEADER_PREFIX):
        if name.startswith(prefix) and len(name) > len(prefix):
            return prefix + name[len(prefix) :].lower()
    known = ", ".join(FIELDS)
    raise ValueError(
        f"unknown access log field {name!r}; known: {known}, request_header.<name>, response_header.<name>"
    )
