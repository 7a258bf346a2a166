"""The optional forwarding headers: X-Real-IP, X-Forwarded-Port, X-Forwarded-Prefix.

X-Forwarded-For, -Proto and -Host go to every backend, built inline by the exchange. These three are
what Kong and APISIX send too; each is turned on in `gateway.forwarded_headers`. While all are off the
snapshot holds no `Forwarded` and a request pays one attribute test; when some are on, `apply` rebuilds
the request's header list once.

- X-Real-IP: the client's address as `real_client_ip` finds it (X-Forwarded-For believed only through
  `gateway.trusted_proxies`, as plugins see it).
- X-Forwarded-Port: the port the client connected to (one getsockname per request).
- X-Forwarded-Prefix: what a `strip_path` route removed (`/api` when `/api/users` goes on as `/users`);
  not sent when the route strips nothing.

A trusted proxy's own value of each is kept; anyone else's fields of those names are dropped, so a
client cannot choose what the backend is told.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollway.config.schema import ForwardedHeaders
    from tollway.proxy.exchange import Exchange
    from tollway.proxy.pdk import RequestContext

Headers = list[tuple[bytes, bytes]]
REAL_IP, PORT, PREFIX = 1, 2, 4
_NAMES = {b"x-real-ip": REAL_IP, b"x-forwarded-port": PORT, b"x-forwarded-prefix": PREFIX}


class Forwarded:
    """The headers a config turned on, as a bit mask (built once per config version)."""

    __slots__ = ("mask", "names")

    def __init__(self, mask: int) -> None:
        self.mask = mask
        self.names = {name: bit for name, bit in _NAMES.items() if bit & mask}  # lowercase -> bit

    def __repr__(self) -> str:
        return f"<Forwarded {', '.join(n.decode() for n in self.names)}>"

    @classmethod
    def from_config(cls, settings: ForwardedHeaders) -> Forwarded | None:
        mask = (
            (REAL_IP if settings.x_real_ip else 0)
            | (PORT if settings.x_forwarded_port else 0)
            | (PREFIX if settings.x_forwarded_prefix else 0)
        )
        return cls(mask) if mask else None

    def apply(self, ex: Exchange, headers: Headers) -> Headers:
        """A new list: `headers` without the client's fields of these names, then the gateway's (the
        exchange's own list stays as it is: a retry builds the head again)."""
        names = self.names
        if ex.client.trusted:
            return self._add(ex, [h for h in headers if h[0].lower() not in names], self._theirs(headers))
        return self._add(ex, [h for h in headers if h[0].lower() not in names], None)

    def _theirs(self, headers: Headers) -> dict[int, bytes]:
        """A trusted proxy's own values, by bit (the first field of each name)."""
        names = self.names
        found: dict[int, bytes] = {}
        for name, value in headers:
            bit = names.get(name.lower())
            if bit is not None and bit not in found:
                found[bit] = value
        return found

    def _add(self, ex: Exchange, out: Headers, theirs: dict[int, bytes] | None) -> Headers:
        mask = self.mask
        if mask & REAL_IP:
            real_ip = theirs.get(REAL_IP) if theirs else None
            out.append((b"X-Real-IP", real_ip or _client_ip(ex)))
        if mask & PORT:
            port = (theirs.get(PORT) if theirs else None) or _local_port(ex)
            if port:
                out.append((b"X-Forwarded-Port", port))
        if mask & PREFIX:
            prefix = (theirs.get(PREFIX) if theirs else None) or ex.forwarded_prefix
            if prefix:
                out.append((b"X-Forwarded-Prefix", prefix))
        return out


def stripped_prefix(path: str, rest: str) -> bytes:
    """What strip_path removed from `path` to leave `rest` (which the router gave a leading "/" of its
    own when the cut left none: `/v1users` → `/users` removed `/v1`)."""
    cut = len(path) - len(rest)
    prefix = path[:cut] if path.endswith(rest) else path[: cut + 1]
    return prefix.encode("latin-1")


def real_client_ip(ex: RequestContext) -> str:
    """The client's address: the peer, or what trusted proxies in front of us say it is. Walks
    X-Forwarded-For right to left while the hop that appended an entry is trusted, and stops at the first
    address a trusted proxy saw but does not vouch for (nginx's `real_ip_recursive`)."""
    peer = ex.client.peer_ip.decode("latin-1")
    if not ex.client.trusted or not ex.x_forwarded_for:
        return peer
    snapshot = ex.snapshot
    client = peer
    for hop in reversed(ex.x_forwarded_for.decode("latin-1").split(",")):
        if not snapshot.is_trusted_proxy(client):
            break  # `client` was appended by someone we do not trust to tell the truth about it
        address = _parse_ip(hop)
        if address is None:
            break  # garbage in the header: keep the last address a trusted hop vouched for
        client = address
    return client


def _client_ip(ex: Exchange) -> bytes:
    client = ex.client
    if not client.trusted or not ex.x_forwarded_for:
        return client.peer_ip  # the common case, without decoding
    return real_client_ip(ex).encode("latin-1")


def _parse_ip(text: str) -> str | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _local_port(ex: Exchange) -> bytes:
    transport = ex.client.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return b"%d" % sockname[1]
    return b""
