"""proxy-cache's options: mistakes are load errors, never a cache that fails at the first request."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tollway.plugins.builtin.cache_config import ProxyCacheConfig


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"store": "redis"}, "store: redis needs redis_url"),
        ({"store": "redis", "redis_url": "http://127.0.0.1:6379"}, "redis_url must start with"),
        ({"store": "redis", "redis_url": "redis://"}, "redis_url names no host"),
        ({"redis_prefix": "a*"}, "redis_prefix"),
        ({"store": "disk"}, "store"),
        ({"methods": ["POST"]}, "methods"),
        ({"status_header": "X Cache"}, "status_header"),
        ({"default_ttl": "-1s"}, "default_ttl"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_options_are_refused_at_load(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ProxyCacheConfig.model_validate(config)


def test_defaults_and_durations() -> None:
    config = ProxyCacheConfig.model_validate(
        {"default_ttl": "1m", "stale_if_error": "1h", "max_size": "64mb"}
    )
    assert (config.default_ttl, config.stale_if_error, config.max_size) == (60.0, 3600.0, 64 << 20)
    assert (
        config.store == "node"
        and config.methods == ["GET", "HEAD"]
        and config.status_header == "X-Cache-Status"
    )
