"""Client addresses for plugins: the real client IP behind trusted proxies, and fast CIDR sets.

`real_client_ip` believes X-Forwarded-For only as far as the proxies in `gateway.trusted_proxies`
reach: starting from the connection's peer, it walks the header right to left while the hop that
appended an entry is trusted, and stops at the first address a trusted proxy saw but does not vouch
for (nginx's `real_ip_recursive`). A client that is not behind a trusted proxy cannot choose its address
by sending the header.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IpAddress | None:
    """An address (IPv4-mapped IPv6 becomes IPv4), or None if `text` is not one."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def real_client_ip(ex: RequestContext) -> str:
    """The client's address: the peer, or what trusted proxies in front of us say it is."""
    peer = ex.client.peer_ip.decode("latin-1")
    if not ex.client.trusted or not ex.x_forwarded_for:
        return peer
    snapshot = ex.snapshot
    hops = ex.x_forwarded_for.decode("latin-1").split(",")
    client = peer
    for hop in reversed(hops):
        if not snapshot.is_trusted_proxy(client):
            break  # `client` was appended by someone we do not trust to tell the truth about it
        address = parse_ip(hop)
        if address is None:
            break  # garbage in the header: keep the last address a trusted hop vouched for
        client = str(address)
    return client


class IpSet:
    """CIDR blocks as sorted integer ranges, IPv4 and IPv6 apart: membership is one bisect."""

    __slots__ = ("_ends4", "_ends6", "_starts4", "_starts6")

    def __init__(self, cidrs: Iterable[str]) -> None:
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for cidr in cidrs:
            network = ipaddress.ip_network(cidr.strip(), strict=False)
            if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
                mapped = network.network_address.ipv4_mapped
                network = ipaddress.ip_network(f"{mapped}/{max(network.prefixlen - 96, 0)}", strict=False)
            ranges[network.version].append((int(network.network_address), int(network.broadcast_address)))
        self._starts4, self._ends4 = _merge(ranges[4])
        self._starts6, self._ends6 = _merge(ranges[6])

    def __repr__(self) -> str:
        return f"<IpSet v4={len(self._starts4)} v6={len(self._starts6)} ranges>"

    def __bool__(self) -> bool:
        return bool(self._starts4 or self._starts6)

    def contains(self, address: IpAddress) -> bool:
        if address.version == 4:
            starts, ends = self._starts4, self._ends4
        else:
            starts, ends = self._starts6, self._ends6
        value = int(address)
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]


def _merge(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(ranges):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends
