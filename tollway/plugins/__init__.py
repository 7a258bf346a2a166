"""Plugins: phase hooks that run on every request of the routes, services or consumers they apply to.

The public API for writing one (docs/plugins/writing-plugins.md):

    from tollway.plugins import Exchange, Plugin, PluginConfig, Response, error_response
"""

from tollway.plugins.base import (
    BANDS,
    HeaderName,
    HeaderValue,
    HookResult,
    Plugin,
    PluginConfig,
    PluginContext,
)
from tollway.plugins.consumers import Consumer
from tollway.proxy.exchange import Exchange
from tollway.proxy.responses import Response, error_response

__all__ = [
    "BANDS",
    "Consumer",
    "Exchange",
    "HeaderName",
    "HeaderValue",
    "HookResult",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "Response",
    "error_response",
]
