"""The response cache's counters in this process (read by the metrics layer; cumulative)."""

from __future__ import annotations


class CacheCounters:
    __slots__ = (
        "background_refreshes",
        "bytes_stored",
        "coalesced",
        "evictions",
        "hits",
        "invalidations",
        "misses",
        "revalidated",
        "stale",
        "store_errors",
        "too_large",
    )

    def __init__(self) -> None:
        self.background_refreshes = 0  # stale-while-revalidate requests made
        self.bytes_stored = 0
        self.coalesced = 0  # misses that waited for another request's response
        self.evictions = 0
        self.hits = 0
        self.invalidations = 0
        self.misses = 0
        self.revalidated = 0
        self.stale = 0
        self.store_errors = 0
        self.too_large = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


STATS = CacheCounters()
