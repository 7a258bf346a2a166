"""correlation-id: every request carries an id header to the backend (and back, if asked).

A client's own id is kept; otherwise one is generated. The default generator reuses the gateway's
request id (already unique across workers and restarts, and in the access log), so tracing a request
from the client through the log to the backend needs one id and costs nothing to generate.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tollway.plugins.base import HeaderName, Plugin, PluginConfig, PluginContext

if TYPE_CHECKING:
    from tollway.proxy.pdk import RequestContext


class CorrelationIdConfig(PluginConfig):
    header_name: HeaderName = Field("X-Correlation-ID", description="the header carrying the id")
    generator: Literal["request-id", "uuid", "uuid#counter"] = Field(
        "request-id",
        description='"request-id": the gateway\'s request id; "uuid": a random UUID per request; '
        '"uuid#counter": a UUID per worker plus a counter (cheaper than a UUID each), like '
        '"<uuid>#42"',
    )
    echo_downstream: bool = Field(False, description="send the id back to the client in the response")


class CorrelationId(Plugin[CorrelationIdConfig]):
    name = "correlation-id"
    priority = 3900

    def __init__(self, config: CorrelationIdConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self._name = config.header_name
        self._bname = config.header_name.encode("latin-1")
        self._lname = self._bname.lower()
        # X-Request-Id is the gateway's own: always forwarded, and taken from the client when sent.
        self._is_request_id = self._lname == b"x-request-id"
        self._generator = config.generator
        self._reuse_request_id = config.generator == "request-id"
        self._echo = config.echo_downstream
        self._prefix = str(uuid.uuid4()).encode() + b"#"  # 8-4-4-4-12, like "uuid" (and Kong's)
        self._counter = 0

    def access(self, ex: RequestContext) -> None:
        if self._is_request_id:
            value = ex.request_id
        else:
            found = ex.header_bytes(self._lname)
            if found is not None:
                value = found
            elif self._reuse_request_id:
                value = ex.request_id
                ex.headers.append((self._bname, value))
            else:
                value = self._generate()
                ex.headers.append((self._bname, value))
        if self._echo:
            ex.set_response_header(self._name, value.decode("latin-1"))

    def _generate(self) -> bytes:
        if self._generator == "uuid":
            return str(uuid.uuid4()).encode()
        self._counter += 1
        return self._prefix + b"%d" % self._counter
