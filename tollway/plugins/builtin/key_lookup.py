"""key-auth's per-request half for the common case, compiled with mypyc (HOT_MODULES in setup.py): the
key in a request header, found in the index built once per config. Interpreted, the same lookup cost
~8,000 instructions a request on the chain benchmark (bench/gen_chain.py); compiled it is a loop over
the header fields and one dict lookup.

Anything else — no key header, a key sent twice, an unknown key (the 401 and its metric), keys in the
query or the body — goes to the plugin's own `access` (`general`), which decides exactly as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tollway.plugins.consumers import Consumer, identify

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

Index = dict[bytes, tuple[Consumer, Any]]


def header_key(name: bytes) -> bytes:
    """Header names compare case-insensitively and with "_" as "-" (Kong's get_header does the same;
    some proxies drop or rewrite underscores, so clients use either)."""
    lname = name.lower()
    # find, not `in`: bytes.__contains__ first tries its argument as an integer and builds (then
    # drops) a TypeError for a bytes one: twice the cost, on every header field of every request.
    return lname.replace(b"_", b"-") if lname.find(b"_") >= 0 else lname


class HeaderKeyLookup:
    """The `access` hook of a key-auth instance that looks for keys in headers."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        names: int,
        hide: bool,
        plain: Index,
        hashed: Index,
        or_with_others: bool,
        general: Callable[[RequestContext], Any],
    ) -> None:
        self.ranks = ranks  # header name (lowercase, "_" as "-") -> its place in key_names
        self.lengths = frozenset(len(name) for name in ranks)
        self.names = names
        self.hide = hide
        self.plain = plain
        self.hashed = hashed
        self.or_with_others = or_with_others  # `anonymous` is set: an OR of authentication plugins
        self.general = general

    def access(self, ex: RequestContext) -> Any:
        if self.or_with_others and ex.credential is not None:
            return None  # an earlier authentication plugin of the OR succeeded
        ranks = self.ranks
        lengths = self.lengths
        best = self.names
        value: bytes | None = None
        twice = False
        at = -1
        index = -1
        for name, field in ex.headers:
            index += 1
            if len(name) not in lengths:  # most fields: no lowercasing
                continue
            rank = ranks.get(header_key(name), best + 1)
            if rank > best:
                continue
            if rank == best:
                twice = True
            else:
                best = rank
                value = field
                twice = False
                at = index
        if value is None or twice:
            return self.general(ex)  # missing here (maybe in the query or body), or ambiguous
        found = self.plain.get(value)
        if found is None and self.hashed:
            found = self.hashed.get(hashlib.sha256(value).digest())
        if found is None:
            return self.general(ex)  # the general path refuses it, counted and answered as always
        if self.hide:  # the one field with the key (a second one would have been ambiguous)
            headers = ex.headers
            ex.headers = headers[:at] + headers[at + 1 :]
        identify(ex, found[0], found[1])
        return None
