"""DNS for hostname targets, resolved in the supervisor, in the background.

Names are looked up in the hosts file first (read here, re-read when it changes: the system resolver's
`localhost` comes from there, not from DNS), then asked of DNS through dnspython's asyncio resolver —
A and/or AAAA records, or SRV where a target asks for it — honouring each answer's TTL (clamped between
an upstream's `min_ttl` and `max_ttl`). Every address becomes a target. A failed or empty answer keeps
the last good set, logs it, and asks again after `error_ttl`: losing DNS never empties an upstream.

Why dnspython: the system resolver (getaddrinfo) gives neither TTLs nor SRV records, and a blocking call
would need a thread per lookup. dnspython's resolver is asyncio-native, pure Python, widely used, and
imported only by a supervisor that has hostname targets.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tollway.config.schema import parse_nameserver

if TYPE_CHECKING:
    from tollway.config.schema import DnsSettings

_HOSTS_TTL = 5.0  # how long a hosts-file answer stands before the file is looked at again


@dataclass(frozen=True)
class Address:
    ip: str
    ttl: float


@dataclass(frozen=True)
class Service:
    """One SRV record, its target name resolved."""

    ip: str
    port: int
    weight: int
    priority: int
    ttl: float


class ResolveError(Exception):
    """A name could not be resolved (the message says why)."""


class HostsFile:
    """/etc/hosts, parsed once per change of the file."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, list[str]] = {}

    def lookup(self, name: str) -> list[str]:
        self._refresh()
        return self._names.get(name.lower().rstrip("."), [])

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            self._names, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        names: dict[str, list[str]] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split("#", 1)[0].split()
                    if len(fields) < 2:
                        continue
                    try:
                        ip = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
                    except ValueError:
                        continue
                    for name in fields[1:]:
                        entries = names.setdefault(name.lower(), [])
                        if ip not in entries:
                            entries.append(ip)
        except OSError:
            return
        self._names, self._stamp = names, stamp


class Resolver:
    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self.hosts = HostsFile(settings.hosts_file)
        self._resolver: Any = None

    def _dns(self) -> Any:
        if self._resolver is None:
            import dns.asyncresolver

            servers = self.settings.nameservers
            resolver = dns.asyncresolver.Resolver(configure=not servers)
            if servers:
                import dns.nameserver

                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(ip, port) for ip, port in map(parse_nameserver, servers)
                ]
            resolver.cache = None  # TTLs are honoured by the caller
            self._resolver = resolver
        return self._resolver

    async def addresses(self, name: str, record_types: Sequence[str]) -> list[Address]:
        """The addresses of `name` (hosts file first, then DNS); raises ResolveError."""
        from_hosts = self.hosts.lookup(name)
        if from_hosts:
            wanted = [ip for ip in from_hosts if _family(ip) in record_types]
            if wanted:
                return [Address(ip, _HOSTS_TTL) for ip in wanted]
        out: list[Address] = []
        errors = []
        for rdtype in record_types:
            try:
                answer = await self._query(name, rdtype)
            except ResolveError as exc:
                errors.append(str(exc))
                continue
            ttl = float(answer.rrset.ttl)
            out += [Address(str(r.address), ttl) for r in answer]
        if not out and errors:
            raise ResolveError("; ".join(dict.fromkeys(errors)))
        return out

    async def services(self, name: str, record_types: Sequence[str]) -> list[Service]:
        """The SRV records of `name`, each target resolved to its addresses; raises ResolveError."""
        answer = await self._query(name, "SRV")
        srv_ttl = float(answer.rrset.ttl)
        out: list[Service] = []
        for record in answer:
            target = record.target.to_text(omit_final_dot=True)
            if target in ("", "."):
                continue  # "service decidedly not available" (RFC 2782)
            try:
                addresses = await self.addresses(target, record_types)
            except ResolveError:
                continue
            for address in addresses:
                ttl = min(srv_ttl, address.ttl)
                out.append(Service(address.ip, record.port, record.weight, record.priority, ttl))
        return out

    async def _query(self, name: str, rdtype: str) -> Any:
        import dns.exception
        import dns.resolver

        try:
            return await self._dns().resolve(name, rdtype, lifetime=self.settings.timeout, search=True)
        except dns.resolver.NXDOMAIN:
            raise ResolveError(f"{name}: no such name") from None
        except dns.resolver.NoAnswer:
            raise ResolveError(f"{name}: no {rdtype} records") from None
        except dns.resolver.NoNameservers:
            raise ResolveError(f"{name}: no name server gave an answer") from None
        except dns.exception.Timeout:
            raise ResolveError(f"{name}: timed out after {self.settings.timeout:g}s") from None
        except dns.exception.DNSException as exc:
            raise ResolveError(f"{name}: {exc}") from None


def _family(ip: str) -> str:
    return "AAAA" if ":" in ip else "A"
