"""Fixtures for plugin tests: the in-process harness, keys generated per session, tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.plugins.harness import Harness


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    """harness(config_dict) -> an in-process gateway (closed after the test)."""
    made: list[Harness] = []

    def make(config: dict[str, Any], **kwargs: Any) -> Harness:
        h = Harness(config, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
