"""The fields that tell a client what the cache did: RFC 9211 `Cache-Status` and the configurable
`X-Cache-Status` (HIT, MISS, STALE, EXPIRED, REVALIDATED, BYPASS). Built once per config, so a hit's
fields cost one bytes format."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tollway.cache import rfc
from tollway.cache.entry import Entry

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext

_FWD = {"MISS": "uri-miss", "EXPIRED": "stale", "BYPASS": "bypass"}


class StatusFields:
    __slots__ = ("_hit", "_label_name", "_name", "name")

    def __init__(self, cache_status_name: str, status_header: str | None) -> None:
        self.name = cache_status_name
        self._name = cache_status_name.encode()
        self._label_name = status_header.encode() if status_header else None
        self._hit = (self._label_name, b"HIT") if self._label_name is not None else None

    def answer(self, label: str, entry: Entry | None, age: float = 0.0) -> rfc.Headers:
        """The fields of an answer the cache made itself."""
        if label == "HIT" and entry is not None:  # the hot path: no string building
            value = b"%s; hit; ttl=%d" % (self._name, entry.lifetime - age)
            return [(b"Cache-Status", value)] if self._hit is None else [(b"Cache-Status", value), self._hit]
        if label in ("HIT", "STALE"):  # RFC 9211 2.5: a stale hit has a negative ttl
            value = rfc.cache_status(self.name, True, ttl=entry.lifetime - age if entry is not None else None)
        elif label == "REVALIDATED":  # RFC 9211 2.2: forwarded because stale; the backend said 304
            value = rfc.cache_status(self.name, True, "stale", stored=True) + b"; fwd-status=304"
        else:
            value = rfc.cache_status(self.name, False, _FWD.get(label, "miss"))
        return self._with_label([(b"Cache-Status", value)], label)

    def forwarded(
        self, ex: RequestContext, label: str, fwd: str, stored: bool = False, detail: str = ""
    ) -> None:
        """Fields for whatever response a forwarded request gets (the backend's or an error)."""
        value = rfc.cache_status(self.name, False, fwd, stored=stored)
        if detail:
            value += b"; detail=" + detail.replace(" ", "-").encode()
        ex.add_response_fields(self._with_label([(b"Cache-Status", value)], label))

    def _with_label(self, fields: rfc.Headers, label: str) -> rfc.Headers:
        if self._label_name is not None:
            fields.append((self._label_name, label.encode()))
        return fields
