"""request-transformer: edit the request the backend receives — headers, query string, JSON body.

Body edits apply to top-level fields of JSON objects (Content-Type application/json or */*+json, no
Content-Encoding) sent with a Content-Length of at most `max_body_size`: such a body is buffered, edited
and forwarded with its new length. Larger or chunked bodies, other types, and bodies that are not a JSON
object stream through untouched. Header and query edits cost a list rebuild; nothing is buffered unless
body edits are configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tollway.config.types import Size
from tollway.plugins.base import Plugin, PluginContext
from tollway.plugins.transform import BodyEdits, HeaderEdits, QueryEdits, TransformOps, is_json

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class RequestTransformerConfig(TransformOps):
    max_body_size: Size = Field(1024 * 1024, ge=0, description="largest body edited (larger: untouched)")


class RequestTransformer(Plugin[RequestTransformerConfig]):
    name = "request-transformer"
    priority = 800

    def __init__(self, config: RequestTransformerConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._headers = HeaderEdits(config)
        self._query = QueryEdits(config)
        self._body = BodyEdits(config)
        self._max_body = config.max_body_size

    def access(self, ex: RequestContext) -> None:
        if (
            self._body.active
            and is_json(ex.header_bytes(b"content-type"))
            and ex.header_bytes(b"content-encoding") is None
        ):
            ex.buffer_request_body(self._body.apply, self._max_body)
        if self._headers.active:
            self._headers.apply(ex.headers)
        if self._query.active:
            ex.set_query(self._query.apply(ex.query))
