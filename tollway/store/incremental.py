"""Apply a delta to a validated config without validating every entity again.

A node holding 10,000 routes that learns one route changed validates that route with its model, checks
references across the (raw) document, and runs the plugin checks on the changed entities; the other
entities keep their already-validated objects. Any problem falls back to the full validation, so the
messages are always exactly those of `tollway check`. Writes through the store are always validated
whole (tollway.store.model.plan_write); this path only serves nodes catching up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from tollway.config.loader import check_references
from tollway.config.schema import GatewayConfig
from tollway.store.model import KINDS, Change, Rows, validate_rows


def apply_delta(previous: GatewayConfig, before: Rows, after: Rows, changes: list[Change]) -> GatewayConfig:
    """The config of `after`, built from `previous` (the config of `before`) and `changes`.
    Raises WriteRefused (with the full validation's messages) if the result is invalid."""
    try:
        config = _patched(previous, before, after, changes)
    except (ValidationError, _Invalid, KeyError, TypeError, ValueError):
        return validate_rows(after, source=f"store version {after.version}")
    return config


class _Invalid(Exception):
    pass


def _patched(previous: GatewayConfig, before: Rows, after: Rows, changes: list[Change]) -> GatewayConfig:
    changed_kinds = {c.kind for c in changes}
    changed_keys = {(c.kind, c.key) for c in changes}
    update: dict[str, list[Any]] = {}
    for kind in changed_kinds:
        model = _entity_model(kind)
        old = dict(zip(before.by_kind[kind], getattr(previous, kind), strict=True))
        update[kind] = [
            model.model_validate(row.data) if (kind, key) in changed_keys else old[key]
            for key, row in after.by_kind[kind].items()
        ]
    if any(True for _ in check_references(after.document())):
        raise _Invalid
    config = previous.model_copy(update=update)
    if _touches_plugins(before, after, changes) and any(
        True for _ in _plugin_problems(config, after, changed_keys)
    ):
        raise _Invalid
    return config


def _touches_plugins(before: Rows, after: Rows, changes: list[Change]) -> bool:
    """Whether the plugin checks (credentials across every consumer, plugin_order, instances) can
    give another answer: not when only entities without plugins changed (the usual route edit)."""
    for change in changes:
        if change.kind in ("consumers", "plugins"):
            return True
        for rows in (before, after):
            row = rows.by_kind[change.kind].get(change.key)
            if row is not None and (row.data.get("plugins") or row.data.get("plugin_order")):
                return True
    return False


def _entity_model(kind: str) -> Any:
    annotation = GatewayConfig.model_fields[kind].annotation
    return annotation.__args__[0]  # type: ignore[union-attr]  # list[Model]


def _plugin_problems(config: GatewayConfig, after: Rows, changed: set[tuple[str, str]]) -> Iterator[Any]:
    # Imported here, as the loader does: the registry imports plugin modules.
    from tollway.plugins.registry import check_config_plugins

    yield from check_config_plugins(config, _changed_instances(config, after, changed))


def _changed_instances(config: GatewayConfig, after: Rows, changed: set[tuple[str, str]]) -> Iterator[Any]:
    """The plugin instances of changed entities, with their locations (a config's lists follow the
    rows' order, so a key's index in the rows is its index in the config)."""
    for kind in KINDS:
        entities = getattr(config, kind)
        for i, key in enumerate(after.by_kind[kind]):
            if (kind, key) not in changed:
                continue
            if kind == "plugins":
                yield ("plugins", i), entities[i], True
            else:
                for j, plugin in enumerate(entities[i].plugins):
                    yield (kind, i, "plugins", j), plugin, False
