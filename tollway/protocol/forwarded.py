"""The `Forwarded` request header (RFC 7239) sent to backends when `gateway.forwarded_headers.forwarded`
is on: ``for=<client>;proto=<http|https>;host=<host>``, appended to what a trusted proxy sent. It says
the same as X-Forwarded-For/-Proto/-Host, in the standard form; the scheme is the one the client really
used."""

from __future__ import annotations


def forwarded_element(previous: bytes, peer_ip: bytes, scheme: bytes, host: bytes) -> bytes:
    """`previous` (a trusted proxy's Forwarded value, or b"") extended with this hop's element."""
    node = b'"[' + peer_ip + b']"' if b":" in peer_ip else peer_ip  # IPv6 is quoted and bracketed
    element = b"for=" + node + b";proto=" + scheme
    if host and b'"' not in host and b"\\" not in host:
        element += b';host="' + host + b'"'  # quoted: a port's ":" is not a token character
    return previous + b", " + element if previous else element
