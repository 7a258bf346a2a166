"""response-transformer: edit the backend's response — headers and top-level JSON body fields.

Runs in the response phase, on backend responses (the gateway's own answers — errors, 401s, preflights
— are not transformed). Body edits apply to JSON object responses (application/json or */*+json, no
Content-Encoding) with a Content-Length of at most `max_body_size`: the body is buffered, edited and
sent with its new length. Chunked or larger responses, other types and bodies that are not a JSON object
stream through untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from tollway.config.types import Size
from tollway.plugins.base import Plugin, PluginContext
from tollway.plugins.builtin.transform import BodyEdits, HeaderEdits, TransformOps, is_json

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class ResponseTransformerConfig(TransformOps):
    max_body_size: Size = Field(1024 * 1024, ge=0, description="largest body edited (larger: untouched)")

    @model_validator(mode="after")
    def _no_query(self) -> ResponseTransformerConfig:
        if self.has("querystring"):
            raise ValueError(
                "a response has no query string (querystring edits belong to request-transformer)"
            )
        return self


class ResponseTransformer(Plugin[ResponseTransformerConfig]):
    name = "response-transformer"
    priority = 700

    def __init__(self, config: ResponseTransformerConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._headers = HeaderEdits(config)
        self._body = BodyEdits(config)
        self._max_body = config.max_body_size

    def response(self, ex: RequestContext) -> None:
        head = ex.response_head
        if head is None:
            return
        if self._body.active and is_json(head.get(b"content-type")) and head.get(b"content-encoding") is None:
            ex.buffer_response_body(self._body.apply, self._max_body)
        if self._headers.active:
            self._headers.apply(head.headers)
