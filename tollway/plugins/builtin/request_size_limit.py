"""request-size-limit: refuse request bodies over a size, per route, service or consumer.

A Content-Length over the limit is answered 413 before any body byte is read or forwarded. A chunked
body is counted as it streams: the request fails with 413 the moment it passes the limit (if the
backend has started receiving it, that connection is dropped, never reused). The node-wide
`gateway.limits.max_body_size` still applies on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tollway.config.types import Size
from tollway.plugins.base import Plugin, PluginConfig, PluginContext
from tollway.proxy.pdk import REQ_NONE, Response, error_response

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class RequestSizeLimitConfig(PluginConfig):
    max_body_size: Size = Field(ge=0, description='largest request body accepted, e.g. "1mb" or 65536')
    require_content_length: bool = Field(
        False, description="refuse (411) bodies sent without a Content-Length (chunked uploads)"
    )


class RequestSizeLimit(Plugin[RequestSizeLimitConfig]):
    name = "request-size-limit"
    priority = 1400

    def __init__(self, config: RequestSizeLimitConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._limit = config.max_body_size
        self._require_length = config.require_content_length

    def access(self, ex: RequestContext) -> Response | None:
        if ex.body_kind == REQ_NONE:
            return None
        limit = self._limit
        if ex.content_length > limit:
            return error_response(413, "request body too large", ex.request_id.decode("latin-1"))
        if ex.content_length < 0:  # chunked: counted as it arrives
            if self._require_length:
                return error_response(411, "a Content-Length is required", ex.request_id.decode("latin-1"))
            if not ex.max_body_size or limit < ex.max_body_size:
                ex.max_body_size = limit
            if ex.body_received > limit or limit == 0:  # (0 would mean "unlimited" to the exchange)
                return error_response(413, "request body too large", ex.request_id.decode("latin-1"))
        return None
