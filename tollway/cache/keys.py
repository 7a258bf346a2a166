"""Cache keys. A primary key names a resource: ``http://host/path?query`` with the query normalised
(parameters dropped or sorted as configured). It stays readable so a purge can name a prefix. A
secondary key names one variant of it: the primary key, the variants record's nonce and a digest of
the request's values for the fields the responses vary on (tollway.cache.entry)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

MAX_READABLE = 400  # LMDB keys are at most 511 bytes: longer ones keep a readable head and a digest


def normalise_query(query: str, ignore: frozenset[str] = frozenset(), sort: bool = False) -> str:
    """Drop the `ignore`d parameters and, if `sort`, order the rest: ``b=2&utm_source=x&a=1`` →
    ``a=1&b=2``. A query that needs neither is returned unchanged (no re-encoding)."""
    if not query or (not ignore and not sort):
        return query
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in ignore]
    if sort:
        pairs.sort()
    return urlencode(pairs)


def primary_key(scheme: str, host: str, path: str, query: str) -> bytes:
    key = f"{scheme}://{host}{path}?{query}" if query else f"{scheme}://{host}{path}"
    data = key.encode("utf-8", "surrogateescape")
    if len(data) > MAX_READABLE:
        data = data[:300] + b"#" + hashlib.blake2b(data, digest_size=16).hexdigest().encode()
    return data


def secondary_key(primary: bytes, nonce: bytes, values: Iterable[bytes]) -> bytes:
    digest = hashlib.blake2b(b"\x00".join(values), digest_size=16, key=nonce).hexdigest()
    return primary[:MAX_READABLE] + b"#v" + digest.encode()
