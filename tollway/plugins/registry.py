"""Which plugins exist, and validation of their configuration at load time.

Built-in plugins are registered by name; a user's plugin is named by import path (``package.module:Class``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

# name -> "module:attribute" of the plugin class; filled as plugins are added.
BUILTIN: dict[str, str] = {}


def check_config_plugins(
    config: Any, instances: Iterable[tuple[tuple[str | int, ...], Any, bool]]
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Yield (location, message) for every plugin instance that names no known plugin."""
    for loc, instance, _scoped in instances:
        if instance.name not in BUILTIN and ":" not in instance.name:
            yield (*loc, "name"), f"unknown plugin {instance.name!r}"
