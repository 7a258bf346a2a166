"""request-transformer: edit the request the backend receives — method, headers, query string, body.

Body edits apply to top-level fields of JSON objects (Content-Type application/json or */*+json) and to
the fields of forms (application/x-www-form-urlencoded), without Content-Encoding, sent with a
Content-Length of at most `max_body_size`: such a body is buffered, edited and forwarded with its new
length. Larger or chunked bodies, other types, and bodies that are not a JSON object stream through
untouched. Header and query edits cost a list rebuild; nothing is buffered unless body edits are
configured.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from tollway.config.types import Size
from tollway.plugins.base import Plugin, PluginContext
from tollway.plugins.builtin.transform import (
    BodyEdits,
    FormEdits,
    HeaderEdits,
    QueryEdits,
    TransformOps,
    is_form,
    is_json,
)

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class RequestTransformerConfig(TransformOps):
    max_body_size: Size = Field(1024 * 1024, ge=0, description="largest body edited (larger: untouched)")
    http_method: str | None = Field(
        None, description="the method the backend receives (HEAD requests keep theirs); null: unchanged"
    )

    @field_validator("http_method")
    @classmethod
    def _method(cls, method: str | None) -> str | None:
        if method is None:
            return None
        method = method.upper()
        if not re.fullmatch(r"[A-Z][A-Z0-9_-]{0,31}", method):
            raise ValueError(f"{method!r} is not an HTTP method")
        if method in ("HEAD", "CONNECT"):  # a HEAD answer has no body, a CONNECT one is a tunnel
            raise ValueError(f"cannot change requests into {method}")
        return method


class RequestTransformer(Plugin[RequestTransformerConfig]):
    name = "request-transformer"
    priority = 800

    def __init__(self, config: RequestTransformerConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._headers = HeaderEdits(config)
        self._query = QueryEdits(config)
        self._body = BodyEdits(config)
        self._form = FormEdits(config)
        self._max_body = config.max_body_size
        self._method = config.http_method.encode("latin-1") if config.http_method else None

    def access(self, ex: RequestContext) -> None:
        if self._body.active and ex.body_kind and ex.header_bytes(b"content-encoding") is None:
            content_type = ex.header_bytes(b"content-type")
            if is_json(content_type):
                ex.buffer_request_body(self._body.apply, self._max_body)
            elif is_form(content_type):
                ex.buffer_request_body(self._form.apply, self._max_body)
        if self._method is not None and ex.method != b"HEAD":
            ex.method = self._method  # the request line; logs and metrics show this method too
        if self._headers.active:
            self._headers.apply(ex.headers)
        if self._query.active:
            ex.set_query(self._query.apply(ex.query))
