"""Value types shared by every schema: durations, sizes, listen addresses, names.

Users write durations and sizes the way nginx and Envoy users do (``"5s"``, ``"250ms"``, ``"1m"``,
``"64k"``, ``"10mb"``) or as plain numbers (seconds, bytes); the schema stores floats and ints.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$")


def parse_duration(value: Any) -> float:
    """``"250ms"`` → 0.25; numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError('must be a duration such as 5, "5s" or "250ms"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError('must be a duration such as 5, "5s" or "250ms"')
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: Any) -> int:
    """``"64k"`` → 65536, ``"10mb"`` → 10485760; numbers are bytes."""
    if isinstance(value, bool):
        raise ValueError('must be a size such as 1024, "64k" or "10mb"')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError('must be a size such as 1024, "64k" or "10mb"')
    if size < 0:
        raise ValueError("must not be negative")
    return size


def check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "must be 1-128 characters of letters, digits and . _ ~ -, starting with a letter or digit"
        )
    return value


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:8000"``, ``"[::1]:8000"``, ``":8000"`` (all interfaces), ``"example.com:80"``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        if default_port is None or ":" in value.strip("[]"):
            raise ValueError(f"{value!r} must be host:port")
        host, port_text = value, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    if not host:
        raise ValueError(f"{value!r}: host is empty")
    return host, int(port_text)


def check_listen(value: str) -> str:
    parse_hostport(value)
    return value


LISTEN_FLAGS = ("tls", "mtls")


def parse_listen(value: str) -> tuple[str, int, frozenset[str]]:
    """A traffic listener: ``"0.0.0.0:8443 tls"`` → ("0.0.0.0", 8443, {"tls"}). Flags: ``tls`` (HTTPS,
    docs/tls.md) and ``mtls`` (also ask for client certificates; implies tls)."""
    address, *words = value.split()
    host, port = parse_hostport(address)
    flags = frozenset(word.lower() for word in words)
    unknown = flags - set(LISTEN_FLAGS)
    if unknown:
        raise ValueError(f"{value!r}: unknown listener option {sorted(unknown)[0]!r} (known: tls, mtls)")
    if "mtls" in flags:
        flags |= {"tls"}
    return host, port, flags


def check_traffic_listen(value: str) -> str:
    if not value.strip():
        raise ValueError("empty listen address")
    parse_listen(value)
    return value


def check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address or CIDR block") from exc
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Name = Annotated[str, AfterValidator(check_name)]
ListenAddress = Annotated[str, AfterValidator(check_listen)]
TrafficListen = Annotated[str, AfterValidator(check_traffic_listen)]
Cidr = Annotated[str, AfterValidator(check_cidr)]
