"""Send workers what changed in a config instead of the whole config.

Pickling a config with 10,000 routes and consumers for each worker (and unpickling it there) costs more
than the change itself. When a new config reuses the previous one's entity objects — a config store
patches only the entities that changed (tollway.store.incremental) — each entity list travels as the
indexes of the previous objects it keeps plus the new objects. A worker rebuilds the same config from
the one it holds; a worker that does not hold the base version asks for the whole config instead.
"""

from __future__ import annotations

from typing import Any

from tollway.config.schema import GatewayConfig

_LISTS = ("services", "routes", "upstreams", "consumers", "plugins")
_WORTH_IT = 64  # below this many entities the whole config is as cheap to send


def encode(previous: GatewayConfig, config: GatewayConfig) -> dict[str, Any] | None:
    """A delta of `config` against `previous`, or None when sending the whole config is as good."""
    if sum(len(getattr(config, name)) for name in _LISTS) < _WORTH_IT:
        return None
    payload: dict[str, Any] = {"gateway": config.gateway}
    reused = 0
    for name in _LISTS:
        old, new = getattr(previous, name), getattr(config, name)
        if old is new:
            reused += len(new)
            continue
        index = {id(obj): i for i, obj in enumerate(old)}
        spec = [index.get(id(obj), obj) for obj in new]
        reused += sum(isinstance(x, int) for x in spec)
        payload[name] = spec
    return payload if reused else None


def decode(previous: GatewayConfig, payload: dict[str, Any]) -> GatewayConfig:
    update: dict[str, Any] = {"gateway": payload["gateway"]}
    for name in _LISTS:
        spec = payload.get(name)
        if spec is not None:
            old = getattr(previous, name)
            update[name] = [old[x] if isinstance(x, int) else x for x in spec]
    return previous.model_copy(update=update)
