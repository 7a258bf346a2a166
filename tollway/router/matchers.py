"""Header and query matchers: compiled once per config, evaluated only for candidates that have them.

A configured value is either literal (exact comparison) or ``~regex`` (`re.search`); a list matches if
any item does. A header or parameter may repeat: any occurrence that matches is enough. An absent
header or parameter never matches, whatever the pattern (even ``~.*`` or ``~^$``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl


class ValueMatcher:
    """The accepted values of one header or query parameter."""

    __slots__ = ("exact", "regexes")

    def __init__(self, spec: str | list[str]) -> None:
        items = spec if isinstance(spec, list) else [spec]
        self.exact = frozenset(item for item in items if not item.startswith("~"))
        self.regexes = tuple(re.compile(item[1:]) for item in items if item.startswith("~"))

    def matches(self, values: Sequence[str]) -> bool:
        for value in values:
            if value in self.exact:
                return True
            for regex in self.regexes:
                if regex.search(value):
                    return True
        return False

    def __repr__(self) -> str:
        patterns = sorted(self.exact) + ["~" + regex.pattern for regex in self.regexes]
        return f"<ValueMatcher {patterns}>"


Matchers = tuple[tuple[str, ValueMatcher], ...]


def compile_matchers(specs: Mapping[str, str | list[str]]) -> Matchers | None:
    """None when there is nothing to check, so the hot path tests one attribute."""
    if not specs:
        return None
    return tuple((name, ValueMatcher(spec)) for name, spec in specs.items())


def all_match(matchers: Matchers, values: Mapping[str, list[str]]) -> bool:
    for name, matcher in matchers:
        found = values.get(name)
        if found is None or not matcher.matches(found):
            return False
    return True


def header_values(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    """Raw header pairs as {lowercase name: [values]}; built once per request, only when needed."""
    # latin-1 maps every byte to one character, so nothing a client sends can fail to decode.
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return values


def query_values(query: str) -> dict[str, list[str]]:
    """The query string as {name: [percent-decoded values]}; built once per request, only when needed."""
    values: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        values.setdefault(name, []).append(value)
    return values


class NameMatcher:
    """Host-name patterns as routes write them (exact, "*.example.com", "example.*"), for the TLS server
    name (SNI) a client sent. An empty name (no SNI, or clear text) matches nothing."""

    __slots__ = ("exact", "prefixes", "suffixes")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.exact = frozenset(p for p in patterns if not p.startswith("*.") and not p.endswith(".*"))
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))  # ".example.com"
        self.prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))  # "example."

    def matches(self, name: str) -> bool:
        if not name:
            return False
        name = name.lower()
        if name in self.exact:
            return True
        for suffix in self.suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return True
        return any(name.startswith(prefix) and len(name) > len(prefix) for prefix in self.prefixes)
