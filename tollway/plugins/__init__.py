"""Plugins: phase hooks that run on every request of the routes, services or consumers they apply to.

The public API for writing one (docs/plugins/writing-plugins.md):

    from tollway.plugins import Plugin, PluginConfig, RequestContext, Response, error_response

`RequestContext`, `Response` and `error_response` come from tollway.proxy.pdk (the plugin development
kit), which the proxy imports too; the rest is the plugin framework of this package.
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
from tollway.proxy.pdk import RequestContext, Response, error_response

Exchange = RequestContext  # the name plugins used before the context had a type of its own

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
    "RequestContext",
    "Response",
    "error_response",
]
