"""How the supervisor holds the running config: without its routes and consumers when it can.

The supervisor serves no traffic: of a config it needs the gateway settings, services and upstreams
(health checks, DNS, /upstreams), the counts for /status, and something to send a starting worker.
At 10,000 routes and 10,000 consumers the validated models of the routes and consumers take ~30 MB,
while the pickled config takes ~2.5 MB. So with a config file the supervisor keeps the config without
routes and consumers, plus the pickled whole config that workers are sent (`("config_wire", version,
bytes)`: pickled once per config, not once per worker). With a config store the whole config stays:
its entity objects are the base of the deltas sent to workers (tollway.runtime.config_delta).
"""

from __future__ import annotations

import ctypes
import gc
import pickle
from dataclasses import dataclass
from typing import Any

from tollway.config.compact import compact
from tollway.config.schema import GatewayConfig

_DROPPED: dict[str, list[Any]] = {"routes": [], "consumers": []}


@dataclass(frozen=True, slots=True)
class HeldConfig:
    config: GatewayConfig  # without routes and consumers when `wire` is set
    wire: bytes | None  # the whole config, pickled; None: `config` is whole
    routes: int
    services: int

    @classmethod
    def hold(cls, config: GatewayConfig, whole: bool) -> HeldConfig:
        """`whole`: keep every entity (a config store's deltas need them)."""
        routes, services = len(config.routes), len(config.services)
        if whole:
            return cls(config, None, routes, services)
        compact(config)  # one shared object for equal empty lists, dicts and field sets (config.compact)
        wire = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
        return cls(config.model_copy(update=_DROPPED), wire, routes, services)

    @classmethod
    def hold_file(cls, config: GatewayConfig) -> HeldConfig:
        """Whole only when the config names a config store (`tollway run` loading its file)."""
        return cls.hold(config, whole=config.gateway.store.backend != "file")

    def whole(self) -> GatewayConfig:
        """The config with every entity (unpickled again when only the wire has them)."""
        return self.config if self.wire is None else unwire(self.wire)

    def message(self, version: int) -> tuple[object, ...]:
        """What a worker is sent to apply this config whole."""
        if self.wire is None:
            return ("config", version, self.config)
        return ("config_wire", version, self.wire)


def freeze_config_objects() -> None:
    """Move every object alive now (the config, the snapshot, imported modules) out of the cyclic
    garbage collector's scans. A worker holding 10,000 routes and consumers has ~1M objects, and every
    full collection walked all of them (~0.25 s of stalled event loop). Frozen objects are still freed
    when their last reference goes; only reference cycles among them wait for `thaw_config_objects`
    at the next apply. After a reload this frees the previous snapshot's cycles at once (a worker at
    10,000 routes: ~101 MB after a reload instead of ~105)."""
    gc.collect()
    gc.freeze()


def thaw_config_objects() -> None:
    """Before a new config: what the previous one leaves in reference cycles becomes collectable."""
    gc.unfreeze()


def release_freed_memory() -> None:
    """Hand the memory a replaced config freed back to the system (glibc's malloc_trim: a few ms).
    Without it the heap keeps the high-water mark of the apply, when two configs were alive."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere nothing to do
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


def unwire(data: bytes) -> GatewayConfig:
    """The config of a `config_wire` message (worker side)."""
    config = pickle.loads(data)
    assert isinstance(config, GatewayConfig)
    return config
