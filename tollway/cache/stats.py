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
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


STATS = CacheCounters()
